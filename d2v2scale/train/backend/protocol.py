"""What the trainer and the checkpoints may call on a backend (:class:`Backend`), the optional
native-format protocol (:class:`NativeCheckpoints`), and the shape of the sharded state they
exchange. The backends import this; the registry in ``__init__`` imports them.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from ..teacher import EMACore

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
    def step_applied(self) -> torch.Tensor | bool: ...  # a device flag (nothing read back) or a host bool
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
