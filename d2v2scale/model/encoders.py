"""What every modality encoder shares. An encoder (each modality's module in
:mod:`d2v2scale.modalities` builds its own) is a local encoder (patch embed | wav CNN | token
embedding) and the positional/context part that turns local features into the input of the
shared blocks.

Every encoder offers the same two calls, so the model and the teacher drive them alike:

- ``local_features(source, lengths) -> (x (B, T, D), valid (B, T) bool or None)``, run once per sample;
- ``forward(x, valid, mask, clones) -> (x, attn_bias)`` ("contextualize"): without a mask, the
  full unmasked sequence (the teacher's view); with a :class:`MaskInfo`, only each row's kept
  tokens, rows in repeat_interleave order, gathered straight from the per-sample features (no M×
  full copy).

Every parameter is read inside the ``forward`` of the module that owns it, so ZeRO-3's
per-module parameter gathering sees each use.

Submodule names follow fairseq's ``modality_encoders.<MOD>.*`` so interop is a short rename table.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockEncoder, make_blocks
from .masking import MaskInfo


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


def context_encoder(cfg, with_norm: bool) -> BlockEncoder:
    """The modality "prenet": ``model.prenet_depth`` blocks before the shared ones (fairseq ``BlockEncoder``)."""
    norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if with_norm else None
    drop = cfg.prenet_dropout if cfg.prenet_depth > 0 else 0.0
    return BlockEncoder(make_blocks(cfg, cfg.prenet_depth), norm, drop, cfg.activation_checkpointing)
