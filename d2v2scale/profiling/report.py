"""The after-the-fact report: ``RUN/report/report.md``, ``report.json`` and PNG plots.

:func:`build_report` reads ``metrics.jsonl`` and, when the run was profiled, the raw measurements
:mod:`.profiler` left in ``RUN/report/profile.json``; ``python -m d2v2scale.report RUN`` rebuilds
it at any time (also for runs without ``--profile``: the sections that need the raw measurements
then say so). It reads files only, never a live run.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from .. import runfiles
from ..atomic import write_text
from ..config import config_from_dict
from ..resilience.events import read_events
from ..resilience.goodput import Goodput, account
from ..resilience.goodput import render as render_goodput
from ..runfiles import as_json, as_number, read_metrics
from .flops import StepShape, forward_flops
from .timers import PHASES

WARMUP_STEPS = 2  # excluded from phase statistics (allocator and thread-pool warm-up)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None}
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "p50": ordered[len(ordered) // 2],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def phase_table(phases_per_rank: list[list[dict]]) -> dict:
    """Per phase: mean/p50/p90 seconds over steps (after warm-up) and ranks, and share of the step."""
    rows = [step for rank in phases_per_rank for step in rank[WARMUP_STEPS:]] or \
        [step for rank in phases_per_rank for step in rank]
    totals = [sum(step.values()) for step in rows]
    table = {}
    for name in PHASES:
        values = [step.get(name, 0.0) for step in rows]
        table[name] = {**_stats(values), "share": (sum(values) / sum(totals)) if sum(totals) else None}
    table["measured_total"] = _stats(totals)
    return table


def build_report(run_dir: str | Path) -> dict:
    """report.json, report.md and PNGs under RUN/report from metrics.jsonl (+ profile.json)."""
    run_dir = Path(run_dir)
    out = run_dir / runfiles.REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = read_metrics(run_dir / runfiles.METRICS)
    if not written:
        raise ValueError(f"{run_dir / runfiles.METRICS} has no logged steps to report")
    # steps with a finite loss; when none has one (every logged step skipped), all of them, NaN included
    rows = [r for r in written if isinstance(r.get("loss"), (int, float))] or \
        [{k: as_number(v) for k, v in r.items()} for r in written]
    cfg_dict = yaml.safe_load((run_dir / runfiles.CONFIG).read_text())
    cfg = config_from_dict(cfg_dict)
    ds_config = json.loads((run_dir / runfiles.DS_CONFIG).read_text())
    raw_path = out / "profile.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else None
    steady = rows[1:] or rows  # the first logged interval includes start-up
    goodput = account(read_events(run_dir))
    report = {
        "run_dir": str(run_dir),
        "preset": cfg.preset,
        "steps_logged": rows[-1]["step"],
        "throughput": {
            "samples_per_s": _stats([r["samples_per_s"] for r in steady]),
            "step_time_s": _stats([r["step_time_s"] for r in steady]),
            "data_time_s": _stats([r["data_time_s"] for r in steady]),
            "tflops_per_device": _stats([r["tflops_per_device"] for r in steady if r["tflops_per_device"] is not None]),
            "mfu": _stats([r["mfu"] for r in steady if r["mfu"] is not None]),
        },
        "training": {k: as_json(rows[-1][k]) for k in ("loss", "loss_reg", "loss_cls", "lr", "ema_decay", "grad_norm",
                                              "target_var", "pred_var", "masked_frac", "skipped_updates",
                                              "skipped_samples")},
        "memory_peak_gb": max(r["mem_peak_gb"] for r in rows),
        "environment": raw["environment"] if raw else None,
        "phases": phase_table(raw["phases_per_rank"]) if raw else None,
        "gpu": raw["gpu_per_rank"] if raw else None,
        "memory": raw["memory"] if raw else None,
        "flops_per_step": _flops_breakdown(cfg, raw["step_shape"]) if raw and raw.get("step_shape") else None,
        "goodput": goodput.as_dict() if goodput else None,
        "config": cfg_dict,
        "ds_config": ds_config,
    }
    report["plots"] = _plots(rows, report, out)
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", render_markdown(report))
    return report


def _flops_breakdown(cfg, shape: dict) -> dict:
    f = forward_flops(cfg, StepShape(shape["samples"], shape["positions"], shape["kept"]), shape.get("input_len", 0))
    return {"teacher_forward": f["teacher"], "student_fwd_bwd": 3 * f["student"], "decoder_fwd_bwd": 3 * f["decoder"],
            "local_encoder_fwd_bwd": 3 * f["local_encoder"],
            "total": f["teacher"] + 3 * (f["student"] + f["decoder"] + f["local_encoder"]),
            "per_rank_micro_batch": shape}


def _plots(rows: list[dict], report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], label="loss")
    ax.plot(steps, [r["loss_reg"] for r in rows], label="regression", alpha=0.7)
    ax.plot(steps, [r["loss_cls"] for r in rows], label="CLS", alpha=0.7)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title("Loss")
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["samples_per_s"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("samples/s (global)"), ax.set_title("Throughput")
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["mem_peak_gb"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("peak memory (GB, rank 0)"), ax.set_title("Memory")
    save(fig, "memory.png")

    if report["phases"]:
        names = [n for n in PHASES if report["phases"][n]["mean"]]
        means = [report["phases"][n]["mean"] * 1e3 for n in names]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.barh(names[::-1], means[::-1])
        ax.set_xlabel("ms per step (mean over ranks, after warm-up)"), ax.set_title("Step-time breakdown")
        save(fig, "breakdown.png")
    return made


def _fmt(v, unit: str = "", digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}{unit}"
    return f"{v}{unit}"


def render_markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# d2v2scale profiling report — {r['preset']}", "", f"Run directory: `{r['run_dir']}`; "
             f"{r['steps_logged']} steps logged.", ""]
    lines += ["## Run and environment", ""]
    if env:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
    else:
        lines += ["(no profile.json: run with `--profile` for versions, topology and phase timings)"]
    t = r["throughput"]
    lines += ["", "## Throughput (steady state: first logged interval excluded)", "",
              "| metric | mean | p50 | p90 |", "|---|---|---|---|"]
    for key, label in (("samples_per_s", "samples/s (global)"), ("step_time_s", "step time (s)"),
                       ("data_time_s", "data wait (s)"), ("tflops_per_device", "TFLOP/s per device"), ("mfu", "MFU")):
        s = t[key]
        lines.append(f"| {label} | {_fmt(s['mean'])} | {_fmt(s['p50'])} | {_fmt(s['p90'])} |")
    f = r["flops_per_step"]
    if f:
        lines += ["", "## Model FLOPs of one micro-batch on one rank (analytic, `profiling/flops.py`)", "",
                  "| part | FLOPs | share |", "|---|---|---|"]
        for key in ("teacher_forward", "student_fwd_bwd", "decoder_fwd_bwd", "local_encoder_fwd_bwd", "total"):
            lines.append(f"| {key} | {f[key]:.4g} | {f[key] / f['total']:.1%} |")
    p = r["phases"]
    lines += ["", "## Step-time breakdown (per rank, after warm-up)", ""]
    if p:
        lines += ["| phase | mean (ms) | p50 (ms) | p90 (ms) | share |", "|---|---|---|---|---|"]
        for name in PHASES:
            s = p[name]
            lines.append(f"| {name} | {_fmt(s['mean'] and s['mean'] * 1e3)} | {_fmt(s['p50'] and s['p50'] * 1e3)} | "
                         f"{_fmt(s['p90'] and s['p90'] * 1e3)} | {_fmt(s['share'] and s['share'] * 100, '%')} |")
        s = p["measured_total"]
        lines.append(f"| measured total | {_fmt(s['mean'] * 1e3)} | {_fmt(s['p50'] * 1e3)} | {_fmt(s['p90'] * 1e3)} | |")
        lines += ["", "![breakdown](breakdown.png)"]
    else:
        lines += ["(not measured: run with `--profile`)"]
    if r["goodput"]:
        lines += [""] + render_goodput(Goodput(**{k: v for k, v in r["goodput"].items() if k != "goodput"}))
    lines += ["", "## Memory", "", f"Peak memory of rank 0 over the run: {r['memory_peak_gb']:.3g} GB "
              f"({'CUDA allocated' if (r['memory'] or {}).get('kind') == 'cuda' else 'host RSS'})."]
    if r["memory"]:
        lines += ["", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in r["memory"].items()]
    lines += ["", "![memory](memory.png)", "", "## GPU (NVML)", ""]
    gpus = r["gpu"] or []
    if gpus and any(g.get("available") for g in gpus):
        keys = [k for k in gpus[0] if k.startswith(("mean_", "max_"))]
        lines += ["| rank | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(_fmt(g.get(k)) for k in keys) + " |" for i, g in enumerate(gpus)]
    else:
        reason = gpus[0].get("reason") if gpus else "no profile.json"
        lines += [f"not available ({reason})"]
    tr = r["training"]
    lines += ["", "## Training health (last logged step)", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in tr.items()]
    lines += ["", "![loss](loss.png)", "", "![throughput](throughput.png)", "",
              "## Configuration", "", "```yaml", yaml.safe_dump(r["config"], sort_keys=False).rstrip(), "```", "",
              "```json", json.dumps(r["ds_config"], indent=1), "```", "",
              "Traces: `report/traces/rank*.json` (chrome://tracing or Perfetto) when `--profile` was given."]
    return "\n".join(lines) + "\n"
