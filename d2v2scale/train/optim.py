"""Optimizer parameter groups: no weight decay on 1-D parameters, biases and ALiBi scales.

Matches the reference's ``optim_overrides`` tags; frozen parameters (fixed image positions)
are left out of the optimizer entirely. Parameters the EMA teacher tracks and those it does not
(decoder, audio CNN) go to separate groups, so that DeepSpeed's per-group flat partitions can be
mirrored by the sharded teacher without carrying the decoder along.
"""
from __future__ import annotations

from torch import nn


def is_no_decay(name: str, param) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("alibi_scale")


def param_groups(model: nn.Module, weight_decay: float, tracked: set[str] | None = None) -> list[dict]:
    """Up to four groups: (teacher-tracked | not) × (decay | no decay); empty ones are dropped."""
    tracked = tracked if tracked is not None else set()
    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name in tracked, not is_no_decay(name, p))
        buckets.setdefault(key, []).append(p)
    order = [(True, True), (True, False), (False, True), (False, False)]
    return [
        {"params": buckets[k], "weight_decay": weight_decay if k[1] else 0.0}
        for k in order
        if buckets.get(k)
    ]
