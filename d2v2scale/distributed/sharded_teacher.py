"""Shard the EMA teacher over the data-parallel group, aligned with DeepSpeed's own partitions.

The student's optimizer already splits its fp32 master weights over the DP ranks. Giving the
teacher the *same* layout means each rank's EMA slice sits next to the student's fp32 slice it
averages: the update is one local ``lerp`` per group, and only the refresh of the compute-dtype
teacher weights communicates (all-gathers over DP, groups coalesced into buckets). Per ZeRO stage:

- stage 1/2: one flat group per optimizer param group, exactly DeepSpeed's ``bit16_groups_flat``
  layout; the student's slice is ``single_partition_of_fp32_groups[i]``. The param groups that
  hold only untracked parameters (decoder, audio CNN) are skipped: see
  :func:`d2v2scale.train.optim.param_groups`.
- stage 3: one group per parameter, partitioned as DeepSpeed partitions it; the student's slice
  is ``safe_get_local_fp32_param(p)``.
- stage 0: every rank has the full fp32 masters; the teacher takes an even slice of one flat
  vector of its parameters and copies its part of the masters.

These read DeepSpeed internals that are stable in 0.19.x (see ``reference/deepspeed_tp_ema.md``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..teacher import BUCKET_NUMEL, EMASchedule, EMATeacher, FlatGroup, default_groups
from .dims import ParallelDims


# Every DeepSpeed internal the teacher and the fault checks read, by what holds it. A DeepSpeed
# without one of them fails at start-up naming its version (never a silent fallback).
DEEPSPEED_INTERNALS = {
    "ZeRO-1/2 optimizer": ("bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups"),
    "bf16 optimizer (ZeRO-0)": ("fp16_groups", "fp32_groups"),
    "ZeRO-3 parameter": ("ds_tensor", "partition_numel"),
}


def require_internals(obj, holder: str) -> None:
    """Raise naming the DeepSpeed version if ``obj`` lacks an attribute d2v2scale reads."""
    missing = [name for name in DEEPSPEED_INTERNALS[holder] if not hasattr(obj, name)]
    if missing:
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: the {holder} ({type(obj).__name__}) has no "
                           f"{', '.join(missing)}, which d2v2scale reads to shard the EMA teacher; use DeepSpeed "
                           "0.19.x (tested: 0.19.8)")


def _all_gather_fn(group):
    def gather(out: torch.Tensor, shard: torch.Tensor) -> None:
        dist.all_gather_into_tensor(out, shard.contiguous(), group=group)

    return gather


def _names_by_id(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _zero12_groups(engine, tracked: set[str]) -> tuple[list[FlatGroup], list[int]]:
    opt, names = engine.optimizer, _names_by_id(engine.module)
    require_internals(opt, "ZeRO-1/2 optimizer")
    groups, indices = [], []
    for i, (params, flat) in enumerate(zip(opt.bit16_groups, opt.bit16_groups_flat)):
        group_names = [names[id(p)] for p in params]
        if not any(n in tracked for n in group_names):
            continue
        if not all(n in tracked for n in group_names):
            raise ValueError(f"optimizer param group {i} mixes teacher-tracked and untracked parameters")
        base, size = flat.data_ptr(), flat.element_size()
        offsets = [(p.data_ptr() - base) // size for p in params]
        groups.append(FlatGroup(tuple(group_names), tuple(offsets), flat.numel()))
        indices.append(i)
    return groups, indices


def _stage0_masters(engine) -> dict[str, torch.Tensor]:
    """name → full fp32 master: the module parameter itself (fp32) or the optimizer's copy (bf16)."""
    names = _names_by_id(engine.module)
    opt = engine.optimizer
    if engine.bfloat16_enabled():
        require_internals(opt, "bf16 optimizer (ZeRO-0)")
        return {names[id(lp)]: hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def build_sharded_teacher(
    engine, teacher_module: nn.Module, schedule: EMASchedule, dims: ParallelDims, compute_dtype: torch.dtype,
    bucket_numel: int = BUCKET_NUMEL,
) -> EMATeacher:
    """The EMA teacher of ``engine``'s student, sharded over ``dims``' DP group.

    ``teacher_module`` must be the student's teacher copy taken *before* ``deepspeed.initialize``
    (ZeRO-3 empties the module's parameters) and after tensor parallelism was applied.
    ``bucket_numel`` bounds the elements one refresh all-gather moves (the JSON's
    ``zero_optimization.allgather_bucket_size``, DeepSpeed's default 5e8)."""
    tracked = {n for n, p in teacher_module.named_parameters() if p.requires_grad}
    stage = engine.zero_optimization_stage()
    common = dict(compute_dtype=compute_dtype, shard_rank=dims.dp_rank, shard_count=dims.dp,
                  all_gather=_all_gather_fn(dims.dp_group) if dims.dp > 1 else None, bucket_numel=bucket_numel)
    if stage in (1, 2):
        groups, indices = _zero12_groups(engine, tracked)
        teacher = EMATeacher(teacher_module, schedule, groups=groups, **common)
        opt = engine.optimizer
        teacher.bind_sources(lambda: [opt.single_partition_of_fp32_groups[i] for i in indices])
        return teacher
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        params = [(n, p) for n, p in engine.module.named_parameters() if n in tracked]
        for _, p in params[:1]:
            require_internals(p, "ZeRO-3 parameter")
        groups = [FlatGroup((n,), (0,), p.partition_numel() * dims.dp) for n, p in params]
        teacher = EMATeacher(teacher_module, schedule, groups=groups, **common)
        teacher.bind_sources(lambda: [safe_get_local_fp32_param(p) for _, p in params])
        return teacher
    names = [n for n, p in teacher_module.named_parameters() if p.requires_grad]
    teacher = EMATeacher(teacher_module, schedule, groups=default_groups(teacher_module, names, dims.dp), **common)
    masters = _stage0_masters(engine)
    teacher.bind_sources(lambda: teacher.slices_from(masters))
    return teacher
