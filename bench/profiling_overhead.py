"""What profiling costs, measured in one run on a tiny preset (one CPU thread).

- *off*: the phase hooks stay in the step as one shared no-op context manager; their cost is the
  number of hook calls per step × the measured cost of one no-op enter/exit, as a share of the step;
- *on*: step time with the phase timers recording, against the same steps with them off
  (interleaved round-robin).

    python bench/profiling_overhead.py [--preset tiny_image] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.data.synthetic import synthetic_batch  # noqa: E402
from d2v2scale.model import Data2Vec2, normalize_loss  # noqa: E402
from d2v2scale.profiling.timers import StepTimer  # noqa: E402
from d2v2scale.train.teacher import build_teacher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_image")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    teacher = build_teacher(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    source = synthetic_batch(cfg, 8, torch.Generator().manual_seed(0))
    timers = {"off": StepTimer(torch.device("cpu"), enabled=False), "on": StepTimer(torch.device("cpu"), enabled=True)}
    calls = {"n": 0}
    targets = model.teacher_fn(teacher.module)

    def step(timer: StepTimer, k: int) -> float:
        def counted(name):
            calls["n"] += 1
            return timer.phase(name)

        t0 = time.perf_counter()
        with counted("data"):
            mask = model.make_mask(0, k, torch.arange(8), source)
        model.phase = counted  # how a profiler times the model's phases: from outside
        out = model(source, targets, mask)
        with counted("backward"):
            opt.zero_grad(set_to_none=True)
            normalize_loss(out).backward()
        with counted("optimizer"):
            opt.step()
        with counted("ema"):
            teacher.update(k + 1, model)
        timer.end_step()
        return time.perf_counter() - t0

    times = {"off": [], "on": []}
    for k in range(args.steps + 3):
        for name, timer in timers.items():
            t = step(timer, k)
            if k >= 3:
                times[name].append(t)
    hooks_per_step = calls["n"] // (2 * (args.steps + 3))
    noop = timers["off"].phase("x")
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        with noop:
            pass
    per_call = (time.perf_counter() - t0) / n
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{args.preset}, batch 8, median of {args.steps} steps (1 CPU thread):")
    print(f"  step time, profiling off: {off * 1e3:.2f} ms; on: {on * 1e3:.2f} ms (on/off ×{on / off:.3f})")
    print(f"  profiling off: {hooks_per_step} no-op hooks per step × {per_call * 1e9:.0f} ns = "
          f"{hooks_per_step * per_call * 1e6:.1f} µs = {100 * hooks_per_step * per_call / off:.4f} % of the step")


if __name__ == "__main__":
    main()
