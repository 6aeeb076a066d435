"""A run directory's files, as training writes them and the report and tests read them.

``metrics.jsonl`` holds one JSON object per logged step, always with the same keys (DESIGN §3); a
value that is not measured in this run is ``null``, never a placeholder number. Training and the
after-the-fact report both import this module, and neither imports the other.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

CONFIG = "config.yaml"  # the resolved configuration: the single truth of the run
DS_CONFIG = "ds_config.json"  # the resolved DeepSpeed JSON
METRICS = "metrics.jsonl"
DIAGNOSTICS = "diagnostics.jsonl"
CHECKPOINTS = "checkpoints"
REPORT_DIR = "report"  # profile.json (the run's raw measurements), report.json, report.md, plots
EVENTS = "events.jsonl"  # attempts, checkpoints, failures and what was done (d2v2scale.resilience.events)
HEARTBEAT = "heartbeat"  # rank 0: "<last finished step> <unix time>", rewritten in place each step
INCIDENTS = "incidents"  # incidents/<attempt>/rank_<r>.txt: every thread's stack when the hang watchdog fired
PREEMPTED = "PREEMPTED"  # rank 0 stopped on a signal after checkpointing (the supervisor requeues)
JOB = "job.id"  # the Slurm job training this directory now (one at a time)

METRIC_NAMES = (
    "step", "loss", "loss_reg", "loss_cls", "lr", "ema_decay", "grad_norm", "target_var", "pred_var",
    "masked_frac", "samples_per_s", "step_time_s", "data_time_s", "tflops_per_device", "mfu",
    "mem_peak_gb", "skipped_updates", "skipped_samples",
)


class MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> dict:
        unknown = set(record) - set(METRIC_NAMES)
        if unknown:
            raise KeyError(f"unknown metric names {sorted(unknown)}; allowed: {', '.join(METRIC_NAMES)}")
        row = {name: as_json(record.get(name)) for name in METRIC_NAMES}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def as_json(value):
    """A metric value as JSON can hold it: NaN and inf become the strings "nan", "inf", "-inf"
    (JSON has no such numbers; strings keep them visible), lists element by element."""
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def as_number(value):
    """The inverse for readers: "nan"/"inf"/"-inf" back to floats; anything else unchanged."""
    return float(value) if value in ("nan", "inf", "-inf") else value


def read_metrics(path: Path) -> list[dict]:
    """Every row; a last line cut short by a killed process is left out (the next attempt rewrites it)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON row") from None
    return rows
