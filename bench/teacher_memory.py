"""Per-rank fp32 EMA-teacher memory at dp=1, 2 and 4 (and TP=2 × DP=2), measured side by side.

Each layout is a real process group on this machine (gloo on CPU); every rank builds the
DeepSpeed engine and the sharded teacher for the preset and reports the fp32 master bytes it holds.

    python bench/teacher_memory.py [--preset tiny_image] [--ds_config ds_configs/cpu_tiny.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(preset: str, ds_path: str, tp: int, out: str) -> None:
    import torch.distributed as dist

    from d2v2scale.config import load_config
    from d2v2scale.distributed.runtime import init_distributed, shutdown
    from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config
    from d2v2scale.run_spec import read_spec
    from d2v2scale.train.engine import build_trainer

    cfg = load_config(preset, [f"parallel.tp={tp}"])
    dims, device = init_distributed(tp)
    ds = load_ds_config(ds_path)
    plan = plan_batch(ds, cfg, dims.dp)
    tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
    sizes = [None] * dims.world_size
    dist.all_gather_object(sizes, tr.teacher.master_bytes())
    if dims.rank == 0:
        Path(out).write_text(json.dumps(sizes))
    shutdown()


def measure(preset: str, ds_path: str, nproc: int, tp: int) -> list[int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sizes.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        from d2v2scale.distributed.runtime import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               __file__, "--worker", "--preset", preset, "--ds_config", ds_path, "--tp", str(tp), "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_image")
    p.add_argument("--ds_config", default="ds_configs/cpu_tiny.json")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args.preset, args.ds_config, args.tp, args.out)
        return
    base = None
    print(f"fp32 EMA-teacher bytes per rank, preset {args.preset}, {args.ds_config}")
    for nproc, tp in ((1, 1), (2, 1), (4, 1), (4, 2)):
        sizes = measure(args.preset, args.ds_config, nproc, tp)
        base = base or max(sizes)
        print(f"  tp={tp} dp={nproc // tp}: max {max(sizes):>10,d} B per rank  "
              f"(ratio to dp=1: {max(sizes) / base:.3f})  all ranks: {sizes}")


if __name__ == "__main__":
    main()
