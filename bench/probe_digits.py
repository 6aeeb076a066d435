"""Does pretraining learn? Linear probe on frozen features of tiny_image pretrained on digits.

Pretrains ``tiny_image`` on scikit-learn's digits through the real launcher (one CPU process by
default), then fits a logistic-regression probe on mean-pooled student features of the training
split and reports held-out accuracy for: the pretrained encoder, the same encoder at its random
initialisation (same seed), and raw pixels.

    python bench/probe_digits.py [--steps 1500] [--run_dir runs/probe_digits] [--nproc 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.data.digits import load_digits_tensors  # noqa: E402
from d2v2scale.modalities.image import ImageKeys  # noqa: E402
from d2v2scale.model import Data2Vec2  # noqa: E402


def pretrain(run_dir: Path, steps: int, nproc: int) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    args = ["launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image",
            "--run_dir", str(run_dir), f"train.max_updates={steps}", "train.log_every=50", f"train.save_every={steps}"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    subprocess.run(launcher + args, cwd=ROOT, env=env, check=True)


def load_student(run_dir: Path) -> tuple[Data2Vec2, Data2Vec2]:
    from d2v2scale.weights import read_weights

    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    cfg, state, _ = read_weights(str(run_dir / "checkpoints" / tag))
    torch.manual_seed(cfg.seed)
    random_init = Data2Vec2(cfg.model_spec())
    trained = Data2Vec2(cfg.model_spec())
    trained.load_state_dict(state)
    return random_init.eval(), trained.eval()


@torch.no_grad()
def features(model: Data2Vec2, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.extract_features(images[i : i + 256])[0].mean(1) for i in range(0, len(images), 256)])


def probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--run_dir", default="runs/probe_digits")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--skip_pretrain", action="store_true", help="probe an existing run directory")
    args = p.parse_args()
    run_dir = Path(args.run_dir)
    if not args.skip_pretrain:
        pretrain(run_dir, args.steps, args.nproc)
    random_init, trained = load_student(run_dir)
    keys = trained.cfg.model.keys(ImageKeys)
    tr_x, tr_y = load_digits_tensors(keys.img_size, keys.in_chans, "train")
    te_x, te_y = load_digits_tensors(keys.img_size, keys.in_chans, "heldout")
    pix = probe(tr_x.flatten(1).numpy(), tr_y.numpy(), te_x.flatten(1).numpy(), te_y.numpy())
    rnd = probe(features(random_init, tr_x).numpy(), tr_y.numpy(), features(random_init, te_x).numpy(), te_y.numpy())
    pre = probe(features(trained, tr_x).numpy(), tr_y.numpy(), features(trained, te_x).numpy(), te_y.numpy())
    print(f"linear probe, held-out accuracy ({len(te_y)} digits, {len(tr_y)} for training the probe):")
    print(f"  pretrained encoder ({args.steps} steps): {pre:.4f}")
    print(f"  same encoder at random init:       {rnd:.4f}")
    print(f"  raw pixels:                        {pix:.4f}")
    print(f"  pretrained / random-init accuracy: {pre / rnd:.3f}")


if __name__ == "__main__":
    main()
