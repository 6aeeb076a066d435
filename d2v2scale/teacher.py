"""The EMA teacher: fp32 master weights, annealed decay, and a compute-dtype module for the forward.

Storage is laid out for sharding from day one. The tracked (trainable) parameters are viewed as
one flat vector in a fixed order; this rank owns the slice ``[rank·n/size, (rank+1)·n/size)`` of
it as an fp32 master. An update is an element-wise ``lerp`` of that slice towards the student's
values — no communication. The forward module's parameters are views into one flat buffer in the
compute dtype, refreshed from the masters by ``all_gather`` (``shard_count > 1``) or a copy.
With ``shard_count == 1`` (this file's default) the whole model is one shard.

Non-trainable parameters and buffers (e.g. fixed image positions) are copied, not averaged, and
parts the teacher does not have (decoders, the audio CNN) are simply absent from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class EMASchedule:
    """fairseq ``get_annealed_rate``: linear ``start → end`` over ``anneal_steps`` updates, then ``end``."""

    start: float
    end: float
    anneal_steps: int

    def decay(self, num_updates: int) -> float:
        if self.start == self.end or num_updates >= self.anneal_steps:
            return self.end
        return self.end - (self.end - self.start) * (1.0 - num_updates / self.anneal_steps)


@dataclass(frozen=True)
class _Segment:
    """A run of this shard's master slice that lies inside one parameter."""

    name: str
    param_offset: int
    length: int
    master_offset: int


AllGather = Callable[[torch.Tensor, torch.Tensor], None]  # (output_flat, input_shard)


class EMATeacher:
    """EMA of a student's tracked parameters; ``module`` is the teacher network to run (eval, no grad)."""

    def __init__(
        self,
        module: nn.Module,
        schedule: EMASchedule,
        *,
        compute_dtype: torch.dtype = torch.float32,
        shard_rank: int = 0,
        shard_count: int = 1,
        all_gather: AllGather | None = None,
    ):
        if shard_count > 1 and all_gather is None:
            raise ValueError("a sharded EMA teacher needs an all_gather function over its shard group")
        self.schedule = schedule
        self.shard_rank, self.shard_count = shard_rank, shard_count
        self.all_gather = all_gather
        self.num_updates = 0
        self.ema_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.copied_names = [n for n, p in module.named_parameters() if not p.requires_grad]
        self.module = module.eval().requires_grad_(False)

        params = dict(module.named_parameters())
        numels = [params[n].numel() for n in self.ema_names]
        total = self.total_numel = sum(numels)
        self.shard_size = -(-total // shard_count)
        device = params[self.ema_names[0]].device if self.ema_names else torch.device("cpu")
        self.flat = torch.zeros(self.shard_size * shard_count, dtype=compute_dtype, device=device)
        offset = 0
        for name, n in zip(self.ema_names, numels):
            view = self.flat[offset : offset + n].view_as(params[name])
            view.copy_(params[name].detach())
            params[name].data = view
            offset += n
        lo = shard_rank * self.shard_size
        self.master = self.flat[lo : lo + self.shard_size].detach().to(torch.float32, copy=True)
        self.segments = self._segments(numels, lo, min(lo + self.shard_size, total))

    def _segments(self, numels: list[int], lo: int, hi: int) -> list[_Segment]:
        segments, start = [], 0
        for name, n in zip(self.ema_names, numels):
            a, b = max(start, lo), min(start + n, hi)
            if a < b:
                segments.append(_Segment(name, a - start, b - a, a - lo))
            start += n
        return segments

    def decay(self, num_updates: int | None = None) -> float:
        return self.schedule.decay(self.num_updates if num_updates is None else num_updates)

    @torch.no_grad()
    def update(self, student: nn.Module | dict[str, torch.Tensor], num_updates: int) -> float:
        """EMA step after optimizer step ``num_updates``: ``ema ← d·ema + (1-d)·student`` with
        ``d = schedule(num_updates)``. Skipped (returns the decay) once ``d`` reaches 1 — the teacher
        is then frozen — or when the counter did not advance. Returns the decay used."""
        decay = self.schedule.decay(num_updates)
        if num_updates <= self.num_updates:
            return decay
        self.num_updates = num_updates
        source = dict(student.named_parameters()) if isinstance(student, nn.Module) else student
        if decay < 1.0:
            masters, values = [], []
            for seg in self.segments:
                flat_src = source[seg.name].detach().reshape(-1)
                values.append(flat_src[seg.param_offset : seg.param_offset + seg.length].to(torch.float32))
                masters.append(self.master[seg.master_offset : seg.master_offset + seg.length])
            if masters:
                torch._foreach_lerp_(masters, values, 1.0 - decay)
            self._publish()
        self._copy_frozen(source, student if isinstance(student, nn.Module) else None)
        return decay

    def _publish(self) -> None:
        """Refresh the compute-dtype forward weights from the fp32 masters."""
        shard = self.master.to(self.flat.dtype)
        if self.shard_count == 1:
            self.flat.copy_(shard)
        else:
            self.all_gather(self.flat, shard)

    def _copy_frozen(self, source: dict[str, torch.Tensor], student: nn.Module | None) -> None:
        params = dict(self.module.named_parameters())
        for name in self.copied_names:
            params[name].copy_(source[name].detach())
        if student is not None:
            student_buffers = dict(student.named_buffers())
            for name, buf in self.module.named_buffers():
                if name in student_buffers:
                    buf.copy_(student_buffers[name])

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.module.parameters()

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: fp32 master slice, the update counter and the layout it belongs to."""
        return {
            "master": self.master.clone(),
            "num_updates": self.num_updates,
            "shard_rank": self.shard_rank,
            "shard_count": self.shard_count,
            "names": list(self.ema_names),
            "numel": self.total_numel,
            "copied": {n: p.detach().clone() for n, p in self.module.named_parameters() if n in self.copied_names},
        }

    def load_state_dict(self, state: dict) -> None:
        expected = (self.shard_rank, self.shard_count, self.ema_names)
        found = (state["shard_rank"], state["shard_count"], state["names"])
        if expected != found:
            raise ValueError(
                f"teacher shard layout mismatch: checkpoint has rank {found[0]}/{found[1]} over "
                f"{len(found[2])} tensors, this run expects rank {expected[0]}/{expected[1]} over {len(expected[2])}"
            )
        self.master.copy_(state["master"])
        self.num_updates = int(state["num_updates"])
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["copied"].items():
                params[name].copy_(value)
        self._publish()

    def full_master_state(self) -> dict[str, torch.Tensor]:
        """The teacher's fp32 weights by name (this shard's part only when sharded; for tests/export)."""
        if self.shard_count != 1:
            raise RuntimeError("full_master_state() needs an unsharded teacher; gather the shards first")
        out, params = {}, dict(self.module.named_parameters())
        for seg in self.segments:
            out[seg.name] = self.master[seg.master_offset : seg.master_offset + seg.length].view_as(params[seg.name])
        for name in self.copied_names:
            out[name] = params[name].detach().float()
        return out


def build_teacher(model: nn.Module, cfg, compute_dtype: torch.dtype = torch.float32, **shard) -> EMATeacher:
    """The EMA teacher of a :class:`~d2v2scale.model.Data2Vec2` student, from its config."""
    t = cfg.teacher
    return EMATeacher(
        model.teacher_copy(),
        EMASchedule(t.ema_decay, t.ema_end_decay, t.ema_anneal_end_step),
        compute_dtype=compute_dtype,
        **shard,
    )
