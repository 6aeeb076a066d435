"""Full-depth step efficiency on the path users run: the DeepSpeed backend built from the preset's
JSON, one rank, bf16 as the JSON says; compiled (``model.compile=true``), compiled and replayed as
CUDA graphs (``model.cuda_graphs=true``: ``graphs``), compiled on the FSDP2 backend from the same JSON
(``fsdp2``: the roofline predicts it dispatches about half of DeepSpeed's host ops) and eager.

Per run: the step time (mean of ``--steps`` after warm-up; wall clock around a device sync), MFU
(the analytic model FLOPs of the step, ``profiling/flops``, over time × the device's dense peak),
the phase split (the engine's own phase timers: CUDA events on a GPU), and the kernels of one step
(on CUDA the device-side events of a ``torch.profiler`` step; on the CPU the trace count of
``profiling/kernel_trace``, compiled kernels included). Per preset and mode with two or more micro-batch
sizes, the fixed cost per micro-batch: the intercept of a least-squares line of step time against
the micro-batch size (one micro-batch a step, so the intercept is what a step costs with no
samples: launches, optimizer, EMA, host work). Writes ``calibration.json`` (the planner's points:
the eager or compiled run of each shape, whichever ``--calibrate_with`` says; every run is kept
under ``runs``).

    python bench/gpu_check.py --efficiency                       # vit_h 8/4/2/1, vit_l 8, audio_large
    python bench/efficiency.py --runs vit_b:8/16 --modes compiled --out calibration.json
    python bench/efficiency.py --device cpu --runs tiny_image:1/2/4 --ds_config ds_configs/cpu_tiny.json

``--runs`` is ``preset:micro/micro,...``; a micro-batch of 0 is the preset's own (audio: one
``data.max_tokens`` budget of samples). Runs go in order - each micro-batch in every mode, then the
next - until ``--budget_s`` is spent; what ran is written either way.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale import modality_registry  # noqa: E402
from d2v2scale.cli import fail  # noqa: E402
from d2v2scale.config import ConfigError, load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.profiling.kernel_trace import LOADER, HostWork, kernel_ranges, step_kernels  # noqa: E402
from d2v2scale.profiling.timers import StepTimer  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402

DEFAULT_RUNS = "vit_h:8/4/2/1,vit_l:8,audio_large:0"  # the goal's run first: a short loan still gets it
MODES = {"eager": (), "compiled": ("model.compile=true",),  # mode → its config overrides
         "graphs": ("model.compile=true", "model.cuda_graphs=true"),
         "fsdp2": ("model.compile=true", "parallel.backend=fsdp2")}  # the roofline's fewer-host-ops path
HOST = LOADER  # "data": the loader's work, host-side in a GPU run


def parse_runs(text: str) -> list[tuple[str, list[int]]]:
    """``vit_h:1/2/4/8,audio_large:0`` as [(preset, [micro, ...]), ...]; unknown presets fail here."""
    runs = []
    for spec in filter(None, text.split(",")):
        preset, _, micros = spec.partition(":")
        sizes = micros.split("/") if micros else ["0"]
        if not all(s.isdigit() for s in sizes):
            raise ValueError(f"--runs {spec!r}: expected preset:micro/micro..., e.g. vit_h:1/2/4/8 (0: the preset's)")
        load_config(preset)
        runs.append((preset, [int(s) for s in sizes]))
    return runs


def one_rank_config(preset: str, micro: int, overrides: list[str]):
    """The preset as one rank runs it: ``micro`` items per micro-batch (0: the preset's), one micro-batch a step."""
    cfg = load_config(preset, ["data.kind=synthetic", *overrides])
    budget_key = modality_registry.get(cfg.model.modality).budget_key
    budgeted = budget_key and modality_registry.batch_budget(cfg) is not None  # audio: micro-batch = sample budget
    if micro and budgeted:
        cfg.set_value(f"data.{budget_key}", micro)
    cfg.train.global_batch = modality_registry.batch_budget(cfg) if budgeted else (micro or cfg.train.global_batch)
    return cfg


def one_rank_ds(ds: dict, bf16: bool | None = None) -> dict:
    """The JSON for one rank running one micro-batch a step; ``bf16`` overrides the JSON's choice."""
    out = {**copy.deepcopy(ds), "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": 1}
    if bf16 is not None:
        out["bf16"] = {**out.get("bf16", {}), "enabled": bf16}
    return out


def warm_trainer(cfg, ds: dict, dims, device, warmup: int):
    """A fresh one-rank trainer after ``warmup`` steps (first-step work - optimizer state, lazy
    buffers, compilation, audio's one dynamic recompile - is not a step's)."""
    plan = plan_batch(ds, cfg, 1)
    tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
    tr.model.train()
    for step in range(warmup):
        train_step(tr, step)
    return tr


def traced(tr, step: int) -> tuple[Counter, HostWork]:
    """Kernels per (phase, op) of one step and the host's work in it, from a CPU profiler trace
    (``profiling/kernel_trace``)."""
    def run(marks):
        tr.timer, tr.model.phase = marks, marks.phase
        train_step(tr, step)
    return step_kernels(run)


def device_kernels(tr, step: int, device: torch.device) -> int:
    """Kernels of one step: the device-side events of a profiled step on CUDA; on the CPU the
    trace count (``profiling/kernel_trace``: generated kernels and aten kernels, the loader's host
    work left out)."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train_step(tr, step)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(n for (phase, _), n in traced(tr, step)[0].items() if phase != HOST)


def time_run(cfg, ds: dict, dims, device, steps: int, warmup: int) -> dict:
    """One fresh trainer: ``warmup`` steps, one step counting kernels, ``steps`` timed steps."""
    tr = warm_trainer(cfg, ds, dims, device, warmup)
    kernels = device_kernels(tr, warmup, device)
    timer = StepTimer(device, enabled=True)
    tr.timer, tr.model.phase = timer, timer.phase
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    flops = 0.0
    for step in range(warmup + 1, warmup + 1 + steps):
        flops = train_step(tr, step).flops
    sync()
    step_s = (time.perf_counter() - t0) / steps
    rows = timer.resolve()
    phases = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in sorted({k for r in rows for k in r})}
    shape = dict(tr.last_shape)
    tr.loader.close()
    peak = tr.peak_flops
    return {"step_s": step_s, "flops_per_micro_batch": flops, "peak_flops": peak,
            "efficiency": flops / (step_s * peak) if peak else None, "phases_s": phases, "kernels": kernels,
            "shape": shape}


def fixed_cost(runs: list[dict]) -> dict[str, dict]:
    """Per preset and mode: intercept and slope of step time against micro-batch size (≥ 2 sizes)."""
    out = {}
    for key in sorted({(r["preset"], r["mode"]) for r in runs}):
        pts = [(r["micro_batch"], r["step_s"]) for r in runs if (r["preset"], r["mode"]) == key]
        if len({m for m, _ in pts}) >= 2:
            slope, intercept = np.polyfit([m for m, _ in pts], [t for _, t in pts], 1)
            out[f"{key[0]}/{key[1]}"] = {"fixed_s_per_micro_batch": float(intercept), "s_per_item": float(slope)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="preset:micro/micro,... (0: the preset's micro-batch)")
    p.add_argument("--modes", default="compiled,graphs,fsdp2,eager",
                   help="eager; compiled: model.compile=true; graphs: also model.cuda_graphs=true; fsdp2: compiled "
                        "on the FSDP2 backend (the same JSON)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ds_config", default=None, help="default: each preset's shipped JSON")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget_s", type=float, default=420.0, help="start no run after this many seconds")
    p.add_argument("--calibrate_with", default="compiled", choices=sorted(MODES))
    p.add_argument("--gpu", default=None, help="the planner's GPU name for calibration.json (default: detected)")
    p.add_argument("--out", default="calibration.json")
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = p.parse_args(argv)
    try:
        runs = parse_runs(args.runs)
        modes = [m for m in args.modes.split(",") if m]
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"--modes {args.modes!r}: expected a comma list of {sorted(MODES)}")
        shipped = {preset: load_ds_config(args.ds_config or str(ROOT / "ds_configs" / f"{preset}.json"))
                   for preset, _ in runs}
    except (ValueError, ConfigError) as e:
        return fail("efficiency", e)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("efficiency: needs a CUDA GPU (torch.cuda.is_available() is False here); --device cpu runs it on the CPU")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    dims, device = init_distributed(1)
    gpu = args.gpu or (gpu_name() if device.type == "cuda" else "cpu")
    start, results = time.perf_counter(), []
    print(f"efficiency on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'} ({gpu}), torch "
          f"{torch.__version__}; the preset's JSON on the DeepSpeed backend (mode fsdp2: FSDP2), one rank, "
          f"mean of {args.steps} steps after {args.warmup}", flush=True)
    print("| preset | micro | mode | step ms | MFU | kernels | phases ms |\n|---|---|---|---|---|---|---|", flush=True)
    for preset, micros in runs:
        for micro in micros:  # the first micro-batch in every mode first: a short loan gets the goal's row
            for mode in modes:
                if time.perf_counter() - start > args.budget_s:
                    print(f"  budget of {args.budget_s:.0f} s spent: {preset} {mode} micro {micro} not run", flush=True)
                    continue
                torch._dynamo.reset()  # each run compiles its own (inductor's on-disk cache keeps a repeat short)
                cfg = one_rank_config(preset, micro, [*MODES[mode], *args.overrides])
                ranges = kernel_ranges() if device.type == "cpu" else contextlib.nullcontext()  # CPU: trace kernels
                try:
                    with ranges:
                        row = time_run(cfg, one_rank_ds(shipped[preset]), dims, device, args.steps,
                                       args.warmup + (1 if MODES[mode] else 0))
                except Exception as e:  # noqa: BLE001 - one failed run must not cost a short GPU loan the others
                    row, why = None, "out of memory" if isinstance(e, torch.OutOfMemoryError) else \
                        f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                gc.collect()  # the trainer's memory, before the next one is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if row is None:
                    print(f"| {preset} | {micro} | {mode} | {why} | | | |", flush=True)
                    continue
                row = {"preset": preset, "micro_batch": cfg.train.global_batch, "mode": mode,
                       "backend": cfg.parallel.backend, **row}
                results.append(row)
                split = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["phases_s"].items())
                mfu = f"{row['efficiency']:.1%}" if row["efficiency"] is not None else "n/a"
                print(f"| {preset} | {row['micro_batch']} | {mode} | {row['step_s'] * 1e3:.1f} | {mfu} | "
                      f"{row['kernels'] if row['kernels'] is not None else 'n/a'} | {split} |", flush=True)
    fixed = fixed_cost(results)
    for key, fit in fixed.items():
        print(f"  {key}: fixed cost per micro-batch {fit['fixed_s_per_micro_batch'] * 1e3:.1f} ms "
              f"(+{fit['s_per_item'] * 1e3:.2f} ms an item)")
    keys = ("preset", "micro_batch", "flops_per_micro_batch", "step_s", "efficiency")
    points = [{k: r[k] for k in keys} for r in results
              if r["mode"] == args.calibrate_with and r["efficiency"] is not None]
    Path(args.out).write_text(json.dumps({
        "gpu": gpu, "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d"), "path": "the preset's JSON, one rank",
        "points": points, "fixed_cost": fixed, "runs": results}, indent=1))
    print(f"wrote {args.out} ({len(points)} {args.calibrate_with} points): "
          f"python -m d2v2scale.plan --calibration {args.out} ...")
    return 0


def gpu_name() -> str:
    """The planner's name for this GPU (plan --gpu / cluster profile ``gpu``)."""
    props = torch.cuda.get_device_properties(0)
    name, gb = props.name.upper(), props.total_memory / 1e9
    for tag, key in (("A100", "a100-80gb" if gb > 50 else "a100-40gb"), ("H200", "h200"), ("H100", "h100-80gb"),
                     ("V100", "v100-32gb")):
        if tag in name:
            return key
    raise SystemExit(f"efficiency: unknown GPU {props.name!r}; add its bf16 peak to profiling/flops.py PEAK_FLOPS")


if __name__ == "__main__":
    sys.exit(main())
