"""Resolve a DeepSpeed JSON against the preset: fill ``"auto"`` values, check the batch math.

The preset pins the global batch (``train.global_batch``); the JSON says how it is split
(micro-batch per GPU, gradient accumulation). Any two of micro-batch, accumulation and the DP size
determine the third; a combination that does not multiply out to the global batch is a
:class:`~d2v2scale.config.ConfigError`, never a silently different batch.

Audio presets with ``data.max_tokens`` count the global batch in audio samples: each micro-batch
holds up to ``max_tokens`` samples, so accumulation = global / (max_tokens × dp), and DeepSpeed
sees a nominal micro-batch of 1 (our loss is normalised by masked tokens, not by that number).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .. import modality_registry
from ..config import Config, ConfigError
from .json_file import AUTO, flatten


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int  # samples per micro-batch per rank (audio: max_tokens audio samples)
    grad_accum: int
    dp: int
    unit: str  # "samples" or "audio samples"

    def describe(self) -> str:
        return (f"effective global batch {self.global_batch} {self.unit} = micro-batch {self.micro_batch} "
                f"× grad-accum {self.grad_accum} × data-parallel {self.dp}")


def _int_or_auto(ds: dict, key: str):
    value = ds.get(key, AUTO)
    if value == AUTO:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"ds_config {key}={value!r} is not allowed; allowed values: \"auto\" or an integer >= 1")
    return value


def plan_batch(ds: dict, cfg: Config, dp: int) -> BatchPlan:
    """Split ``train.global_batch`` over ``dp`` ranks as the JSON asks, or fail naming the keys."""
    g = cfg.train.global_batch
    tbs = _int_or_auto(ds, "train_batch_size")
    micro = _int_or_auto(ds, "train_micro_batch_size_per_gpu")
    gas = _int_or_auto(ds, "gradient_accumulation_steps")
    if tbs is not None and tbs != g:
        raise ConfigError(f"ds_config train_batch_size={tbs} disagrees with train.global_batch={g}; "
                          f"allowed values: \"auto\" or {g}")
    budget = modality_registry.batch_budget(cfg)
    if budget is not None:
        modality = modality_registry.get(cfg.model.modality)
        if micro is not None:
            raise ConfigError(f"ds_config train_micro_batch_size_per_gpu must be \"auto\" when data.{modality.budget_key} "
                              f"sets the {cfg.model.modality} micro-batch")
        micro, unit = budget, modality.budget_unit
    else:
        unit = "samples"
    if micro is None and gas is None:
        gas = 1
    if micro is None:
        micro, rem = divmod(g, gas * dp)
        if rem or micro == 0:
            raise ConfigError(f"batch math does not add up: train.global_batch={g} is not divisible by "
                              f"gradient_accumulation_steps={gas} × data-parallel size {dp}; "
                              f"allowed: a global batch divisible by {gas * dp}")
    elif gas is None:
        gas, rem = divmod(g, micro * dp)
        if rem or gas == 0:
            raise ConfigError(f"batch math does not add up: train.global_batch={g} is not divisible by "
                              f"micro-batch {micro} × data-parallel size {dp}; allowed: a global batch divisible by {micro * dp}")
    if micro * gas * dp != g:
        raise ConfigError(f"batch math does not add up: micro-batch {micro} × gradient_accumulation_steps {gas} × "
                          f"data-parallel size {dp} = {micro * gas * dp} != train.global_batch={g}")
    return BatchPlan(g, micro, gas, dp, unit)


def resolve_ds_config(ds: dict, cfg: Config, plan: BatchPlan) -> dict:
    """A copy of the JSON with every ``"auto"`` replaced; DeepSpeed itself rejects ``"auto"``."""
    out = copy.deepcopy(ds)
    engine_micro = 1 if plan.unit == "audio samples" else plan.micro_batch
    out["train_micro_batch_size_per_gpu"] = engine_micro
    out["gradient_accumulation_steps"] = plan.grad_accum
    out["train_batch_size"] = engine_micro * plan.grad_accum * plan.dp
    sched = out.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == AUTO:
        sched["total_num_steps"] = cfg.train.max_updates
    leftover = [k for k, v in flatten(out).items() if v == AUTO]
    if leftover:
        raise ConfigError(f"ds_config keys {', '.join(leftover)} are \"auto\" but d2v2scale cannot fill them; "
                          "allowed \"auto\" keys: train_batch_size, train_micro_batch_size_per_gpu, "
                          "gradient_accumulation_steps, scheduler.params.total_num_steps")
    return out


def linear_scaled_batch(ds: dict, cfg: Config, dp: int) -> int:
    """The global batch ``train.batch_scaling=linear`` grows to: the next multiple of what one step
    takes over ``dp`` ranks (micro-batch or sample budget × ``dp`` × the JSON's accumulation steps).
    The one rule: the launcher applies it, the planner's ways out print it."""
    unit = modality_registry.batch_budget(cfg) or _int_or_auto(ds, "train_micro_batch_size_per_gpu") or 1
    quantum = unit * dp * (_int_or_auto(ds, "gradient_accumulation_steps") or 1)
    return -(-cfg.train.global_batch // quantum) * quantum


def scale_batch_for_world(ds: dict, cfg: Config, dp: int) -> str | None:
    """``train.batch_scaling=linear``: when the pinned global batch cannot be split over ``dp``
    ranks as the JSON asks, grow it to the next multiple that can and scale the peak LR by the
    same factor (the linear rule of Goyal et al. / MAE). Mutates ``cfg`` and ``ds``; returns the
    line to print, or None when nothing changed. With ``none`` (default) nothing is ever scaled."""
    if cfg.train.batch_scaling == "none":
        return None
    try:
        plan_batch(ds, cfg, dp)
        return None
    except ConfigError:
        pass
    old, new = cfg.train.global_batch, linear_scaled_batch(ds, cfg, dp)
    factor = new / old
    params = ds.setdefault("optimizer", {}).setdefault("params", {})
    old_lr = params.get("lr")
    cfg.train.global_batch = new
    if old_lr is not None:
        params["lr"] = old_lr * factor
    return (f"train.batch_scaling=linear: global batch {old} → {new} (×{factor:g}) to split over {dp} data-parallel "
            f"ranks; peak lr {old_lr} → {params.get('lr')} (×{factor:g}, linear rule)")
