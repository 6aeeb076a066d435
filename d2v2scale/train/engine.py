"""The training step and loop: data2vec 2.0 under DeepSpeed.

One step, top to bottom (:func:`train_step`):

1. fetch this rank's ``grad_accum`` micro-batches and build their masks (shapes only);
2. all-reduce the masked-token count over the DP group: the loss of every micro-batch is
   normalised by this *global* count, so any split of the global batch (ranks × micro-batches)
   optimises the same objective;
3. per micro-batch: forward (teacher targets + student + decoder), ``engine.backward``,
   ``engine.step`` (DeepSpeed steps the optimizer, clips and schedules at the accumulation boundary);
4. EMA update of the teacher from the new student weights.

The loop (:func:`train`) adds logging, checkpoints and the run directory.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import Config
from ..data.loader import MicroBatch, StepLoader
from ..data.schedule import RankSchedule
from ..distributed.dims import ParallelDims
from ..model import Data2Vec2
from ..model.counter_rng import combine
from ..distributed.sharded_teacher import build_sharded_teacher
from ..distributed.tensor_parallel import TPRegionRNG, parallelize
from ..teacher import EMATeacher, ema_schedule
from . import checkpoint
from .ds_config import BatchPlan
from .metrics import MetricsWriter
from .optim import param_groups


@dataclass
class Trainer:
    cfg: Config
    plan: BatchPlan
    dims: ParallelDims
    engine: object  # deepspeed.DeepSpeedEngine
    teacher: EMATeacher
    loader: StepLoader
    device: torch.device
    dtype: torch.dtype

    @property
    def model(self) -> Data2Vec2:
        return self.engine.module


@dataclass
class StepStats:
    """Sums over this rank's micro-batches, kept on the device until a log step needs them."""

    loss_reg: torch.Tensor
    loss_cls: torch.Tensor
    masked: torch.Tensor
    kept: torch.Tensor
    target_var: torch.Tensor
    pred_var: torch.Tensor
    data_time_s: float


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def train_step(tr: Trainer, step: int) -> StepStats:
    cfg, engine, model = tr.cfg, tr.engine, tr.model
    t0 = time.perf_counter()
    batches: list[MicroBatch] = [mb.to(tr.device, tr.dtype) for mb in tr.loader.step(step)]
    data_time = time.perf_counter() - t0

    masks = [model.make_mask(cfg.seed, step, mb.sample_ids, mb.source, mb.lengths) for mb in batches]
    local_masked = torch.stack([m.mask.sum() for m in masks]).sum().float()
    global_masked = all_reduce_sum(local_masked.clone(), tr.dims.dp_group)
    # DeepSpeed divides by grad_accum and averages over DP; undo both so grads are sum / global count.
    scale = tr.plan.dp * tr.plan.grad_accum / global_masked

    zero = torch.zeros((), device=tr.device)
    reg, cls, tvar, pvar = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    for mb, mask in zip(batches, masks):
        out = engine(mb.source, tr.teacher.module, mask, lengths=mb.lengths, layerdrop_key=int(combine(cfg.seed, step)))
        engine.backward(out.loss_sum * scale)
        engine.step()
        reg, cls = reg + out.loss_reg.detach(), cls + out.loss_cls.detach()
        tvar, pvar = tvar + out.target_var, pvar + out.pred_var

    update_teacher(tr, step + 1)
    kept = sum(float(m.keep_idx.numel()) for m in masks)
    n = len(batches)
    return StepStats(reg, cls, local_masked, torch.tensor(kept, device=tr.device), tvar / n, pvar / n, data_time)


def update_teacher(tr: Trainer, num_updates: int) -> float:
    """EMA after the optimizer step: each rank averages its own slice of the student's fp32 masters."""
    return tr.teacher.update(num_updates)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host peak RSS (KiB → GB)


def log_record(tr: Trainer, step: int, stats: list[StepStats], wall: float) -> dict:
    """Reduce the interval's statistics over steps and DP ranks (the only host sync) into one row."""
    per_step = torch.stack([
        torch.stack([s.loss_reg, s.loss_cls, s.masked, s.kept, s.target_var, s.pred_var]).float() for s in stats
    ])
    vec = all_reduce_sum(per_step.sum(0), tr.dims.dp_group).tolist()
    reg, cls, masked, kept, tvar, pvar = vec
    tvar, pvar = tvar / len(stats), pvar / len(stats)
    grad_norm = tr.engine.get_global_grad_norm()
    return {
        "step": step + 1,
        "loss": (reg + cls) / masked,
        "loss_reg": reg / masked,
        "loss_cls": cls / masked,
        "lr": tr.engine.get_lr()[0],
        "ema_decay": tr.teacher.decay(step + 1),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "target_var": tvar / tr.plan.dp,
        "pred_var": pvar / tr.plan.dp,
        "masked_frac": masked / (masked + kept),
        "samples_per_s": tr.plan.global_batch * len(stats) / wall,
        "step_time_s": wall / len(stats),
        "data_time_s": sum(s.data_time_s for s in stats) / len(stats),
        "tflops_per_device": None,  # analytic FLOPs arrive with the profiling issue
        "mfu": None,
        "mem_peak_gb": peak_memory_gb(tr.device),
        "skipped_updates": int(getattr(tr.engine, "skipped_steps", 0)),
        "skipped_samples": int(getattr(tr.loader.source, "skipped", 0)),
    }


def build_trainer(cfg: Config, ds_config: dict, plan: BatchPlan, dims: ParallelDims, device: torch.device) -> Trainer:
    """Model (identical init on every rank) → tensor parallelism → teacher copy → DeepSpeed → sharded EMA."""
    import deepspeed

    torch.manual_seed(cfg.seed)
    model = Data2Vec2(cfg)
    tp_rng = TPRegionRNG(int(combine(cfg.seed, dims.dp_rank, dims.tp_rank, 1)), device)
    model = parallelize(model, dims, tp_rng).to(device)
    # Default stream (dropout outside TP regions, mask noise): same within a TP group, differs across DP.
    torch.manual_seed(int(combine(cfg.seed, dims.dp_rank, 2)))
    teacher_module = model.teacher_copy()  # before DeepSpeed: ZeRO-3 empties the module's parameters
    tracked = {n for n, p in teacher_module.named_parameters() if p.requires_grad}
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    dtype = torch.bfloat16 if bf16 else torch.float32
    wd = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, wd, tracked), config=ds_config,
        mpu=dims.mpu if dims.world_size > 1 else None,
    )
    teacher = build_sharded_teacher(engine, teacher_module, ema_schedule(cfg), dims, dtype)
    schedule = RankSchedule(plan.global_batch, plan.micro_batch, plan.grad_accum, dims.dp_rank, dims.dp)
    return Trainer(cfg, plan, dims, engine, teacher, StepLoader(cfg, schedule), device, dtype)


def train(tr: Trainer, run_dir: Path, start_step: int = 0) -> list[dict]:
    """Steps ``start_step .. max_updates-1``; logs every ``log_every``, checkpoints every ``save_every`` and at the end."""
    cfg, rank0 = tr.cfg, tr.dims.rank == 0
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=rank0)
    ckpt_dir = run_dir / "checkpoints"
    rows, pending, t_last = [], [], time.perf_counter()
    tr.engine.train()
    interactive = sys.stderr.isatty()  # batch jobs get one plain line per log step instead of a bar
    bar = tqdm(range(start_step, cfg.train.max_updates), initial=start_step, total=cfg.train.max_updates,
               disable=not (rank0 and interactive), dynamic_ncols=True, desc="pretrain")
    for step in bar:
        pending.append(train_step(tr, step))
        last_step = step + 1 == cfg.train.max_updates
        if (step + 1) % cfg.train.log_every == 0 or last_step:
            row = metrics.write(log_record(tr, step, pending, time.perf_counter() - t_last))
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if rank0 and not interactive:
                print(f"[d2v2scale] step {row['step']}/{cfg.train.max_updates} loss {row['loss']:.4f} "
                      f"lr {row['lr']:.3e} {row['samples_per_s']:.1f} samples/s", flush=True)
            pending, t_last = [], time.perf_counter()
        if (step + 1) % cfg.train.save_every == 0 or last_step:
            checkpoint.save_checkpoint(tr.engine, tr.teacher, ckpt_dir, step + 1, tr.dims.rank)
    return rows
