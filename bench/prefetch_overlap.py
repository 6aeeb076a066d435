"""Step time with and without reading the next step's images ahead (``data.prefetch_steps``).

The same :class:`d2v2scale.data.loader.StepLoader` over the same JPEGs (DALI CPU decode, random
resized crop to 224²) feeds a stand-in for the training step: single-threaded matrix products
calibrated to take as long as loading one step's batch, the case where overlap matters most. With
``prefetch_steps=0`` a step costs load + compute; with read-ahead it should approach the larger
of the two.

    python bench/prefetch_overlap.py [--images 192] [--batch 16] [--steps 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loader_images import make_images  # noqa: E402
from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.data.loader import StepLoader  # noqa: E402
from d2v2scale.data.schedule import RankSchedule  # noqa: E402


def compute(reps: int, a: torch.Tensor) -> torch.Tensor:
    for _ in range(reps):
        a = torch.tanh(a @ a)
    return a


def seconds_per_step(loader: StepLoader, steps: int, reps: int, a: torch.Tensor) -> float:
    loader.step(0)  # warm-up; the read-ahead of step 1 starts here
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loader.step(step)
        compute(reps, a)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)  # the step's own thread; DALI decodes on one more
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images)
        cfg = load_config("tiny_image", ["data.kind=images", f"data.path={tmp}", "model.img_size=224",
                                         "data.num_workers=1", f"train.max_updates={args.steps + 2}"])
        schedule = RankSchedule(args.batch, args.batch, 1, 0, 1)
        loaders = {k: StepLoader(cfg, schedule, torch.device("cpu"), torch.float32, verbose=False, prefetch_steps=k)
                   for k in (0, 1)}
        loaders[0].step(0)  # warm-up
        t0 = time.perf_counter()
        for step in range(1, 4):
            loaders[0].step(step)
        load = (time.perf_counter() - t0) / 3
        a = torch.randn(384, 384) / 20
        t0 = time.perf_counter()
        compute(20, a)
        reps = max(1, round(20 * load / (time.perf_counter() - t0)))
        t0 = time.perf_counter()
        compute(reps, a)
        busy = time.perf_counter() - t0
        sync, ahead = (seconds_per_step(loaders[k], args.steps, reps, a) for k in (0, 1))
        for loader in loaders.values():
            loader.close()
    print(f"{args.batch} JPEGs (~500x375) → 224² per step, DALI on 1 CPU thread, step compute on 1 thread:")
    print(f"  load one step:            {load * 1e3:8.1f} ms")
    print(f"  compute one step:         {busy * 1e3:8.1f} ms")
    print(f"  step, prefetch_steps=0:   {sync * 1e3:8.1f} ms")
    print(f"  step, prefetch_steps=1:   {ahead * 1e3:8.1f} ms   (ideal: {max(load, busy) * 1e3:.1f})")
    print(f"  speed-up from read-ahead: {sync / ahead:8.2f}x")


if __name__ == "__main__":
    main()
