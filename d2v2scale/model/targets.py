"""Teacher target construction (fairseq ``make_targets``), always in fp32.

Top-K block FFN outputs → optional per-layer instance-norm (each channel over time, per sample)
or layer-norm → mean over the K layers → optional final layer-norm (images) or instance-norm.
Unlike the reference, padded time steps are excluded from instance-norm statistics; for
unpadded batches the result is identical to ``F.instance_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5


def instance_norm(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each (sample, channel) over time; ``valid`` (B, T) bool excludes padding."""
    if valid is None:
        return F.instance_norm(x.transpose(1, 2), eps=_EPS).transpose(1, 2)
    w = valid.unsqueeze(-1).to(x.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + _EPS)


def make_targets(
    layers: list[torch.Tensor],
    top_k: int,
    *,
    instance_norm_target_layer: bool,
    layer_norm_target_layer: bool,
    layer_norm_targets: bool,
    instance_norm_targets: bool,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, D) fp32 regression targets from the teacher's per-block FFN outputs."""
    selected = layers[-top_k:]
    y = torch.zeros_like(selected[0], dtype=torch.float32)
    for layer in selected:
        layer = layer.float()
        if instance_norm_target_layer:
            layer = instance_norm(layer, valid)
        elif layer_norm_target_layer:
            layer = F.layer_norm(layer, layer.shape[-1:], eps=_EPS)
        y = y + layer
    y = y / len(selected)
    if layer_norm_targets:
        y = F.layer_norm(y, y.shape[-1:], eps=_EPS)
    if instance_norm_targets:
        y = instance_norm(y, valid)
    return y
