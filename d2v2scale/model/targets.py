"""Teacher target construction (fairseq ``make_targets``), always in fp32.

Top-K block FFN outputs → optional per-layer instance-norm (each channel over time, per sample)
or layer-norm → mean over the K layers → optional final layer-norm (images) or instance-norm.
Unlike the reference, padded time steps are excluded from instance-norm statistics; for
unpadded batches the result is ``F.instance_norm``'s.

The K layers arrive stacked, (K, B, T, D): each step below is one kernel for all of them, where
fairseq's loop launches ~10 per layer (ViT-H's eager teacher: 680 → 339 kernels a step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5


def instance_norm(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each (sample, channel) of ``x`` (..., B, T, D) over time; ``valid`` (B, T) bool
    excludes padding."""
    if valid is None:
        var, mean = torch.var_mean(x, dim=-2, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + _EPS)
    w = valid.unsqueeze(-1).to(x.dtype)
    n = w.sum(-2, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(-2, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(-2, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + _EPS)


def stack_top(layers: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """(K, B, T, D) fp32: the last ``top_k`` layers in one tensor (one copy, one cast)."""
    return torch.stack(layers[-top_k:]).float()


def make_targets(
    top: torch.Tensor,
    *,
    instance_norm_target_layer: bool,
    layer_norm_target_layer: bool,
    layer_norm_targets: bool,
    instance_norm_targets: bool,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, D) fp32 regression targets from the teacher's top-K FFN outputs (:func:`stack_top`)."""
    if instance_norm_target_layer:
        top = instance_norm(top, valid)
    elif layer_norm_target_layer:
        top = F.layer_norm(top, top.shape[-1:], eps=_EPS)
    y = top.mean(0)
    if layer_norm_targets:
        y = F.layer_norm(y, y.shape[-1:], eps=_EPS)
    if instance_norm_targets:
        y = instance_norm(y, valid)
    return y
