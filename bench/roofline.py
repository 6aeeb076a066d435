"""A roofline of the training step users run, predicted for a GPU from one CPU process.

One step of the real path - the DeepSpeed backend built from the JSON, the sharded EMA teacher,
student, decoder, losses, backward, clipping, AdamW, EMA update - runs under
:class:`d2v2scale.profiling.roofline.OpCounter` after one warm-up step; every aten op is a kernel
with its FLOPs and bytes, predicted on ``--device`` as max(FLOPs/peak, bytes/bandwidth) + launch.
Full-size models are counted at depth 1 and 2 and extrapolated to the preset's depth (every cost
of the step is affine in the depth), so ``vit_h`` fits a laptop. A bf16 JSON is run in fp32 on
the CPU (CPU bf16 matmuls are ~50× slower than fp32) and predicted as bf16: fp32 bytes count half,
except the optimizer's and the EMA's (fp32 masters and moments stay fp32) - an estimate, said so.
Prints kernels, predicted time and the MFU bound per phase, the ten most expensive op groups and
what bounds them, the host syncs, and with ``--compiled`` the kernels per phase of the
``model.compile=true`` step (``profiling/kernel_trace``: what inductor leaves separate; the eager
step traced the same way, which agrees with the dispatch count) and the host's time in the compiled
step and with its regions replayed as CUDA graphs (``model.cuda_graphs=true``): the ops it still
dispatches outside the regions, the region calls and, without graphs, the kernel launches from them.

    python bench/roofline.py --preset vit_h --micro 8 [--device h100-80gb|a100-40gb|h200] [--json out.json] [overrides]
    python bench/roofline.py --preset tiny_image --micro 8 --ds_config ds_configs/cpu_tiny.json --depths 0 --compiled
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from d2v2scale.cli import fail  # noqa: E402
from d2v2scale.config import ConfigError, load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.run_spec import load_ds_config  # noqa: E402
from d2v2scale.profiling.flops import StepShape, step_flops  # noqa: E402
from d2v2scale.profiling.kernel_trace import HostWork, kernel_ranges  # noqa: E402
from d2v2scale.profiling.roofline import (  # noqa: E402
    DEVICES, SYNC, ZERO, OpCounter, Prediction, bf16_scale, predict)
from d2v2scale.profiling.timers import PHASES  # noqa: E402
from d2v2scale.train.engine import train_step  # noqa: E402
from efficiency import HOST, one_rank_config, one_rank_ds, traced, warm_trainer  # noqa: E402  (bench/)

ORDER = (*PHASES[1:], "other")


def count_step(cfg, ds: dict, dims, device) -> tuple[OpCounter, dict, tuple[Counter, HostWork]]:
    """The second step of a fresh trainer, counted by the dispatch mode; its shape; the third, traced."""
    tr = warm_trainer(cfg, ds, dims, device, warmup=1)
    counter = OpCounter()
    tr.timer, tr.model.phase = counter, counter.phase
    with counter:
        train_step(tr, 1)
    trace = traced(tr, 2)
    tr.loader.close()
    return counter, dict(tr.last_shape), trace


def compiled_kernels(cfg, ds: dict, dims, device) -> tuple[Counter, HostWork]:
    """Kernels per (phase, op) of a ``model.compile=true`` step - what inductor leaves separate - and
    the host's work in it."""
    cfg = copy.deepcopy(cfg)
    cfg.model.compile = True
    with kernel_ranges():
        tr = warm_trainer(cfg, ds, dims, device, warmup=3)  # compiles; audio recompiles dynamic once
        trace = traced(tr, 3)
    tr.loader.close()
    return trace


def per_phase(trace: Counter) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for (phase, _), n in trace.items():
        if phase != HOST:
            out[phase] += n
    return out


def host_times(runs: list, host_ops: float, args, steps: int) -> dict[str, float]:
    """The host's time per step, eager, compiled and with CUDA graphs. The ops the compiled step still
    dispatches outside its regions are the dispatch count scaled by what the trace sees of them
    (the trace counts calls, the dispatch mode the ops they become: the ratio is the same)."""
    work = {key: extrapolated([{f: getattr(run[i][1], f) for f in ("eager_ops", "region_calls", "region_kernels")}
                               for run in runs], steps) for key, i in (("eager", 2), ("compiled", 3))}
    outside = host_ops * work["compiled"]["eager_ops"] / work["eager"]["eager_ops"]
    graphs = outside * args.host_us * 1e-6 + work["compiled"]["region_calls"] * args.region_us * 1e-6
    return {"eager": host_ops * args.host_us * 1e-6, "graphs": graphs, "outside_ops": outside,
            "compiled": graphs + work["compiled"]["region_kernels"] * args.launch_host_us * 1e-6, **work["compiled"]}


def predictions(counter: OpCounter, device, bf16: bool) -> dict[tuple[str, str], Prediction]:
    return {key: predict(group, device, bf16_scale(key[0]) if bf16 else 1.0)
            for key, group in counter.groups.items() if key[0] != HOST}


def extrapolated(counts: list[dict[str, int]], steps: int) -> dict[str, float]:
    """Per-phase counts at the preset's depth: the one count, or the depth-1 count plus ``steps`` × the
    per-block difference (counts are affine in the depth)."""
    if len(counts) == 1:
        return dict(counts[0])
    lo, hi = counts
    return {ph: lo.get(ph, 0) + steps * (hi.get(ph, 0) - lo.get(ph, 0)) for ph in set(lo) | set(hi)}


def calibration_file(path: Path, gpu: str) -> dict:
    """The predicted calibration of ``gpu`` in ``path`` (new if absent); checked before any counting."""
    if not path.is_file():
        return {"gpu": gpu, "predicted": True, "points": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--calibration {path} is not valid JSON: {e.msg}") from None
    if data.get("gpu") != gpu or not data.get("predicted"):
        raise ConfigError(f"--calibration {path} holds {'measured' if not data.get('predicted') else data.get('gpu')} "
                          f"points; write predicted {gpu} points to another file")
    return data


def add_point(path: Path, gpu: str, point: dict) -> None:
    """Add (or replace, same preset and micro-batch) a predicted point in a calibration file."""
    data = calibration_file(path, gpu)
    same = (point["preset"], point["micro_batch"])
    data["points"] = [q for q in data["points"] if (q["preset"], q["micro_batch"]) != same] + [point]
    path.write_text(json.dumps(data, indent=1))


def predict_step(runs: list, dev, bf16: bool, steps: int) -> tuple[dict, dict, Prediction]:
    """Op groups, phases and the total on ``dev``, extrapolated ``steps`` blocks past the first count."""
    groups = predictions(runs[0][0], dev, bf16)
    if len(runs) == 2:
        deeper = predictions(runs[1][0], dev, bf16)
        groups = {k: groups.get(k, ZERO).extrapolate(deeper.get(k, ZERO), steps) for k in set(groups) | set(deeper)}
    phases = {ph: ZERO for ph in ORDER}
    for (phase, _), pred in groups.items():
        phases[phase] = phases.get(phase, ZERO) + pred
    return groups, phases, sum(phases.values(), ZERO)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_image")
    p.add_argument("--micro", type=int, default=8, help="items per micro-batch (audio: samples, data.max_tokens)")
    p.add_argument("--ds_config", default=None, help="default: the preset's shipped JSON")
    p.add_argument("--device", default="h100-80gb",
                   help=f"one of {', '.join(sorted(DEVICES))} (also the planner's GPU names), or several, comma-"
                        "separated: the first in full, the others in a line each")
    p.add_argument("--depths", default="auto", help="auto: count at depth 1 and 2 and extrapolate; 0: the preset's")
    p.add_argument("--host_us", type=float, default=20.0,
                   help="host time per dispatched op in eager mode (an assumption until calibrated on a GPU)")
    p.add_argument("--compiled", action="store_true",
                   help="also count the kernels and the host's work of the model.compile=true step (compiles on the "
                        "CPU: minutes), and predict it with and without CUDA graphs")
    p.add_argument("--region_us", type=float, default=40.0,
                   help="host time per compiled-region call: guards, the runtime wrapper, a graph replay (assumed)")
    p.add_argument("--launch_host_us", type=float, default=5.0,
                   help="host time per kernel launched from compiled code without CUDA graphs (assumed)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--calibration", default=None,
                   help="add the predicted step to this calibration.json (for plan --calibration; marked "
                        "predicted: the host's cost per op is --host_us)")
    p.add_argument("--calibrate_as", default="eager", choices=("eager", "compiled", "graphs", "kernels"),
                   help="eager, compiled, graphs (these two need --compiled): the slower of the kernels and the "
                        "host in that mode; kernels: the kernels alone (no host cost)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    try:
        if args.calibrate_as in ("compiled", "graphs") and not args.compiled:
            raise ConfigError(f"--calibrate_as {args.calibrate_as} predicts the compiled step: add --compiled")
        unknown = [d for d in args.device.split(",") if d not in DEVICES]
        if unknown:
            raise ConfigError(f"--device {','.join(unknown)}: expected one of {', '.join(sorted(DEVICES))}")
        base = load_config(args.preset, ["data.kind=synthetic", "data.prefetch_steps=0", *args.overrides])
        ds = load_ds_config(args.ds_config or str(ROOT / "ds_configs" / f"{base.preset}.json"))
        if args.calibration:
            calibration_file(Path(args.calibration), args.device.split(",")[0])
    except ConfigError as e:
        return fail("roofline", e)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dims, device = init_distributed(1)
    target = base.model.depth
    depths = [target] if args.depths == "0" or target <= 2 else [1, 2]
    runs = []
    for depth in depths:
        cfg = one_rank_config(args.preset, args.micro, [
            "data.prefetch_steps=0", *args.overrides, f"model.depth={depth}",
            f"model.average_top_k_layers={min(base.model.average_top_k_layers, depth)}"])
        run_ds = one_rank_ds(ds, bf16=False)  # see the module docstring: bf16 is predicted, not run
        runs.append((*count_step(cfg, run_ds, dims, device),
                     compiled_kernels(cfg, run_ds, dims, device) if args.compiled else None))
    devices = [DEVICES[name] for name in args.device.split(",")]
    dev = devices[0]
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    groups, phases, total = predict_step(runs, dev, bf16, target - depths[0])
    shape = runs[0][1]
    dtype = "bf16 (run in fp32, bytes scaled)" if bf16 else "fp32"
    how = f"counted at depth {depths[0]} and {depths[1]}, extrapolated to {target}" if len(runs) == 2 else \
        f"counted at depth {target}"
    print(f"roofline of {base.preset}: {shape['samples']} samples × M={base.model.clone_batch}, T={shape['positions']} "
          f"(kept {shape['kept']}), {dtype}, eager; {dev.name} ({dev.peak_flops / 1e12:.0f} TFLOP/s, "
          f"{dev.bandwidth / 1e12:.2f} TB/s, {dev.launch_s * 1e6:.0f} µs/kernel); {how}")
    print(f"  {'phase':<14}{'kernels':>9}{'GFLOP':>11}{'GB':>9}{'time ms':>10}{'MFU ≤':>8}  bound")
    for name, pred in [*phases.items(), ("total", total)]:
        if pred.kernels or name == "total":
            print(f"  {name:<14}{pred.kernels:>9.0f}{pred.flops / 1e9:>11.1f}{pred.bytes / 1e9:>9.2f}"
                  f"{pred.time_s * 1e3:>10.3f}{pred.mfu(dev):>8.1%}  {pred.bound}")
    print("  the ten most expensive op groups:")
    top = sorted(groups.items(), key=lambda kv: -kv[1].time_s)[:10]
    for (phase, op), pred in top:
        print(f"    {phase:<13} {op:<44} {pred.kernels:>7.0f} kernels {pred.time_s * 1e3:8.3f} ms "
              f"({pred.time_s / total.time_s:5.1%}) {pred.bound}-bound")
    host_ops = sum(n for phase, n in runs[0][0].host_ops.items() if phase != HOST)
    if len(runs) == 2:
        deeper_ops = sum(n for phase, n in runs[1][0].host_ops.items() if phase != HOST)
        host_ops = host_ops + (target - depths[0]) * (deeper_ops - host_ops)
    host_s = host_ops * args.host_us * 1e-6
    print(f"  host: {host_ops:.0f} ops dispatched per step (views included); at {args.host_us:g} µs each "
          f"{host_s * 1e3:.1f} ms, {'above' if host_s > total.time_s else 'below'} the kernels' "
          f"{total.time_s * 1e3:.1f} ms: the eager step is {'host' if host_s > total.time_s else 'GPU'}-bound")
    flops = step_flops(base, StepShape(shape["samples"], shape["positions"], shape["kept"]), shape["input_len"])
    kernels_on = {other.name: total.time_s if other is dev else  # each device's eager kernels, predicted once
                  predict_step(runs, other, bf16, target - depths[0])[2].time_s for other in devices}
    for other in devices:
        kernels_s = kernels_on[other.name]
        print(f"  {other.name}: kernels {kernels_s * 1e3:.1f} ms (MFU ≤ {flops / (kernels_s * other.peak_flops):.1%} "
              f"of the step's {flops / 1e12:.2f} model TFLOP); eager with the host at {args.host_us:g} µs/op "
              f"{max(kernels_s, host_s) * 1e3:.1f} ms, MFU {flops / (max(kernels_s, host_s) * other.peak_flops):.1%}")
    syncs = runs[-1][0].syncs
    where = {phase: g.calls for (phase, op), g in runs[-1][0].groups.items() if op == SYNC}
    print(f"  host syncs per step: {syncs} (each stalls the GPU's queue): "
          + ", ".join(f"{phase} {n}" for phase, n in where.items()))
    traced_eager = extrapolated([per_phase(run[2][0]) for run in runs], target - depths[0])
    compiled = extrapolated([per_phase(run[3][0]) for run in runs], target - depths[0]) if args.compiled else {}
    steps_s = {"eager": max(total.time_s, host_s), "kernels": total.time_s}  # a step waits for the slower
    host = {}
    if compiled:
        n_compiled, n_eager = sum(compiled.values()), sum(traced_eager.values())
        print(f"  compiled (model.compile=true; the kernels CPU inductor leaves separate): {n_compiled:.0f} kernels "
              f"a step, {n_eager:.0f} eager (launches alone {n_compiled * dev.launch_s * 1e3:.1f} vs "
              f"{n_eager * dev.launch_s * 1e3:.1f} ms):")
        print("    " + ", ".join(f"{ph} {traced_eager.get(ph, 0):.0f} → {compiled.get(ph, 0):.0f}"
                                 for ph in ORDER if traced_eager.get(ph) or compiled.get(ph)))
        host = host_times(runs, host_ops, args, target - depths[0])
        print(f"  host, compiled: {host['outside_ops']:.0f} ops still dispatched outside the regions, "
              f"{host['region_calls']:.0f} region calls, {host['region_kernels']:.0f} kernels launched from them "
              f"(at {args.host_us:g} / {args.region_us:g} / {args.launch_host_us:g} µs each): "
              f"{host['compiled'] * 1e3:.1f} ms; replayed as CUDA graphs (no launches from the host): "
              f"{host['graphs'] * 1e3:.1f} ms")
        for other in devices:  # fused kernels: the eager kernel time less the launches fusion removed
            kernels_s = kernels_on[other.name] - (n_eager - n_compiled) * other.launch_s
            line = []
            for mode in ("compiled", "graphs"):
                step_s = max(kernels_s, host[mode])
                line.append(f"{mode} {step_s * 1e3:.1f} ms ({'host' if host[mode] > kernels_s else 'GPU'}-bound, "
                            f"MFU {flops / (step_s * other.peak_flops):.1%})")
                if other is dev:
                    steps_s[mode] = step_s
            print(f"  {other.name}: kernels {kernels_s * 1e3:.1f} ms; " + ", ".join(line))
    if args.calibration:
        step_s = steps_s[args.calibrate_as]
        add_point(Path(args.calibration), args.device.split(",")[0], {
            "preset": base.preset, "micro_batch": args.micro, "flops_per_micro_batch": flops, "step_s": step_s,
            "efficiency": flops / (step_s * dev.peak_flops), "predicted_as": args.calibrate_as})
    if args.json:
        rows = {name: {"kernels": pred.kernels, "flops": pred.flops, "bytes": pred.bytes, "time_s": pred.time_s,
                       "mfu_bound": pred.mfu(dev), "bound": pred.bound, "traced_kernels": traced_eager.get(name, 0),
                       **({"compiled_kernels": compiled.get(name, 0)} if compiled else {})}
                for name, pred in phases.items()}
        Path(args.json).write_text(json.dumps({"preset": base.preset, "device": args.device, "shape": shape,
                                               "depths": depths, "phases": rows, "total_s": total.time_s,
                                               "host_ops": host_ops, "syncs": syncs, "step_s": steps_s,
                                               "host_ops_counted": [dict(run[0].host_ops) for run in runs],
                                               "host_compiled": host}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
