"""Every collective one training step makes, with its payload per rank, from the config alone.

Payload convention (what ``tests/dist/comm_bytes.py`` measures on real steps): the tensor of an
all-reduce, the gathered output of an all-gather, the input of a reduce-scatter. Per step, with
Ψ the trainable student parameters this TP rank holds, Ψ_T the teacher-tracked ones, ``g`` the
gradient-accumulation steps and ``a`` bytes per element of the compute dtype:

- tensor parallelism (TP group): per student block 2 all-reduces of the kept-token activations
  in forward and 2 in backward (+2 for a checkpointed block's recompute), per teacher block 2 of
  the full-length activations; every micro-batch;
- DeepSpeed ZeRO-0/1: one gradient all-reduce of Ψ at the accumulation boundary; ZeRO-2: one per
  micro-batch (gradients are partitioned as they are produced); ZeRO-1/2: the updated weights
  all-gathered once after the optimizer step;
- ZeRO-3: a gradient reduce-scatter per micro-batch; parameters above
  ``stage3_param_persistence_threshold`` elements gathered per micro-batch — once when they stay
  live from forward to backward (DeepSpeed keeps them while their total is within
  ``stage3_max_reuse_distance`` and ``stage3_max_live_parameters``), else twice — and the
  persistent small ones once after the step;
- the EMA teacher's compute copy all-gathered once per step (DP group);
- a few scalar all-reduces (masked-token count, non-finite guard, stop flag, DeepSpeed's norms).

With ``parallel.backend=fsdp2`` (DP group, per micro-batch): every student weight gathered for the
forward, the blocks again for the backward when they reshard (stage 3); gradients
reduce-scattered in fp32; the teacher's weights gathered for its forward (its encoder twice when
the teacher has its own local encoder: ``local_features`` and ``forward`` are separate calls).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..model.blocks import checkpointed_count
from ..profiling.flops import StepShape
from ..run_spec import ZeroSpec

SCALAR_CALLS = 5  # masked-token count, non-finite guard, three in DeepSpeed's clipping and overflow checks


@dataclass(frozen=True)
class ParamCounts:
    """Parameter element counts of one TP rank (student trainable, student all, teacher-tracked),
    and the numel of every student tensor (ZeRO-3 decides persistence per tensor)."""

    trainable: int
    total: int
    teacher: int
    sizes: tuple[int, ...]
    blocks: int = 0  # every Transformer block of the student, prenet ones included (FSDP2 units of their own)
    block: int = 0  # the largest of them
    teacher_total: int = 0  # every teacher weight, frozen ones included (FSDP2 gathers them all)
    teacher_encoder: int = 0  # the teacher's encoder outside its blocks (0 when it runs the student's)


@dataclass(frozen=True)
class Collective:
    what: str
    kind: str  # all_reduce | all_gather | reduce_scatter
    group: str  # tp | dp | world
    nbytes: float  # payload of one call
    calls: int  # per step
    hidden_by: str  # the compute it can overlap with: "backward", "forward+backward" or "" (exposed)

    @property
    def total(self) -> float:
        return self.nbytes * self.calls


def step_collectives(cfg: Config, zero: ZeroSpec, bf16: bool, shape: StepShape, grad_accum: int, params: ParamCounts,
                     tp: int, dp: int, checkpoint_every: int | None = None) -> list[Collective]:
    m = cfg.model
    a = 2 if bf16 else 4
    g = grad_accum
    every = m.activation_checkpointing if checkpoint_every is None else checkpoint_every
    out: list[Collective] = []
    if tp > 1:
        rows = shape.samples * m.clone_batch
        student_act = rows * (shape.kept + m.num_extra_tokens) * m.embed_dim * a
        blocks = m.depth + m.prenet_depth
        recomputed = checkpointed_count(m, every)
        out.append(Collective("TP all-reduce, student blocks (2 fwd + 2 bwd per block)", "all_reduce", "tp",
                              student_act, 4 * blocks * g, ""))
        if recomputed:
            out.append(Collective("TP all-reduce, recomputed checkpointed blocks", "all_reduce", "tp",
                                  student_act, 2 * recomputed * g, ""))
        teacher_blocks = m.depth + (0 if cfg.teacher.ema_encoder_only else m.prenet_depth)
        teacher_act = shape.samples * (shape.positions + m.num_extra_tokens) * m.embed_dim * a
        out.append(Collective("TP all-reduce, teacher blocks (2 per block)", "all_reduce", "tp",
                              teacher_act, 2 * teacher_blocks * g, ""))
    if dp > 1 and cfg.parallel.backend == "fsdp2":
        out += _fsdp2_collectives(cfg, zero.stage == 3, params, a, g)
    elif dp > 1:
        overlap = "backward" if zero.overlap_comm else ""
        stage = zero.stage
        if stage in (0, 1):
            out.append(Collective("gradient all-reduce at the accumulation boundary", "all_reduce", "dp",
                                  params.trainable * a, 1, overlap))
        elif stage == 2:
            out.append(Collective("gradient reduction per micro-batch (ZeRO-2)", "all_reduce", "dp",
                                  params.trainable * a, g, overlap))
        else:
            out.append(Collective("gradient reduce-scatter per micro-batch (ZeRO-3)", "reduce_scatter", "dp",
                                  params.trainable * a, g, overlap))
        if stage in (1, 2):
            out.append(Collective("updated weights all-gather after the step", "all_gather", "dp",
                                  params.trainable * a, 1, ""))
        if stage == 3:
            persistent = sum(n for n in params.sizes if n <= zero.stage3_param_persistence_threshold)
            gathered = params.total - persistent
            if gathered:
                twice = gathered > min(zero.stage3_max_reuse_distance, zero.stage3_max_live_parameters)
                out.append(Collective("ZeRO-3 parameter all-gather per micro-batch"
                                      + (" (forward and backward)" if twice else " (kept live for backward)"),
                                      "all_gather", "dp", gathered * a, g * (2 if twice else 1),
                                      "forward+backward" if zero.overlap_comm else ""))
            if persistent:
                out.append(Collective("ZeRO-3 persistent small parameters after the step", "all_gather", "dp",
                                      persistent * a, 1, ""))
        out.append(Collective("EMA teacher compute copy all-gather", "all_gather", "dp", params.teacher * a, 1, ""))
    if tp * dp > 1:
        out.append(Collective("scalar all-reduces (token count, non-finite guard, DeepSpeed norms)", "all_reduce",
                              "dp", 4.0, SCALAR_CALLS, ""))
        out.append(Collective("stop-flag agreement", "all_reduce", "world", 4.0, 1, ""))
    return out


def _fsdp2_collectives(cfg: Config, reshard: bool, params: ParamCounts, a: int, g: int) -> list[Collective]:
    out = [Collective("FSDP2 student weights all-gather for the forward", "all_gather", "dp", params.total * a, g,
                      "forward+backward"),
           Collective("FSDP2 gradient reduce-scatter (fp32)", "reduce_scatter", "dp", params.trainable * 4, g, "backward")]
    if reshard:
        out.append(Collective("FSDP2 blocks all-gather again for the backward (stage 3)", "all_gather", "dp",
                              params.blocks * a, g, "backward"))
    encoder_calls = 2 if cfg.teacher.ema_local_encoder and not cfg.teacher.ema_encoder_only else 1
    teacher = params.teacher_total + (encoder_calls - 1) * params.teacher_encoder
    out.append(Collective("FSDP2 teacher weights all-gather for its forward", "all_gather", "dp", teacher * a, g,
                          "forward+backward"))
    return out


def bytes_by_kind(collectives: list[Collective], tp: int, dp: int) -> dict[str, float]:
    """Per-step payload per ``kind@group``; a group equal to the whole world is named ``world``
    only when both tp and dp exceed 1 (otherwise it is the dp or tp group itself)."""
    out: dict[str, float] = {}
    for c in collectives:
        group = c.group
        if group == "world" and (tp == 1 or dp == 1):
            group = "dp" if tp == 1 else "tp"
        key = f"{c.kind}@{group}"
        out[key] = out.get(key, 0.0) + c.total
    return out
