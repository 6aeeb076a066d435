"""Student-encoder features of a converted or trained checkpoint (no masking), for fine-tuning work.

    python -m d2v2scale.features WEIGHTS INPUTS.npy OUT.npy [--pool mean|none] [--batch 32]

``WEIGHTS`` is a d2v2scale weights file (``python -m d2v2scale.convert``) or a training
checkpoint directory; ``INPUTS.npy`` holds model-ready inputs: normalised images (N, C, H, W),
waveforms (N, S) or token ids (N, T). The output is (N, D) mean-pooled or (N, T, D) features of
the last block, extra tokens removed. In Python: ``load_student(path).extract_features(x)``.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .config import ConfigError
from .convert import read_weights
from .model import Data2Vec2


def load_student(path: str) -> Data2Vec2:
    cfg, student, _ = read_weights(path)
    model = Data2Vec2(cfg)
    model.load_state_dict(student, strict=True)
    return model.eval()


@torch.no_grad()
def extract(model: Data2Vec2, inputs: torch.Tensor, pool: str = "mean", batch: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, len(inputs), batch):
        feats = model.extract_features(inputs[i : i + batch])
        outs.append(feats.mean(1) if pool == "mean" else feats)
    return torch.cat(outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights")
    p.add_argument("inputs")
    p.add_argument("output")
    p.add_argument("--pool", choices=("mean", "none"), default="mean")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    try:
        model = load_student(args.weights)
    except (ConfigError, FileNotFoundError) as e:
        print(f"features: error: {e}", file=sys.stderr)
        return 2
    x = torch.from_numpy(np.load(args.inputs))
    if x.is_floating_point():
        x = x.float()
    feats = extract(model, x, args.pool, args.batch)
    np.save(args.output, feats.numpy())
    print(f"{tuple(feats.shape)} features → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
