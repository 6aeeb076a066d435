"""The training step and loop: data2vec 2.0 on a training backend (DeepSpeed or FSDP2).

One step, top to bottom (:func:`train_step`):

1. fetch this rank's ``grad_accum`` micro-batches with their masks (made by the loader, ahead of
   time: a pure function of the step, the sample ids and the shapes);
2. all-reduce the masked-token count over the DP group: the regression loss of every micro-batch
   is normalised by this *global* count and the CLS loss carries a fixed per-view weight
   (:func:`~d2v2scale.model.cls_share`), so any split of the global batch (ranks × micro-batches ×
   accumulation × TP) optimises the same objective;
3. per micro-batch: forward (teacher targets + student + decoder), ``backend.backward``,
   ``backend.step`` (the backend steps the optimizer, clips and schedules at the accumulation
   boundary, and skips the step when the gradient norm is not finite — a non-finite loss included);
4. EMA update of the teacher from the new student weights (skipped steps do not update it).

Nothing d2v2scale does in a step that neither logs nor checkpoints reads a value back from the
device: the skip decision, the counters and the stop agreement stay on the device or go through
the store; log steps read everything at once. FSDP2 with fused AdamW is then sync-free; DeepSpeed's
own overflow check reads the gradient norm on the host (``tests/test_sync_free.py`` lists it).

The loop (:func:`train`) adds logging, checkpoints, pre-emption and the non-finite guard.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from tqdm import tqdm

from .. import runfiles
from ..config import Config
from ..counter_rng import combine
from ..data.fingerprint import fingerprint
from ..data.indexing import shared_index
from ..data.loader import MicroBatch, StepLoader
from ..data.precheck import index_spec
from ..data.schedule import RankSchedule
from ..distributed.dims import ParallelDims
from ..distributed.runtime import all_reduce, broadcast_object
from ..distributed.tensor_parallel import TPRegionRNG, TPSlice, tp_slice
from ..logs import LOG, progress_line
from ..model import Data2Vec2, cls_share, normalize_loss
from ..model.masking import MaskInfo
from ..model.parallelize import parallelize
from ..profiling.flops import StepShape, device_peak_flops, step_flops
from ..profiling.timers import StepTimer
from ..resilience.events import write_event
from ..resilience.watchdog import Watchdog
from ..run_spec import RunSpec
from ..runfiles import MetricsWriter
from . import checkpoint
from .backend import Backend, build_backend
from .compile import apply_compile
from .faults import (
    NonFiniteTraining,
    Preempted,
    StopFlag,
    all_finite,
    injected_failure,
    injected_nan_steps,
    poisoned,
    tensors_finite,
)
from .kernels import apply_kernels, select_kernels
from .reporting import Diagnostics, Interval, log_record
from .sinks import MetricSinks
from .teacher import EMACore, ema_schedule


@dataclass
class Trainer:
    cfg: Config
    spec: RunSpec  # the DeepSpeed JSON, typed: batch split, precision, optimizer, monitors
    dims: ParallelDims
    backend: Backend
    loader: StepLoader
    device: torch.device
    dtype: torch.dtype
    tp_rng: TPRegionRNG | None = None
    counters: dict = field(default_factory=lambda: {"skipped_updates": 0})
    peak_flops: float | None = None  # per device, for MFU
    timer: StepTimer = field(default_factory=lambda: StepTimer(torch.device("cpu"), enabled=False))
    last_shape: dict | None = None  # the last micro-batch's shape, for the profiling report
    nan_steps: set = field(default_factory=injected_nan_steps)
    teacher_fn: object = None  # the teacher as the model sees it: model.teacher_fn(teacher.module)
    # name → (TP-local shape, place in the full tensor): how checkpoints locate every weight
    params: dict[str, tuple[tuple[int, ...], TPSlice | None]] = field(default_factory=dict)
    cls_weight: float = 1.0  # the CLS sum's weight in the objective (model.cls_share), fixed for the run
    data_fingerprint: dict | None = None  # the data index's (data.fingerprint); None: no index (synthetic, tokens)

    @property
    def model(self) -> Data2Vec2:
        return cast(Data2Vec2, self.backend.model)  # a backend wraps any module; build_trainer gives it this one

    @property
    def teacher(self) -> EMACore:
        return self.backend.teacher


@dataclass
class StepStats:
    """Sums over this rank's micro-batches, kept on the device until a log step needs them."""

    loss_reg: torch.Tensor  # Σ over masked positions
    loss_cls: torch.Tensor  # this rank's share of the step's CLS term (already weighted: sums over ranks)
    masked: torch.Tensor
    kept: float  # positions the student encoded (known from the shapes: no device value)
    spreads: torch.Tensor  # (2 + K, 3, D) spread moments: targets, predictions, the K raw target layers
    data_time_s: float
    skipped: torch.Tensor | bool  # a device bool (read only at log steps), or the backend's host answer
    flops: float  # model FLOPs of this rank's micro-batches (analytic, from shapes: no sync)


def train_step(tr: Trainer, step: int) -> StepStats:
    cfg, backend = tr.cfg, tr.backend
    phase = tr.timer.phase
    t0 = time.perf_counter()
    with phase("data"):
        batches: list[MicroBatch] = tr.loader.step(step)  # on the device; read ahead while the last step ran
    data_time = time.perf_counter() - t0

    masks = _masks(batches)
    local_masked = torch.stack([m.mask.sum() for m in masks]).sum().float()
    global_masked = all_reduce(local_masked.clone(), tr.dims.dp_group)
    # The backend divides by grad_accum and averages over DP; undo both so the gradient is the objective's.
    scale = tr.spec.batch.dp * tr.spec.batch.grad_accum

    layerdrop_key = int(combine(cfg.seed, step))  # identical on every rank
    zero = torch.zeros((), device=tr.device)
    reg, cls, spreads = zero.clone(), zero.clone(), zero
    for i, (mb, mask) in enumerate(zip(batches, masks)):
        poison = float("nan") if tr.dims.rank == 0 and poisoned(tr.nan_steps, step + 1, i) else 1.0  # test hook
        if cfg.model.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last micro-batch's graph outputs are read: reuse them
        out = backend.forward(mb.source, tr.teacher_fn, mask, lengths=mb.lengths, layerdrop_key=layerdrop_key)
        loss = normalize_loss(out, global_masked, tr.cls_weight) * scale * poison
        with phase("backward"):
            backend.backward(loss)  # a non-finite loss makes a non-finite gradient norm: the backend skips the step
        with phase("optimizer"):
            backend.step()
        reg, cls = reg + out.loss_reg.detach() * poison, cls + out.loss_cls.detach() * tr.cls_weight
        spreads = spreads + out.moments() * poison

    applied = backend.step_applied()  # a device bool (nothing read back), or a host one
    with phase("ema"):
        tr.teacher.update(step + 1, applied=applied)  # a skipped step leaves the teacher as it was
    tr.timer.end_step()
    kept = sum(float(m.keep_idx.numel()) for m in masks)
    flops = sum(step_flops(cfg, StepShape(mb.source.shape[0], m.mask.shape[1], m.num_kept), mb.source.shape[-1])
                for mb, m in zip(batches, masks))
    tr.last_shape = {"samples": batches[0].source.shape[0], "positions": masks[0].mask.shape[1],
                     "kept": masks[0].num_kept, "input_len": batches[0].source.shape[-1]}
    skipped = ~applied if isinstance(applied, torch.Tensor) else not applied
    return StepStats(reg, cls, local_masked, kept, spreads, data_time, skipped, flops)


def _masks(batches: list[MicroBatch]) -> list[MaskInfo]:
    """Each micro-batch's mask: the loader made them (build_trainer gives it the model's make_mask)."""
    masks = [mb.mask for mb in batches if mb.mask is not None]
    if len(masks) != len(batches):
        raise RuntimeError("a micro-batch came without its mask: the loader was built without the model's masker")
    return masks


def build_trainer(cfg: Config, spec: RunSpec, dims: ParallelDims, device: torch.device) -> Trainer:
    """Model (identical init on every rank) → tensor parallelism → teacher copy → backend (student
    wrapped, optimizer, sharded EMA teacher)."""
    torch.manual_seed(cfg.seed)
    model = Data2Vec2(cfg.model_spec())
    tp_rng = TPRegionRNG(int(combine(cfg.seed, dims.dp_rank, dims.tp_rank, 1)), device)
    model = cast(Data2Vec2, parallelize(model, dims, tp_rng).to(device))  # the same module, its layers replaced
    kernels = select_kernels(cfg.model.kernels, device)
    apply_kernels(model, kernels)
    if dims.rank == 0:
        LOG.info(kernels.describe())
    # Default stream (dropout outside TP regions, mask noise): same within a TP group, differs across DP.
    torch.manual_seed(int(combine(cfg.seed, dims.dp_rank, 2)))
    teacher_module = model.teacher_copy()  # before the backend: ZeRO-3 and FSDP2 replace the parameters
    if cfg.model.compile:
        apply_compile(model, cfg.model.cuda_graphs)
        apply_compile(teacher_module, cfg.model.cuda_graphs)
    tracked = {n for n, p in teacher_module.named_parameters() if p.requires_grad}
    params = {n: (tuple(p.shape), tp_slice(p, dims)) for n, p in model.named_parameters()}
    backend = build_backend(cfg.parallel.backend, model, teacher_module, spec, dims, ema_schedule(cfg), device, tracked)
    dtype = torch.bfloat16 if spec.precision.bf16 else torch.float32
    plan = spec.batch
    schedule = RankSchedule(plan.global_batch, plan.micro_batch, plan.grad_accum, dims.dp_rank, dims.dp)
    wanted = index_spec(cfg)  # built once (rank 0), read by every other rank after it is done
    index = None if wanted is None else shared_index(wanted, dims.rank == 0, broadcast_object)
    loader = StepLoader(cfg, schedule, device, dtype, verbose=dims.rank == 0, prefetch_steps=cfg.data.prefetch_steps,
                        masker=lambda step, mb: model.make_mask(cfg.seed, step, mb.sample_ids, mb.source, mb.lengths),
                        index=index)
    return Trainer(cfg, spec, dims, backend, loader, device, dtype, tp_rng, peak_flops=device_peak_flops(device, dtype),
                   teacher_fn=model.teacher_fn(backend.teacher.module), params=params,
                   cls_weight=cls_share(cfg.model.cls_loss_reference_micro_batch, plan.global_batch),
                   data_fingerprint=None if index is None else fingerprint(index))


def _save(tr: Trainer, run_dir: Path, step: int, run_info: dict) -> None:
    finite = tensors_finite(tr.backend.local_weights())
    if not all_finite(torch.tensor([0.0 if finite else float("nan")], device=tr.device), None):
        raise NonFiniteTraining(f"weights are not finite at step {step}; not saving a checkpoint. "
                                f"Last good checkpoint: {checkpoint.read_latest(run_dir / 'checkpoints')}")
    t0 = time.perf_counter()
    tag = checkpoint.save_checkpoint(tr, run_dir / "checkpoints", step, tr.cfg.train.keep_last,
                                     {**run_info, "counters": dict(tr.counters)})
    if tr.dims.rank == 0:
        files = checkpoint.read_run_info(tag).get("files", {})
        write_event(run_dir, "checkpoint", step=step, seconds=round(time.perf_counter() - t0, 3),
                    bytes=sum(size for size, _crc in files.values()))


def train(tr: Trainer, run_dir: Path, start_step: int = 0, run_info: dict | None = None, profiler=None,
          watchdog: Watchdog | None = None) -> list[dict]:
    """Steps ``start_step .. max_updates-1``: log every ``log_every``, checkpoint every ``save_every``
    and at the end; on SIGTERM/SIGUSR1 checkpoint and raise :class:`Preempted`. ``watchdog`` hears
    of every finished step and of every checkpoint write."""
    cfg, rank0 = tr.cfg, tr.dims.rank == 0

    def saving() -> contextlib.AbstractContextManager:
        return watchdog.section("checkpoint") if watchdog is not None else contextlib.nullcontext()

    run_info = run_info or {}
    metrics = MetricsWriter(run_dir / runfiles.METRICS, enabled=rank0)
    sinks = MetricSinks(tr.spec.monitors, run_dir, enabled=rank0)
    diagnostics = Diagnostics(run_dir / runfiles.DIAGNOSTICS, cfg.train, enabled=rank0)
    stop = StopFlag()
    stop.install()
    rows, pending, t_last = [], Interval(), time.perf_counter()
    t_start = t_last
    # skip bookkeeping on the device, read where a step logs or saves anyway
    in_a_row = torch.zeros((), dtype=torch.int64, device=tr.device)
    longest = in_a_row.clone()
    skipped_total = torch.tensor(tr.counters["skipped_updates"], device=tr.device)
    tr.model.train()
    interactive = sys.stderr.isatty()  # batch jobs get one plain line per log step instead of a bar
    bar = tqdm(range(start_step, cfg.train.max_updates), initial=start_step, total=cfg.train.max_updates,
               disable=not (rank0 and interactive), dynamic_ncols=True, desc="pretrain")
    if profiler is not None:
        tr.timer = profiler.timer
        tr.model.phase = tr.timer.phase  # the model's own phases, timed from outside
        profiler.start()
    if rank0:
        write_event(run_dir, "train_start", step=start_step)
    try:
        for step in bar:
            if profiler is not None:
                profiler.step_begin(step)
            injected_failure(tr.dims.rank, step + 1, start_step)
            stats = train_step(tr, step)
            if profiler is not None:
                profiler.step_end(step)
                profiler.shape = profiler.shape or tr.last_shape
            if watchdog is not None:
                watchdog.beat(step + 1)
            if rank0 and step == start_step:  # start-up ends here (the first step warms up: compile, allocator)
                write_event(run_dir, "first_step", step=step + 1)
            pending.add(stats)
            skip = stats.skipped.long() if isinstance(stats.skipped, torch.Tensor) else int(stats.skipped)
            in_a_row = (in_a_row + 1) * skip
            longest = torch.maximum(longest, in_a_row)
            skipped_total += skip
            done = step + 1 == cfg.train.max_updates
            log = (step + 1) % cfg.train.log_every == 0 or done
            preempted = stop.agreed(step + 1)
            save = (step + 1) % cfg.train.save_every == 0 or done or preempted
            if log or save:
                tr.counters["skipped_updates"] = int(skipped_total)
                if int(longest) >= cfg.train.max_consecutive_skips:
                    raise NonFiniteTraining(
                        f"{int(longest)} consecutive steps with a non-finite loss or gradient norm (by step {step + 1}); "
                        f"stopping. Last good checkpoint: {checkpoint.read_latest(run_dir / 'checkpoints')}")
            if log:
                record = log_record(tr, step, pending, time.perf_counter() - t_last)
                row = metrics.write(record)  # as written: NaN/inf as strings
                sinks.write(record)
                diagnostics.write(tr, step, pending, record)
                rows.append(row)
                loss = float(row["loss"])
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
                if rank0 and not interactive:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / (step + 1 - start_step) * (cfg.train.max_updates - step - 1)
                    LOG.info(progress_line(row["step"], cfg.train.max_updates, loss, row["lr"], row["samples_per_s"],
                                           elapsed, eta))
                pending, t_last = Interval(), time.perf_counter()
            if save:
                with saving():
                    _save(tr, run_dir, step + 1, run_info)
            if preempted:
                raise Preempted(f"stop signal {stop.received or 'on another rank'}: checkpoint at step {step + 1} written")
        if profiler is not None:
            with saving():
                profiler.finish(tr)
        if rank0:
            write_event(run_dir, "finished", step=cfg.train.max_updates)
    finally:
        stop.uninstall()
        sinks.close()
        bar.close()
        tr.loader.close()
    return rows
