"""The training backend: the one interface the trainer talks to.

A backend wraps the (tensor-parallel) student, owns the optimizer and the LR schedule, builds
the EMA teacher in the layout of its own fp32 master shards, and exposes its sharded state as
flat ranges of named parameters (what layout-free checkpoints store). Everything
engine-specific lives in that engine's module (DeepSpeed's private names included) and nowhere else.

==========================  ==============================  =================================
``parallel.backend=``       DeepSpeed (default)             ``fsdp2``
==========================  ==============================  =================================
launch                      its launcher, torchrun, srun    torchrun, srun (or DeepSpeed's)
sharding (ds_config)        ZeRO 0-3                        ``fully_shard`` per block + root;
                                                            stage 3 reshards after forward
precision (``bf16``)        DeepSpeed bf16 optimizer        ``MixedPrecisionPolicy`` (bf16
                                                            compute, fp32 reduce and masters)
optimizer / schedule        ds_config ``AdamW`` /           the same sections: torch AdamW /
                            ``WarmupCosineLR``              the same WarmupCosine formula
tensor parallelism          yes (ZeRO 1/2)                  yes (any stage; DP mesh from dims)
EMA teacher                 fp32 shards aligned with        its own FSDP2 module: fp32 shards
                            ZeRO's partitions + a full      + one block gathered at a time
                            compute copy per GPU            (1/dp of the teacher resident)
checkpoints                 layout-free, or its native      layout-free
                            format (same layout only)
==========================  ==============================  =================================

Semantics both keep: the loss handed to :meth:`Backend.backward` is this rank's micro-batch loss;
gradients are averaged over the data-parallel ranks and divided by the accumulation steps (the
trainer's normaliser undoes both); :meth:`Backend.step` is called after every micro-batch and
steps at the accumulation boundary; a non-finite gradient norm skips the update and holds the
schedule.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from ...config import BACKENDS
from ...run_spec import RunSpec, validate_ds_config
from ..teacher import EMASchedule
from .protocol import Backend

# parallel.backend → its module ``backend/<name>.py`` (``SCHEDULES``, ``check_spec``, ``BACKEND``), imported
# only when chosen, so a run never imports the engine it does not use. The names are
# ``config.BACKENDS``'s, the one list (the default first).
REGISTRY: dict[str, Callable[[], ModuleType]] = {
    name: functools.partial(importlib.import_module, f".{name}", __package__) for name in BACKENDS}


def _module(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise ValueError(f"parallel.backend={name}; allowed values: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def validate_json(name: str, ds: dict) -> None:
    """Refuse (ConfigError, one line) a malformed DeepSpeed JSON, every section, for backend ``name``
    (its module's ``SCHEDULES``: the scheduler types it runs, None for all of DeepSpeed's)."""
    validate_ds_config(ds, name, _module(name).SCHEDULES)


def check_spec(name: str, spec: RunSpec, tp: int) -> None:
    """Refuse, before any process group starts, what backend ``name`` cannot run of a well-formed spec."""
    _module(name).check_spec(spec, tp)


def build_backend(name: str, model: nn.Module, teacher_module: nn.Module, spec: RunSpec, dims, schedule: EMASchedule,
                  device: torch.device, tracked: set[str]) -> Backend:
    """``model`` is the parallelized student, ``teacher_module`` its teacher copy (taken before any wrapping)."""
    return _module(name).BACKEND(model, teacher_module, spec, dims, schedule, device, tracked)
