"""AdamW's per-parameter state as both backends keep and restore it: created before the first step
(so a checkpoint loads before any step), and the step count set the way torch keeps it.
"""
from __future__ import annotations

import torch

from .protocol import MOMENTS


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
