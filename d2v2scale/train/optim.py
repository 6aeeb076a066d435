"""Optimizer parameter groups: no weight decay on 1-D parameters, biases and ALiBi scales.

Matches the reference's ``optim_overrides`` tags; frozen parameters (fixed image positions)
are left out of the optimizer entirely.
"""
from __future__ import annotations

from torch import nn


def is_no_decay(name: str, param) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("alibi_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
