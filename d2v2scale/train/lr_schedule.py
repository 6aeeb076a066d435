"""The ds_config's learning-rate schedule for backends other than DeepSpeed.

``WarmupCosineLR`` is DeepSpeed's formula, written out so that an FSDP2 run with the same JSON
follows the same learning rates step for step (and a checkpoint moves between backends): the
iteration counter starts at -1, each applied optimizer step advances it, and the lr in the
optimizer's groups is ``base_lr × ratio(iteration)``.
"""
from __future__ import annotations

import math

import torch

from ..config import ConfigError

SUPPORTED = ("WarmupCosineLR",)


class WarmupCosine:
    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_num_steps: int = 1000,
                 warmup_min_ratio: float = 0.0, cos_min_ratio: float = 0.0001, warmup_type: str = "log"):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"scheduler.params.warmup_type={warmup_type!r}; allowed values: log, linear")
        self.optimizer = optimizer
        self.total, self.warmup = total_num_steps, max(2, warmup_num_steps)
        self.warmup_min, self.cos_min, self.warmup_type = warmup_min_ratio, cos_min_ratio, warmup_type
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_batch_iteration = -1
        self._apply()

    def ratio(self, it: int) -> float:
        if it < 0:
            return 0.0
        if it < self.warmup:
            r = math.log(it + 1) / math.log(self.warmup) if self.warmup_type == "log" else it / self.warmup
            return self.warmup_min + r * (1.0 - self.warmup_min)
        progress = min(1.0, (it - self.warmup + 1) / max(1, self.total - self.warmup))
        return max(0.0, self.cos_min + (1.0 - self.cos_min) * (1 + math.cos(math.pi * progress)) / 2)

    def step(self, iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if iteration is None else iteration
        self._apply()

    def _apply(self) -> None:
        r = self.ratio(self.last_batch_iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * r


def schedule_from(ds: dict, optimizer: torch.optim.Optimizer) -> WarmupCosine | None:
    """The ds_config's ``scheduler`` section on ``optimizer``; None without one (constant lr)."""
    sched = ds.get("scheduler")
    if not sched:
        return None
    if sched.get("type") not in SUPPORTED:
        raise ConfigError(f"ds_config scheduler.type={sched.get('type')!r} is not supported by parallel.backend=fsdp2; "
                          f"allowed values: {', '.join(SUPPORTED)}")
    return WarmupCosine(optimizer, **sched.get("params", {}))
