"""Turning step statistics into the ``metrics.jsonl`` row and ``diagnostics.jsonl`` (collapse watch)."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from ..distributed.runtime import all_reduce
from ..logs import LOG
from ..model.data2vec2 import spread
from ..runfiles import as_json


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # host peak RSS (KiB → GB)


def skipped_samples(tr) -> int:
    """Unusable data files seen by any rank so far (each file counted once). Rank 0 logs its own
    when it meets them, and the ones only other ranks met here, with their reason: each once per run."""
    own: dict[str, str] = tr.loader.skipped_files()
    found = dict(own)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, own)
        for other in gathered:
            assert other is not None  # all_gather_object filled every slot
            found.update(other)
    if tr.dims.rank == 0:
        tr.loader.log_found_elsewhere({path: why for path, why in found.items() if path not in own})
    return len(found)


class Interval:
    """The steps since the last log step, summed on the device as they come (memory does not grow
    with ``train.log_every``). Losses and spreads pool every position of the interval on every
    DP rank, so a row is the same however the global batch was split."""

    def __init__(self, stats: Iterable = ()):
        self.steps, self.data_time_s, self.flops, self.kept = 0, 0.0, 0.0, 0.0  # host numbers: known from shapes
        self.sums: torch.Tensor | None = None  # float64 on the device: loss_reg, loss_cls, masked
        self.spreads: torch.Tensor | None = None  # (2 + K, 3, D) spread moments (engine.StepStats)
        self._totals: tuple[list[float], list[float]] | None = None
        for s in stats:
            self.add(s)

    def add(self, s) -> None:
        """Fold in one :class:`~d2v2scale.train.engine.StepStats` (device work only: no host sync)."""
        sums = torch.stack([s.loss_reg, s.loss_cls, s.masked]).double()
        self.sums = sums if self.sums is None else self.sums + sums
        self.spreads = s.spreads if self.spreads is None else self.spreads + s.spreads
        self.steps += 1
        self.data_time_s += s.data_time_s
        self.flops += s.flops
        self.kept += s.kept

    def totals(self, group) -> tuple[list[float], list[float]]:
        """(loss_reg, loss_cls, masked, kept, FLOPs summed over DP ranks; spreads of targets,
        predictions and each target layer): one all-reduce, the interval's only host sync, done
        once however many readers ask."""
        if self._totals is None:
            sums, spreads = self.sums, self.spreads
            assert sums is not None and spreads is not None, "an interval is read after at least one step"
            counts = sums.new_tensor([self.kept, self.flops])
            flat = all_reduce(torch.cat([sums, counts, spreads.reshape(-1)]), group)
            self._totals = flat[:5].tolist(), spread(flat[5:].view_as(spreads)).tolist()
        return self._totals


def log_record(tr, step: int, interval: Interval, wall: float) -> dict:
    """The ``metrics.jsonl`` row of the interval ending at ``step``."""
    (reg, cls, masked, kept, flops), spreads = interval.totals(tr.dims.dp_group)
    steps = interval.steps
    flops_per_s_device = flops / wall / tr.dims.world_size
    return {
        "step": step + 1,
        "loss": reg / masked + cls / steps,
        "loss_reg": reg / masked,
        "loss_cls": cls / steps,
        "lr": tr.backend.lr(),
        "ema_decay": tr.teacher.decay(step + 1),
        "grad_norm": tr.backend.grad_norm(),
        "target_var": spreads[0],
        "pred_var": spreads[1],
        "masked_frac": masked / (masked + kept),
        "samples_per_s": tr.spec.batch.global_batch * steps / wall,
        "step_time_s": wall / steps,
        "data_time_s": interval.data_time_s / steps,
        "tflops_per_device": flops_per_s_device / 1e12,
        "mfu": None if tr.peak_flops is None else flops_per_s_device / tr.peak_flops,
        "mem_peak_gb": peak_memory_gb(tr.device),
        "skipped_updates": tr.counters["skipped_updates"],
        "skipped_samples": skipped_samples(tr),
    }


def _finite(value) -> float | None:
    """A finite number, or None (NaN, inf, a value that was not measured)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


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

    def write(self, tr, step: int, interval: Interval, row: dict) -> list[str]:
        """``row``: the interval's metrics as :func:`log_record` made them (numbers, NaN included)."""
        layer_var = [round(v, 6) for v in interval.totals(tr.dims.dp_group)[1][2:]]
        warnings = []
        target, pred = _finite(row["target_var"]), _finite(row["pred_var"])
        if target is not None and target < self.min_target:
            warnings.append(f"target_var {target:.4g} < train.warn_target_var {self.min_target}")
        if pred is not None and pred < self.min_pred:
            warnings.append(f"pred_var {pred:.4g} < train.warn_pred_var {self.min_pred}")
        if None in (target, pred) or not all(math.isfinite(v) for v in layer_var):
            warnings.append("non-finite spread (a skipped step's statistics)")
        if layer_var and self.first_layer_var is None and all(math.isfinite(v) for v in layer_var):
            self.first_layer_var = layer_var
        low = [i for i, (v, v0) in enumerate(zip(layer_var, self.first_layer_var or [])) if v < self.layer_ratio * v0]
        if low:
            warnings.append(f"target layers {low} (of the top {len(layer_var)}) fell under "
                            f"train.warn_layer_spread_ratio={self.layer_ratio} of their first logged spread")
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step + 1, "target_var": as_json(row["target_var"]),
                                    "pred_var": as_json(row["pred_var"]), "layer_target_var": as_json(layer_var),
                                    "warnings": warnings}) + "\n")
            for w in warnings:
                kind = w.split()[0]
                if kind not in self.warned:
                    self.warned.add(kind)
                    LOG.warning(f"WARNING step {step + 1}: possible collapse: {w} (see diagnostics.jsonl)")
        return warnings
