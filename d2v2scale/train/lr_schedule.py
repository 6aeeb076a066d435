"""The ds_config's learning-rate schedule for backends other than DeepSpeed.

``WarmupCosineLR`` is DeepSpeed's formula, written out so that an FSDP2 run with the same JSON
follows the same learning rates step for step (and a checkpoint moves between backends): the
iteration counter starts at -1, each applied optimizer step advances it, and the lr in the
optimizer's groups is ``base_lr × ratio(iteration)``.

With a tensor lr (fused AdamW) the counter lives on the device too: :meth:`WarmupCosine.advance`
adds "was this step applied" without reading it back, and :meth:`WarmupCosine.ratio_tensor` is
the same formula in tensor ops, so a skipped step holds the schedule without a host sync.
"""
from __future__ import annotations

import math

import torch

from ..config import ConfigError
from ..run_spec import SchedulerSpec

SUPPORTED = ("WarmupCosineLR",)


class WarmupCosine:
    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_num_steps: int = 1000,
                 warmup_min_ratio: float = 0.0, cos_min_ratio: float = 0.0001, warmup_type: str = "log"):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"scheduler.params.warmup_type={warmup_type!r}; allowed values: log, linear")
        self.optimizer = optimizer
        self.total, self.warmup = total_num_steps, max(2, warmup_num_steps)
        self.warmup_min, self.cos_min, self.warmup_type = warmup_min_ratio, cos_min_ratio, warmup_type
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_batch_iteration = -1
        self._iteration: torch.Tensor | None = None
        self._apply()

    def ratio(self, it: int) -> float:
        if it < 0:
            return 0.0
        if it < self.warmup:
            r = math.log(it + 1) / math.log(self.warmup) if self.warmup_type == "log" else it / self.warmup
            return self.warmup_min + r * (1.0 - self.warmup_min)
        progress = min(1.0, (it - self.warmup + 1) / max(1, self.total - self.warmup))
        return max(0.0, self.cos_min + (1.0 - self.cos_min) * (1 + math.cos(math.pi * progress)) / 2)

    def ratio_tensor(self, it: torch.Tensor) -> torch.Tensor:
        """:meth:`ratio` of a 0-d float64 tensor iteration, in tensor ops (no host sync)."""
        if self.warmup_type == "log":
            warm = torch.log(it.clamp(min=0) + 1) / math.log(self.warmup)
        else:
            warm = it / self.warmup
        warm = self.warmup_min + warm * (1.0 - self.warmup_min)
        progress = ((it - self.warmup + 1) / max(1, self.total - self.warmup)).clamp(max=1.0)
        cosine = (self.cos_min + (1.0 - self.cos_min) * (1 + torch.cos(math.pi * progress)) / 2).clamp(min=0.0)
        return torch.where(it < 0, torch.zeros_like(it), torch.where(it < self.warmup, warm, cosine))

    def step(self, iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if iteration is None else iteration
        self._iteration = None
        self._apply()

    def advance(self, applied: torch.Tensor) -> None:
        """One more step if ``applied`` (a device bool) — the groups' lr must be tensors (fused AdamW)."""
        if self._iteration is None:  # a fill kernel, not a copy from the host
            self._iteration = torch.full((), float(self.last_batch_iteration), dtype=torch.float64,
                                         device=self.optimizer.param_groups[0]["lr"].device)
        self._iteration += applied.to(torch.float64)
        ratio = self.ratio_tensor(self._iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"].copy_(base * ratio)

    def position(self) -> int:
        """The iteration counter (reads the device counter when there is one: checkpoint time)."""
        return int(self._iteration) if self._iteration is not None else self.last_batch_iteration

    def _apply(self) -> None:
        r = self.ratio(self.last_batch_iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(base * r)
            else:
                group["lr"] = base * r


def schedule_from(sched: SchedulerSpec | None, optimizer: torch.optim.Optimizer) -> WarmupCosine | None:
    """The ds_config's ``scheduler`` on ``optimizer``; None without one (constant lr)."""
    if sched is None:
        return None
    if sched.type not in SUPPORTED:  # refused earlier, with the other sections (run_spec.validate)
        raise ValueError(f"scheduler.type={sched.type!r}; supported: {', '.join(SUPPORTED)}")
    return WarmupCosine(optimizer, **sched.params)
