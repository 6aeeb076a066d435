"""What every modality encoder shares, and the contract each one keeps.

An encoder (each modality's module in :mod:`d2v2scale.modalities` builds its own, from the
model section: ``Modality.encoder(cfg.model)``) is a local encoder (patch embed | wav CNN | token
embedding) and the positional/context part that turns local features into the input of the
shared blocks. It is an ``nn.Module`` that provides (:class:`d2v2scale.modality_registry.Encoder`, checked
statically), with B samples, T positions per sample, D = ``model.embed_dim``, M =
``model.clone_batch`` masked views per sample and K kept positions per view:

- ``local_features(source, lengths=None) -> (x (B, T, D), valid (B, T) bool or None)``, run once
  per sample (the student's, and the teacher's when it has its own local encoder); ``lengths``
  (B,) in input units marks padding at the end, ``valid`` None means nothing is padded;
- ``num_positions(source, lengths=None) -> (T, per-sample positions (B,) or None)``, from shapes
  alone (no forward): the masks are made from it before the step, on the host;
- ``forward(x, valid, mask, clones=1) -> (x, attn_bias)`` ("contextualize"): without a mask, the
  full unmasked sequence (B, E + T, D) (the teacher's view, E = ``model.num_extra_tokens``
  leading tokens); with a :class:`MaskInfo` of B·M rows, only each row's K kept tokens
  (B·M, E + K, D), rows in repeat_interleave order, gathered straight from the per-sample
  features (no M× full copy). ``attn_bias`` is None or an additive fp32 bias broadcastable to
  (rows, heads, n, n) (padding, ALiBi) that the shared blocks reuse;
- ``reset_parameters()``: the modality's own initialisation, run after the model's BERT init.

A local encoder the teacher may skip (``teacher.ema_local_encoder=false``) is named
``local_encoder`` (and ``project_features``), since the teacher copy drops those names. Every
parameter is read inside the ``forward`` of the module that owns it, so ZeRO-3's per-module
parameter gathering sees each use.

Submodule names follow fairseq's ``modality_encoders.<MOD>.*`` so interop is a short rename table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import BlockEncoder, make_blocks
from .masking import MaskInfo

if TYPE_CHECKING:
    from ..config import ModelConfig


def rows_to_samples(rows: int, clones: int, device: torch.device) -> torch.Tensor:
    """The sample each of the B·M masked rows (repeat_interleave order) was cloned from."""
    return torch.arange(rows, device=device) // clones


def gather_kept(x: torch.Tensor, mask: MaskInfo, clones: int) -> torch.Tensor:
    """(B, T, D) per-sample features → (B·M, K, D) kept tokens of every masked view."""
    sample = rows_to_samples(mask.keep_idx.shape[0], clones, x.device)
    return x[sample[:, None], mask.keep_idx]


def key_padding_bias(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, 1, T) additive bias hiding padded keys, or None when nothing is padded."""
    if valid is None:
        return None
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]


def context_encoder(cfg: ModelConfig, with_norm: bool) -> BlockEncoder:
    """The modality "prenet": ``model.prenet_depth`` blocks before the shared ones (fairseq ``BlockEncoder``)."""
    norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if with_norm else None
    drop = cfg.prenet_dropout if cfg.prenet_depth > 0 else 0.0
    return BlockEncoder(make_blocks(cfg, cfg.prenet_depth), norm, drop, cfg.activation_checkpointing)
