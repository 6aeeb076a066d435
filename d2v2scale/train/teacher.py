"""The EMA teacher: fp32 master weights, annealed decay, and a compute-dtype module for the forward.

Storage is laid out for sharding. The tracked (trainable) parameters live in one or more *flat
groups*: each group is a vector holding some parameters at fixed offsets, padded to split evenly
over the shard group (the data-parallel ranks). This rank keeps only its slice of every group as
an fp32 master, and an update is an element-wise ``lerp`` of each slice towards the student's fp32
values for the same slice — no communication. The forward module's parameters are views into
compute-dtype copies of the groups, refreshed from the masters by all-gathers that coalesce
consecutive groups up to ``bucket_numel`` gathered elements (ZeRO-3 has one group per parameter:
hundreds of small collectives otherwise).

With the default layout (one group, one shard) this is a plain fp32 EMA. The distributed builder
(:mod:`d2v2scale.train.backend`) passes DeepSpeed's own ZeRO partition layout so
that each rank's slice is exactly the student's fp32 master partition on that rank.

Non-trainable parameters (fixed image positions) are copied at construction and never change;
parts the teacher does not have (decoders, the audio CNN) are absent from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from ..distributed.slices import padded_numel, piece

if TYPE_CHECKING:
    from ..model.data2vec2 import Data2Vec2


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
class FlatGroup:
    """Parameters (by name) at offsets inside one flat vector of ``numel`` elements (padding included)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    numel: int


def default_groups(module: nn.Module, names: Sequence[str], shard_count: int) -> list[FlatGroup]:
    """All ``names`` back to back in one group, padded to a multiple of ``shard_count``."""
    params = dict(module.named_parameters())
    offsets, total = [], 0
    for name in names:
        offsets.append(total)
        total += params[name].numel()
    return [FlatGroup(tuple(names), tuple(offsets), padded_numel(total, shard_count))]


BUCKET_NUMEL = 500_000_000  # elements per refresh all-gather: DeepSpeed's allgather_bucket_size default
AllGather = Callable[[torch.Tensor, torch.Tensor], None]  # (output_flat, input_shard)
SourceFn = Callable[[], list[torch.Tensor]]  # this rank's fp32 student values, one tensor per group


class EMACore:
    """The EMA core every teacher layout shares: fp32 master shards, the annealed decay, the update
    counter. ``masters[i]`` moves towards ``sources()[i]``, the student's fp32 values for the same
    elements, by one local ``lerp`` — no communication; :meth:`publish` then makes ``module``, the
    network the targets come from, see the new values."""

    module: nn.Module
    masters: list[torch.Tensor]

    def __init__(self, schedule: EMASchedule):
        self.schedule = schedule
        self.num_updates = 0
        self._sources: SourceFn | None = None

    def bind_sources(self, sources: SourceFn) -> None:
        """Read the student's fp32 values for this rank's masters from ``sources()`` (one tensor per
        master, the same length)."""
        self._sources = sources

    def decay(self, num_updates: int | None = None) -> float:
        return self.schedule.decay(self.num_updates if num_updates is None else num_updates)

    def student_values(self, student: nn.Module | dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        if self._sources is not None:
            return self._sources()
        raise ValueError(f"{type(self).__name__}.update needs bound sources")

    @torch.no_grad()
    def update(self, num_updates: int, student: nn.Module | dict[str, torch.Tensor] | None = None,
               applied: torch.Tensor | bool = True) -> float:
        """EMA step after optimizer step ``num_updates``: ``ema ← d·ema + (1-d)·student`` with
        ``d = schedule(num_updates)``. Nothing changes once ``d`` reaches 1 (the teacher is frozen),
        when the counter did not advance, or when the optimizer step was not ``applied`` (a host
        bool, or a device bool decided without a host read). Returns the decay used."""
        decay = self.schedule.decay(num_updates)
        if num_updates <= self.num_updates:
            return decay
        self.num_updates = num_updates
        on_device = isinstance(applied, torch.Tensor)
        if decay >= 1.0 or not (on_device or applied):
            return decay
        targets, sources = self.pairs(student)
        if isinstance(applied, torch.Tensor):
            # lerp takes its weight as a host number: a device flag would be read back, a sync every
            # step. The same update with device-scalar multiplies: ema·(1 - w) + student·w.
            weight = applied.to(targets[0].dtype) * (1.0 - decay)
            torch._foreach_mul_(targets, 1.0 - weight)
            torch._foreach_add_(targets, torch._foreach_mul(sources, weight))
        else:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
        self.publish()
        return decay

    def pairs(self, student=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, the fp32 student values they move towards), element for element."""
        return self.masters, [v if v.dtype == torch.float32 else v.float() for v in self.student_values(student)]

    def publish(self) -> None:
        """Make ``module`` compute with the masters' current values (nothing to do when they are its own)."""

    def master_bytes(self) -> int:
        """fp32 EMA bytes held by this rank."""
        return sum(m.numel() * m.element_size() for m in self.masters)

    def ranges(self) -> list[tuple[str, int, int, torch.Tensor]]:
        """This rank's fp32 masters as (name, start, stop, values): flat ranges of each TP-local parameter."""
        raise NotImplementedError

    @torch.no_grad()
    def load_ranges(self, read: Callable[[str, int, int], torch.Tensor], num_updates: int) -> None:
        """Fill this rank's masters from ``read(name, start, stop)`` (any layout wrote them), then publish."""
        for name, start, stop, values in self.ranges():
            values.copy_(read(name, start, stop))
        self.num_updates = num_updates
        self.publish()


class ShardedModuleEMA(EMACore):
    """A teacher whose module is sharded like the student (FSDP2): its own fp32 parameter shards
    are the masters, so nothing but the student's shards is needed for an update and its forward
    gathers weights one block at a time, as the student's does."""

    def __init__(self, module: nn.Module, schedule: EMASchedule, ranges: list[tuple[str, int, int, torch.Tensor]]):
        super().__init__(schedule)
        self.module = module.eval().requires_grad_(False)
        self._ranges = ranges
        self.masters = [values for _, _, _, values in ranges]

    def ranges(self) -> list[tuple[str, int, int, torch.Tensor]]:
        return self._ranges


class FlatGroupEMA(EMACore):
    """EMA of a student's tracked parameters in flat groups; ``module`` (eval, no grad) runs on
    compute-dtype copies of the groups that :meth:`publish` refreshes from the masters."""

    def __init__(
        self,
        module: nn.Module,
        schedule: EMASchedule,
        *,
        compute_dtype: torch.dtype = torch.float32,
        groups: list[FlatGroup] | None = None,
        shard_rank: int = 0,
        shard_count: int = 1,
        all_gather: AllGather | None = None,
        bucket_numel: int = BUCKET_NUMEL,
    ):
        if shard_count > 1 and all_gather is None:
            raise ValueError("a sharded EMA teacher needs an all_gather function over its shard group")
        super().__init__(schedule)
        self.shard_rank, self.shard_count = shard_rank, shard_count
        self.all_gather = all_gather
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        self.copied_names = [n for n, p in module.named_parameters() if not p.requires_grad]
        self.groups = groups if groups is not None else default_groups(module, trainable, shard_count)
        missing = sorted(set(trainable) - {n for g in self.groups for n in g.names})
        if missing:
            raise ValueError(f"teacher layout does not cover every tracked parameter; missing: {missing[:5]}")
        self.module = module.eval().requires_grad_(False)
        self.flats, self.masters = [], []
        params = dict(module.named_parameters())
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for g in self.groups:
            if g.numel % shard_count:
                raise ValueError(f"flat group of {g.numel} elements does not split over {shard_count} shards")
            size = g.numel // shard_count
            lo, hi = piece(g.numel, size, shard_rank)
            flat = torch.zeros(g.numel, dtype=compute_dtype, device=device)
            master = torch.zeros(size, dtype=torch.float32, device=device)  # only this rank's slice
            for name, off, a, b in _overlaps(g, lo, hi, params):
                master[a - lo : b - lo] = params[name].detach().reshape(-1)[a - off : b - off].float()
            for name, off in zip(g.names, g.offsets):
                if name not in params:  # a slot of the student's layout the teacher does not run
                    continue
                p = params[name]
                view = flat[off : off + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
            self.flats.append(flat)
            self.masters.append(master)
        self.buckets = _buckets([g.numel for g in self.groups], bucket_numel)
        self._bound: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------- sources
    def bind_student(self, student: nn.Module | dict[str, torch.Tensor]) -> None:
        """Move towards these fp32 tensors from now on (the student's parameters, or an optimizer's
        fp32 masters: storage that lives as long as the run). The ranges of masters and student that
        meet are paired as views once, so an update is one ``_foreach_lerp_`` that allocates nothing."""
        self._bound = self.view_pairs(student)

    def view_pairs(self, student: nn.Module | dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        named = dict(student.named_parameters()) if isinstance(student, nn.Module) else student
        targets, sources = [], []
        for g, master in zip(self.groups, self.masters):
            lo = self.shard_rank * master.numel()
            for name, off, a, b in _overlaps(g, lo, lo + master.numel(), named):
                targets.append(master[a - lo : b - lo])
                sources.append(named[name].detach().reshape(-1)[a - off : b - off].float())
        return targets, sources

    def pairs(self, student=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views bound by :meth:`bind_student`, or of the ``student`` given to this update, or the
        bound per-group sources."""
        if student is not None:
            return self.view_pairs(student)
        if self._bound is not None:
            return self._bound
        return super().pairs(student)

    # -------------------------------------------------------------------------------- update
    def publish(self) -> None:
        """Refresh the compute-dtype forward weights from the fp32 masters (all-gather when sharded).

        A bucket of several groups is gathered as one vector of this rank's slices back to back; row
        ``r`` of the result, viewed as (shards, slices), holds rank ``r``'s slices, which are rows ``r``
        of the groups viewed the same way."""
        if self.shard_count == 1:
            for flat, master in zip(self.flats, self.masters):
                flat.copy_(master)
            return
        all_gather = self.all_gather
        assert all_gather is not None  # __init__ refuses shard_count > 1 without one
        for bucket in self.buckets:
            if len(bucket) == 1:
                flat = self.flats[bucket[0]]
                all_gather(flat, self.masters[bucket[0]].to(flat.dtype))
                continue
            shard = torch.cat([self.masters[i] for i in bucket]).to(self.flats[bucket[0]].dtype)
            rows = shard.new_empty(self.shard_count * shard.numel())
            all_gather(rows, shard)
            rows, start = rows.view(self.shard_count, -1), 0
            for i in bucket:
                size = self.masters[i].numel()
                self.flats[i].view(self.shard_count, size).copy_(rows[:, start : start + size])
                start += size

    # --------------------------------------------------------------------------- checkpoints
    def ranges(self) -> list[tuple[str, int, int, torch.Tensor]]:
        params = dict(self.module.named_parameters())
        out = []
        for g, master in zip(self.groups, self.masters):
            lo = self.shard_rank * master.numel()
            for name, off, a, b in _overlaps(g, lo, lo + master.numel(), params):
                out.append((name, a - off, b - off, master[a - lo : b - lo]))
        return out

    def state_dict(self) -> dict:
        """This rank's shard: fp32 master slices, the update counter and the layout they belong to."""
        return {
            "masters": [m.clone() for m in self.masters],
            "num_updates": self.num_updates,
            "shard_rank": self.shard_rank,
            "shard_count": self.shard_count,
            "layout": [[list(g.names), list(g.offsets), g.numel] for g in self.groups],
            "copied": {n: p.detach().clone() for n, p in self.module.named_parameters() if n in self.copied_names},
        }

    def load_state_dict(self, state: dict) -> None:
        layout = [[list(g.names), list(g.offsets), g.numel] for g in self.groups]
        if (state["shard_rank"], state["shard_count"], state["layout"]) != (self.shard_rank, self.shard_count, layout):
            raise ValueError(
                f"teacher shard layout mismatch: checkpoint has shard {state['shard_rank']}/{state['shard_count']} "
                f"over {len(state['layout'])} groups, this run expects {self.shard_rank}/{self.shard_count} over "
                f"{len(layout)} (resume with the same parallel layout and ZeRO stage)"
            )
        for m, saved in zip(self.masters, state["masters"]):
            m.copy_(saved)
        self.num_updates = int(state["num_updates"])
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in state["copied"].items():
                params[name].copy_(value)
        self.publish()


def _overlaps(group: FlatGroup, lo: int, hi: int, tensors: dict):
    """(name, offset, a, b) for every parameter of ``group`` present in ``tensors`` whose span
    ``[offset, offset + numel)`` in the flat vector meets ``[lo, hi)`` in ``[a, b)``."""
    for name, off in zip(group.names, group.offsets):
        if name in tensors:
            a, b = max(off, lo), min(off + tensors[name].numel(), hi)
            if a < b:
                yield name, off, a, b


def _buckets(numels: list[int], limit: int) -> list[list[int]]:
    """Consecutive group indices, each run holding at most ``limit`` elements (a larger group alone)."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(numels):
        if out and total + n <= limit:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def ema_schedule(cfg) -> EMASchedule:
    t = cfg.teacher
    return EMASchedule(t.ema_decay, t.ema_end_decay, t.ema_anneal_end_step)


def build_teacher(model: Data2Vec2, cfg, compute_dtype: torch.dtype = torch.float32) -> FlatGroupEMA:
    """The (unsharded) EMA teacher of a single-device :class:`~d2v2scale.model.Data2Vec2` student,
    bound to the student's parameters (``update(step)`` needs no student argument)."""
    teacher = FlatGroupEMA(model.teacher_copy(), ema_schedule(cfg), compute_dtype=compute_dtype)
    teacher.bind_student(model)
    return teacher
