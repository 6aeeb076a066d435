"""The planner's core: for a preset, a DeepSpeed JSON and a cluster, one layout's per-GPU memory,
collectives, predicted step and run time (:func:`plan`), rendered as a table (:func:`render`).

Memory: :mod:`.memory`. Bytes each collective moves: :mod:`.comm` (checked against real steps).
Their time on a cluster profile: :mod:`.cluster`. Compute efficiency and the step-time model:
:mod:`.timing`. The search over layouts (:mod:`.search`) calls :func:`plan` for each candidate;
``python -m d2v2scale.plan`` is the command line.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import modality_registry
from ..config import BACKENDS, Config, ConfigError, load_config
from ..run_spec import BatchPlan, scale_batch_for_world
from ..run_spec import run_spec
from ..run_spec import set_micro_batch as set_json_micro_batch
from ..model.blocks import checkpointed_count
from ..profiling.flops import PEAK_FLOPS, StepShape, forward_flops
from .cluster import ClusterProfile
from .comm import ParamCounts, step_collectives
from .memory import GPU_MEMORY_GB, Layout, activation_bytes, model_state_bytes, param_counts
from .timing import Efficiency, StepTime, step_time

USABLE = 0.9  # of GPU memory: allocator fragmentation, CUDA context, NCCL buffers


@dataclass
class Plan:
    cfg: Config
    ds: dict
    profile: ClusterProfile
    batch: BatchPlan
    layout: Layout
    params: ParamCounts
    params_all: int
    states: dict
    activations: dict  # checkpoint_every (0 / the configured or 1) → components
    bucket: float
    capacity: float
    flops_per_step: float  # model FLOPs, all GPUs
    flops_per_micro_gpu: float  # model FLOPs of one micro-batch on one GPU
    time: StepTime
    scaling_note: str | None

    @property
    def checkpoint_every(self) -> int:
        return self.cfg.model.activation_checkpointing

    def total_bytes(self, every: int | None = None) -> float:
        every = self.checkpoint_every if every is None else every
        bucket = self.bucket if self.layout.reduce_bucket else 0.0
        return sum(self.states.values()) + sum(self.activations[every].values()) + bucket

    @property
    def fits(self) -> bool:
        return self.total_bytes() <= USABLE * self.capacity

    @property
    def run_h(self) -> float:
        return self.time.total_s * self.cfg.train.max_updates / 3600

    @property
    def mfu(self) -> float:
        world = self.layout.tp * self.layout.dp
        return self.flops_per_step / (self.time.total_s * world * PEAK_FLOPS[self.profile.gpu])


def positions_per_item(cfg: Config, input_len: int = 0) -> int:
    """T of one item: patches, CNN frames of ``input_len`` audio samples, or tokens per block."""
    return modality_registry.get(cfg.model.modality).positions(cfg, input_len)


def _per_gpu_flops(cfg: Config, shape: StepShape, input_len: int, tp: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs incl. the recompute of checkpointed blocks) of one micro-batch on
    one GPU: block work is split over the TP group, the local encoder and decoder are replicated."""
    f = forward_flops(cfg, shape, input_len)
    model = f["teacher"] / tp + 3.0 * (f["local_encoder"] + f["student"] / tp + f["decoder"])
    m = cfg.model
    recomputed = checkpointed_count(m, m.activation_checkpointing) / max(m.depth + m.prenet_depth, 1)
    return model, model + f["student"] / tp * recomputed


def plan(cfg: Config, ds: dict, nodes: int, tp: int, profile: ClusterProfile,
         efficiency: Efficiency | None = None) -> Plan:
    """Memory, communication and time of ``cfg``/``ds`` on ``nodes`` nodes of ``profile``. Mutates
    ``cfg``/``ds`` only under ``train.batch_scaling=linear`` (pass copies to keep them)."""
    world = nodes * profile.gpus_per_node
    if tp < 1 or world % tp:
        raise ConfigError(f"--tp {tp} must divide the {world} GPUs")
    dp = world // tp
    note = scale_batch_for_world(ds, cfg, dp)
    spec = run_spec(ds, cfg, dp)
    bp = spec.batch
    m = cfg.model
    input_len = modality_registry.get(m.modality).input_length(cfg)
    items = max(1, bp.micro_batch // input_len) if modality_registry.batch_budget(cfg) else bp.micro_batch
    positions = positions_per_item(cfg, input_len)
    lay = Layout(tp, dp, spec.zero.stage, spec.precision.bf16, items, positions, input_len,
                 cfg.parallel.backend)
    params = param_counts(cfg, tp)
    states = model_state_bytes(params, lay)
    bucket = spec.zero.reduce_bucket_size * (2 if lay.bf16 else 4)
    acts = {every: activation_bytes(cfg, lay, every) for every in {0, max(1, m.activation_checkpointing)}}
    acts[m.activation_checkpointing] = activation_bytes(cfg, lay, m.activation_checkpointing)
    kept = int(positions * (1 - cfg.masking.mask_prob))
    shape = StepShape(items, positions, kept)
    model_f, hw_f = _per_gpu_flops(cfg, shape, input_len, tp)
    collectives = step_collectives(cfg, spec.zero, spec.precision.bf16, shape, bp.grad_accum, params, tp, dp)
    efficiency = efficiency or Efficiency()
    t = step_time(model_f, bp.grad_accum, PEAK_FLOPS[profile.gpu], efficiency, collectives, profile, tp, dp)
    t.compute_s *= hw_f / model_f  # the recompute costs time, not model FLOPs
    flops_step = model_f * tp * bp.grad_accum * dp
    return Plan(cfg, ds, profile, bp, lay, params, param_counts(cfg, 1).total, states, acts, bucket,
                GPU_MEMORY_GB[profile.gpu] * 1e9, flops_step, model_f, t, note)


def render(p: Plan) -> str:
    gb = 1e9
    cfg, lay, t = p.cfg, p.layout, p.time
    lines = [
        f"{cfg.preset} on {lay.tp * lay.dp} × {p.profile.gpu} ({p.profile.name}; {lay.backend}, tp={lay.tp}, "
        f"dp={lay.dp}, ZeRO-{lay.zero}, {'bf16' if lay.bf16 else 'fp32'}, activation checkpointing "
        f"{cfg.model.activation_checkpointing}): {p.batch.describe()}",
        f"  parameters: {p.params_all / 1e6:.1f} M student, {p.params.total / 1e6:.1f} M per TP rank, "
        f"{p.params.teacher / 1e6:.1f} M teacher-tracked per TP rank",
        f"  micro-batch: {lay.micro_items} items × M={cfg.model.clone_batch} masks, T={lay.positions}, "
        f"kept {int(lay.positions * (1 - cfg.masking.mask_prob))}",
        "  per-GPU memory (GB):",
    ]
    lines += [f"    {k:<24}{v / gb:8.2f}" for k, v in p.states.items()]
    if lay.reduce_bucket:
        lines.append(f"    {'zero_reduce_bucket':<24}{p.bucket / gb:8.2f}")
    for every, acts in sorted(p.activations.items()):
        label = f"activations (ckpt {every})" if every else "activations"
        lines.append(f"    {label:<24}{sum(acts.values()) / gb:8.2f}   "
                     + ", ".join(f"{k} {v / gb:.2f}" for k, v in acts.items()))
    for every in sorted(p.activations):
        total = p.total_bytes(every)
        verdict = "fits" if total <= USABLE * p.capacity else "DOES NOT FIT"
        mark = "  ← configured" if every == cfg.model.activation_checkpointing else ""
        lines.append(f"    total with model.activation_checkpointing={every}: {total / gb:.2f} of "
                     f"{p.capacity / gb:.0f} → {verdict} ({USABLE:.0%} usable){mark}")
    lines.append("  communication per step (bytes per rank, time on the profile):")
    for c, secs in t.collectives:
        hidden = f", overlaps {c.hidden_by}" if c.hidden_by else ""
        lines.append(f"    {c.what:<62} {c.kind:>14}@{c.group:<5} {c.total / gb:8.3f} GB {secs * 1e3:8.2f} ms{hidden}")
    lines.append(f"  step: compute {t.compute_s:.3f} s at {t.efficiency:.1%} of peak "
                 f"(micro-batch {p.flops_per_micro_gpu:.2e} FLOPs/GPU), communication {t.comm_s:.3f} s "
                 f"of which {t.exposed_comm_s:.3f} s exposed → {t.total_s:.3f} s/step ({t.dominant}-bound), "
                 f"MFU {p.mfu:.1%}")
    lines.append(f"  {cfg.train.max_updates:,} steps = {p.run_h:.1f} h")
    if p.scaling_note:
        lines.append(f"  {p.scaling_note}")
    return "\n".join(lines)


TEACHER_PRESETS = ("vit_h", "vit_l", "audio_large", "text_base")


def teacher_layouts(gpus: int, bf16: bool = True) -> str:
    """Bytes per GPU the EMA teacher holds under each backend, for the large presets on ``gpus`` GPUs
    (tp=1): a markdown table (README's, checked against this function by the tests)."""
    rows = ["| preset | teacher params | DeepSpeed: fp32 masters/dp + full compute copy | "
            "FSDP2: fp32 shards/dp + 2 gathered blocks |", "|---|---:|---:|---:|"]
    for preset in TEACHER_PRESETS:
        params = param_counts(load_config(preset), 1)
        cells = []
        for backend in BACKENDS:
            states = model_state_bytes(params, Layout(1, gpus, 2, bf16, 1, 1, 0, backend))
            teacher = {k: v for k, v in states.items() if k.startswith("teacher")}
            cells.append(f"{sum(teacher.values()) / 1e9:.3f} GB (" + " + ".join(f"{v / 1e9:.3f}" for v in teacher.values())
                         + ")")
        rows.append(f"| {preset} | {params.teacher_total / 1e6:.0f} M | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def set_micro_batch(cfg: Config, ds: dict, micro: int | None) -> None:
    """The per-GPU micro-batch where it lives: the modality's data budget key (audio:
    ``data.max_tokens`` samples) or the JSON's ``train_micro_batch_size_per_gpu``."""
    if micro is None:
        return
    budget_key = modality_registry.get(cfg.model.modality).budget_key
    if budget_key:
        cfg.set_value(f"data.{budget_key}", micro)
    else:
        set_json_micro_batch(ds, micro)
