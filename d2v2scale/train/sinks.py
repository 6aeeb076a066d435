"""The metrics rows also where cluster users watch runs: TensorBoard, CSV files, Weights & Biases.

Configured by the ds_config's own monitor sections, with DeepSpeed's keys and layout::

    "tensorboard": {"enabled": true, "output_path": "...", "job_name": "..."}
    "csv_monitor": {"enabled": true, "output_path": "...", "job_name": "..."}
    "wandb":       {"enabled": true, "project": "...", "group": "...", "team": "..."}

Every numeric field of a ``metrics.jsonl`` row is written as ``Train/<field>`` at its step, by
rank 0 only: TensorBoard event files and one CSV per field (``Train_<field>.csv``, header
``step,<field>``) under ``<output_path>/<job_name>/`` (``output_path`` defaults to the run
directory, ``job_name`` to ``DeepSpeedJobName`` as in DeepSpeed). The backend, whichever it is,
never sees these sections: the DeepSpeed engine would otherwise log its own handful of values and
start W&B online. W&B runs offline unless ``WANDB_MODE`` says otherwise: nothing here needs the
network.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from ..config import ConfigError
from ..run_spec import MonitorSpec

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_sinks(monitors: tuple[MonitorSpec, ...]) -> None:
    """Refuse, before any process group starts, a sink whose package is not installed."""
    for monitor in monitors:
        package = PACKAGES.get(monitor.name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"ds_config {monitor.name}.enabled=true needs the '{package}' package: pip install "
                              f"{package} (or set {monitor.name}.enabled=false)")


def _numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricSinks:
    def __init__(self, monitors: tuple[MonitorSpec, ...], run_dir: Path, enabled: bool):
        self.writers: list[_TensorBoard | _CSV | _WandB] = []
        if not enabled:
            return
        for monitor in monitors:
            log_dir = Path(monitor.output_path or run_dir) / monitor.job_name
            if monitor.name == "tensorboard":
                self.writers.append(_TensorBoard(log_dir))
            elif monitor.name == "csv_monitor":
                self.writers.append(_CSV(log_dir))
            else:
                self.writers.append(_WandB(monitor, run_dir))

    def write(self, row: dict) -> None:
        values = _numeric(row)
        for writer in self.writers:
            writer.write(int(row["step"]), values)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"Train/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _CSV:
    def __init__(self, log_dir: Path):
        self.dir = log_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            path = self.dir / f"Train_{name}.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", name])
                w.writerow([step, value])

    def close(self) -> None:
        pass


class _WandB:
    def __init__(self, monitor: MonitorSpec, run_dir: Path):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=monitor.project, group=monitor.group, entity=monitor.team, dir=str(run_dir),
                              name=Path(run_dir).name)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"Train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
