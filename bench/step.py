"""Step time of our data2vec 2.0 step vs deliberately naive variants, measured side by side.

All variants do forward + backward + AdamW + EMA for the same batch of a tiny preset, in this one
process, interleaved round-robin so machine noise hits them alike:

- ``ours``: local encoder and teacher once per sample, student on the kept tokens of M views;
- ``encode_all_tokens``: the student encodes all T positions of every view (BEiT/data2vec-1 style
  cost; the masked positions still carry their features — only the cost is of interest);
- ``M=1_repeated_M_times``: M separate single-mask steps, each with its own teacher pass;
- ``teacher_per_clone``: the local encoder and the teacher run once per masked view instead of once
  per sample (the views are fed as separate samples);
- ``ours+watchdog``: ``ours`` with the hang watchdog as training runs it (rank 0's heartbeat write
  after the step, its thread polling once a second), the thread started and stopped around each
  step so that it runs during this variant only: an upper bound, since training starts it once.
  The cost of one ``beat`` is printed too.

    python bench/step.py [--preset tiny_image] [--batch 8] [--steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.data.synthetic import synthetic_batch  # noqa: E402
from d2v2scale.model import Data2Vec2, normalize_loss  # noqa: E402
from d2v2scale.model.masking import MaskInfo  # noqa: E402
from d2v2scale.resilience.watchdog import Watchdog  # noqa: E402
from d2v2scale.train.teacher import build_teacher  # noqa: E402


def make(cfg):
    torch.manual_seed(0)
    model = Data2Vec2(cfg.model_spec()).train()
    return model, build_teacher(model, cfg), torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, teacher, opt, source, mask, step):
    loss = normalize_loss(model(source, model.teacher_fn(teacher.module), mask))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    teacher.update(step + 1, model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_image")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.preset)
    m = cfg.model.clone_batch
    single = load_config(args.preset, ["model.clone_batch=1"])
    source = synthetic_batch(cfg, args.batch, torch.Generator().manual_seed(0))
    ids = torch.arange(args.batch)

    ours = make(cfg)
    all_tok = make(cfg)
    repeated = make(single)
    per_clone = make(single)

    def run_ours(step):
        train_step(*ours, source, ours[0].make_mask(0, step, ids, source), step)

    def run_all_tokens(step):
        mask = all_tok[0].make_mask(0, step, ids, source)
        rows, length = mask.mask.shape
        every = torch.arange(length).expand(rows, length)
        train_step(*all_tok, source, MaskInfo(mask.mask, every), step)

    def run_repeated(step):
        for k in range(m):
            train_step(*repeated, source, repeated[0].make_mask(0, step * m + k, ids, source), step * m + k)

    def run_per_clone(step):
        cloned = source.repeat_interleave(m, 0)
        train_step(*per_clone, cloned, per_clone[0].make_mask(0, step, torch.arange(len(cloned)), cloned), step)

    watched = make(cfg)
    run_dir = tempfile.TemporaryDirectory(prefix="bench-watchdog-")  # its heartbeat file; removed at exit
    watchdog = Watchdog(Path(run_dir.name), 0, "bench", None, 1800.0, heartbeat=True)

    def run_watched(step):  # the thread runs during this variant only (starting it is charged to it)
        watchdog.start()
        train_step(*watched, source, watched[0].make_mask(0, step, ids, source), step)
        watchdog.beat(step + 1)
        watchdog.stop()

    variants = {"ours": run_ours, "ours+watchdog": run_watched, "encode_all_tokens": run_all_tokens,
                "M=1_repeated_M_times": run_repeated, "teacher_per_clone": run_per_clone}
    times = {k: [] for k in variants}
    for step in range(args.steps + 2):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(step)
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(10_000):
        watchdog.beat(i)
    beat_us = (time.perf_counter() - t0) / 10_000 * 1e6
    watchdog.close()
    run_dir.cleanup()
    base = statistics.median(times["ours"])
    print(f"{args.preset}: batch {args.batch} × M={m}, median step time over {args.steps} steps (1 CPU thread)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<22} {med * 1e3:8.1f} ms   ×{med / base:5.2f} vs ours")
    print(f"  one watchdog beat (heartbeat write included): {beat_us:.1f} µs")


if __name__ == "__main__":
    main()
