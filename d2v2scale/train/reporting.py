"""Turning step statistics into the ``metrics.jsonl`` row and ``diagnostics.jsonl`` (collapse watch)."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed.runtime import all_reduce
from ..logs import LOG


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host peak RSS (KiB → GB)


def skipped_samples(tr) -> int:
    """Unusable data files seen by any rank so far (each file counted once). Rank 0 logs its own
    when it meets them; the ones only other ranks met are logged here, once, by rank 0."""
    own = tr.loader.skipped_files()
    files = own
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, own)
        files = frozenset().union(*gathered)
    if tr.dims.rank == 0:
        for path in sorted(files - own - tr.reported_skips):
            LOG.warning(f"skipping {path}: unusable (found by another rank)")
        tr.reported_skips |= files - own
    return len(files)


def log_record(tr, step: int, stats: list, wall: float) -> dict:
    """Reduce the interval's statistics over steps and DP ranks (the only host sync) into one row."""
    per_step = torch.stack([
        torch.stack([s.loss_reg, s.loss_cls, s.masked, s.kept, s.target_var, s.pred_var]).float() for s in stats
    ])
    reg, cls, masked, kept, tvar, pvar = all_reduce(per_step.sum(0), tr.dims.dp_group).tolist()
    tvar, pvar = tvar / len(stats) / tr.plan.dp, pvar / len(stats) / tr.plan.dp
    grad_norm = tr.backend.grad_norm()
    flops = all_reduce(torch.tensor([sum(st.flops for st in stats)], dtype=torch.float64, device=tr.device), tr.dims.dp_group)
    flops_per_s_device = float(flops) / wall / tr.dims.world_size
    return {
        "step": step + 1,
        "loss": (reg + cls) / masked,
        "loss_reg": reg / masked,
        "loss_cls": cls / masked,
        "lr": tr.backend.lr(),
        "ema_decay": tr.teacher.decay(step + 1),
        "grad_norm": grad_norm,
        "target_var": tvar,
        "pred_var": pvar,
        "masked_frac": masked / (masked + kept),
        "samples_per_s": tr.plan.global_batch * len(stats) / wall,
        "step_time_s": wall / len(stats),
        "data_time_s": sum(s.data_time_s for s in stats) / len(stats),
        "tflops_per_device": flops_per_s_device / 1e12,
        "mfu": None if tr.peak_flops is None else flops_per_s_device / tr.peak_flops,
        "mem_peak_gb": peak_memory_gb(tr.device),
        "skipped_updates": tr.counters["skipped_updates"],
        "skipped_samples": skipped_samples(tr),
    }


class Diagnostics:
    """Collapse watch. The reference aborts a run when the final target or prediction spread drops
    under a threshold; here they, and the raw spread of every target layer, are logged at each log
    step and a threshold crossing is a warning (printed once per kind), not an abort. Raw layer
    outputs have no natural scale, so a layer warns when its spread falls under
    ``train.warn_layer_spread_ratio`` of its value at the first log step of this process."""

    def __init__(self, path: Path, train_cfg, enabled: bool):
        self.path, self.enabled = path, enabled
        self.min_target, self.min_pred = train_cfg.warn_target_var, train_cfg.warn_pred_var
        self.layer_ratio = train_cfg.warn_layer_spread_ratio
        self.first_layer_var: list[float] | None = None
        self.warned: set[str] = set()

    def write(self, tr, step: int, stats: list, row: dict) -> list[str]:
        layers = [s.layer_target_var for s in stats if s.layer_target_var is not None]
        layer_var = []
        if layers:
            mean = all_reduce(torch.stack(layers).mean(0).float(), tr.dims.dp_group) / tr.plan.dp
            layer_var = [round(v, 6) for v in mean.tolist()]
        warnings = []
        if row["target_var"] is not None and row["target_var"] < self.min_target:
            warnings.append(f"target_var {row['target_var']:.4g} < train.warn_target_var {self.min_target}")
        if row["pred_var"] is not None and row["pred_var"] < self.min_pred:
            warnings.append(f"pred_var {row['pred_var']:.4g} < train.warn_pred_var {self.min_pred}")
        if layer_var and self.first_layer_var is None:
            self.first_layer_var = layer_var
        low = [i for i, (v, v0) in enumerate(zip(layer_var, self.first_layer_var or [])) if v < self.layer_ratio * v0]
        if low:
            warnings.append(f"target layers {low} (of the top {len(layer_var)}) fell under "
                            f"train.warn_layer_spread_ratio={self.layer_ratio} of their first logged spread")
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step + 1, "target_var": row["target_var"], "pred_var": row["pred_var"],
                                    "layer_target_var": layer_var, "warnings": warnings}) + "\n")
            for w in warnings:
                kind = w.split()[0]
                if kind not in self.warned:
                    self.warned.add(kind)
                    LOG.warning(f"WARNING step {step + 1}: possible collapse: {w} (see diagnostics.jsonl)")
        return warnings
