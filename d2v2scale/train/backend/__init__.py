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

from types import ModuleType
from typing import Callable, Protocol

import torch
from torch import nn

from ..teacher import EMACore, EMASchedule

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state besides its step count

# (name, start, stop, {"model": fp32 master values, "exp_avg": ..., "exp_avg_sq": ...}): live views
# of the elements [start, stop) of the flattened TP-local parameter ``name`` this rank holds.
StateRange = tuple[str, int, int, dict[str, torch.Tensor]]
# read(kind, name, start, stop) -> the checkpoint's values for those elements
Read = Callable[[str, str, int, int], torch.Tensor]


class Backend(Protocol):
    name: str
    model: nn.Module  # the student (call it to run a forward through the backend's wrapping)
    teacher: EMACore

    def forward(self, *args, **kwargs): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def step_applied(self) -> bool: ...
    def grad_norm(self) -> float | None: ...
    def lr(self) -> float: ...
    def local_weights(self) -> list[torch.Tensor]: ...
    def describe(self) -> dict: ...
    def state_ranges(self) -> list[StateRange]: ...
    def counters(self) -> dict: ...
    def load_state(self, read: Read, counters: dict) -> None: ...


class NativeCheckpoints(Protocol):
    """A backend that can also write its engine's own checkpoint format (resumable on the same
    layout only; ``train.checkpoint_format=native``)."""

    def save_native(self, ckpt_dir, tag: str, step: int) -> None: ...
    def load_native(self, tag_dir) -> int: ...


def _deepspeed():
    from . import deepspeed

    return deepspeed


def _fsdp2():
    from . import fsdp2

    return fsdp2


# parallel.backend → its module (``check_ds_config`` and ``BACKEND``), imported only when chosen, so
# a run never imports the engine it does not use; ``config.BACKENDS`` names the same, the default first.
REGISTRY: dict[str, Callable[[], ModuleType]] = {"deepspeed": _deepspeed, "fsdp2": _fsdp2}


def _module(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise ValueError(f"parallel.backend={name}; allowed values: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def check_ds_config(name: str, ds: dict, tp: int) -> None:
    """Refuse (ConfigError), before any process group starts, a malformed ds_config (every section,
    both backends) and then what backend ``name`` cannot run of a well-formed one."""
    from ..ds_validate import validate_ds_config

    validate_ds_config(ds, name)
    _module(name).check_ds_config(ds, tp)


def build_backend(name: str, model: nn.Module, teacher_module: nn.Module, ds_config: dict, dims, schedule: EMASchedule,
                  device: torch.device, tracked: set[str]) -> Backend:
    """``model`` is the parallelized student, ``teacher_module`` its teacher copy (taken before any wrapping)."""
    return _module(name).BACKEND(model, teacher_module, ds_config, dims, schedule, device, tracked)


def _step_count(optimizer: torch.optim.Optimizer, param: torch.Tensor, value: float) -> torch.Tensor:
    """AdamW's step counter as torch keeps it: on the parameter's device for the fused and
    capturable implementations, a CPU scalar otherwise."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32, device=param.device if on_device else "cpu")


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """AdamW's state of ``param``, created (zero moments, step 0) if it has not stepped yet, the way
    torch would on its first step, so that a checkpoint can be loaded before any step."""
    state = optimizer.state[param]
    if not state:
        state["step"] = _step_count(optimizer, param, 0)
        for key in MOMENTS:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's step count (the same for every parameter: a skipped step skips them all)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_steps(optimizer: torch.optim.Optimizer, params, steps: int) -> None:
    for p in params:
        adam_state(optimizer, p)["step"] = _step_count(optimizer, p, steps)
