"""Modality encoders: the local encoder (patch embed | wav CNN | token embedding) and the
positional/context part that turns local features into the input of the shared blocks.

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

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import frame_lengths
from .blocks import BlockEncoder, make_blocks
from .conv_layers import ChannelLayerNorm, TrimEven
from .masking import MaskInfo


def _rows_to_samples(rows: int, clones: int, device: torch.device) -> torch.Tensor:
    return torch.arange(rows, device=device) // clones


def gather_kept(x: torch.Tensor, mask: MaskInfo, clones: int) -> torch.Tensor:
    """(B, T, D) per-sample features → (B·M, K, D) kept tokens of every masked view."""
    sample = _rows_to_samples(mask.keep_idx.shape[0], clones, x.device)
    return x[sample[:, None], mask.keep_idx]


def key_padding_bias(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, 1, T) additive bias hiding padded keys, or None when nothing is padded."""
    if valid is None:
        return None
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]


def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos positions, (grid², D): first half encodes the column, second the row."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FixedPositions(nn.Module):
    """A frozen parameter (fairseq keeps it as one, so it is saved and counted like the reference)."""

    def __init__(self, positions: torch.Tensor):
        super().__init__()
        self.positions = nn.Parameter(positions.unsqueeze(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.positions.to(x.dtype)


def _context_encoder(cfg, with_norm: bool) -> BlockEncoder:
    norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if with_norm else None
    drop = cfg.prenet_dropout if cfg.prenet_depth > 0 else 0.0
    return BlockEncoder(make_blocks(cfg, cfg.prenet_depth), norm, drop, cfg.activation_checkpointing)


class ImageEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.grid = (cfg.img_size // cfg.patch_size,) * 2
        self.local_encoder = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.fixed_positional_encoder = FixedPositions(sincos_2d(cfg.embed_dim, self.grid[0]))
        self.num_extra = cfg.num_extra_tokens
        self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, cfg.embed_dim)) if self.num_extra else None
        self.context_encoder = _context_encoder(cfg, with_norm=True)

    def reset_parameters(self) -> None:
        w = self.local_encoder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.extra_tokens is not None:
            nn.init.normal_(self.extra_tokens)

    def local_features(self, source: torch.Tensor, lengths: torch.Tensor | None = None):
        return self.local_encoder(source), None

    def num_positions(self, source: torch.Tensor, lengths: torch.Tensor | None = None):
        return self.grid[0] * self.grid[1], None

    def forward(self, x: torch.Tensor, valid, mask: MaskInfo | None, clones: int = 1):
        x = self.fixed_positional_encoder(x)
        if mask is not None:
            x = gather_kept(x, mask, clones)
        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return self.context_encoder(x), None


class _Fp32ChannelLayerNorm(nn.LayerNorm):
    """Affine LayerNorm over channels of (B, C, T), computed in fp32 (wav2vec2 ``Fp32LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.transpose(1, 2).float(), self.normalized_shape, w, b, self.eps)
        return y.transpose(1, 2).type_as(x)


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0's CNN in ``layer_norm`` mode: conv (no bias) → dropout(0) → fp32 channel LN → GELU."""

    def __init__(self, layers: list):
        super().__init__()
        self.spec = [tuple(int(v) for v in layer) for layer in layers]
        blocks, in_dim = [], 1
        for dim, kernel, stride in self.spec:
            conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False)
            blocks.append(nn.Sequential(conv, nn.Dropout(0.0), _Fp32ChannelLayerNorm(dim), nn.GELU()))
            in_dim = dim
        self.conv_layers = nn.ModuleList(blocks)
        self.out_dim = in_dim

    def reset_parameters(self) -> None:
        for block in self.conv_layers:
            nn.init.kaiming_normal_(block[0].weight)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return frame_lengths(self.spec, lengths)[-1]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x.transpose(1, 2)


def _conv_positions(cfg) -> nn.Sequential:
    """Relative positional encoder: ``conv_pos_depth`` × (grouped conv → LN (no affine) → GELU)."""
    k = max(3, cfg.conv_pos_width // cfg.conv_pos_depth)
    layers = []
    for _ in range(cfg.conv_pos_depth):
        conv = nn.Conv1d(cfg.embed_dim, cfg.embed_dim, k, padding=k // 2, groups=cfg.conv_pos_groups)
        layers.append(nn.Sequential(conv, TrimEven(k, 1), ChannelLayerNorm(), nn.GELU()))
    return nn.Sequential(*layers)


def alibi_slopes(heads: int) -> list[float]:
    """The standard ALiBi geometric slopes; non-powers of two interleave the 2× set (fairseq ``get_alibi``)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class AudioEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.local_encoder = ConvFeatureExtractor(cfg.conv_feature_layers)
        d_in = self.local_encoder.out_dim
        self.project_features = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.embed_dim))
        self.relative_positional_encoder = _conv_positions(cfg)
        self.use_alibi = cfg.use_alibi
        self.num_heads = cfg.num_heads
        self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.num_heads)), persistent=False)
        self.alibi_scale = nn.Parameter(torch.full((1, 1, cfg.num_heads, 1, 1), cfg.alibi_scale)) if cfg.use_alibi else None
        self.context_encoder = _context_encoder(cfg, with_norm=True)

    def reset_parameters(self) -> None:
        self.local_encoder.reset_parameters()

    def local_features(self, wav: torch.Tensor, lengths: torch.Tensor | None = None):
        """Waveforms (B, S) → frames (B, T, D); ``lengths`` in samples marks padding at the end."""
        x = self.project_features(self.local_encoder(wav))
        if lengths is None:
            return x, None
        frames = self.local_encoder.output_lengths(lengths.to(x.device))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]
        return x, valid

    def num_positions(self, wav: torch.Tensor, lengths: torch.Tensor | None = None):
        """Frames per batch and per sample, from the conv arithmetic alone (no forward needed)."""
        total = int(self.local_encoder.output_lengths(torch.tensor(wav.shape[1])))
        return total, None if lengths is None else self.local_encoder.output_lengths(lengths)

    def _positions(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Conv positions; padded frames are re-zeroed after every layer so that a padded sample
        sees exactly the zero padding it would see on its own."""
        keep = None if valid is None else valid.unsqueeze(1).to(x.dtype)
        x = x.transpose(1, 2)
        for layer in self.relative_positional_encoder:
            x = layer(x)
            if keep is not None:
                x = x * keep
        return x.transpose(1, 2)

    def alibi_bias(self, positions: torch.Tensor) -> torch.Tensor:
        """(rows, H, n, n) fp32 bias ``-scale_h·slope_h·|i-j|`` at the given (rows, n) positions, so kept
        tokens keep their true distances without building the full T×T bias first."""
        dist = (positions[:, None, :] - positions[:, :, None]).abs().float()
        scale = self.alibi_scale.clamp_min(0).float().view(1, -1, 1, 1)
        return -(self.slopes.view(1, -1, 1, 1) * scale) * dist[:, None]

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None, clones: int = 1):
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)
        if mask is None:
            x = x + self._positions(x, valid)
            bias = key_padding_bias(valid)
            if self.use_alibi:
                pos = torch.arange(x.shape[1], device=x.device)[None]
                alibi = self.alibi_bias(pos)
                bias = alibi if bias is None else alibi + bias
            return self.context_encoder(x, bias), bias
        sample = _rows_to_samples(mask.keep_idx.shape[0], clones, x.device)
        # Conv positions see the full-length view with masked frames zeroed, as in the reference.
        row_valid = None if valid is None else valid[sample]
        x_pos = self._positions(x[sample] * (~mask.mask).unsqueeze(-1).to(x.dtype), row_valid)
        rows = torch.arange(x_pos.shape[0], device=x.device)[:, None]
        x = gather_kept(x, mask, clones) + x_pos[rows, mask.keep_idx]
        bias = self.alibi_bias(mask.keep_idx) if self.use_alibi else None
        return self.context_encoder(x, bias), bias


class TextLocalEncoder(nn.Module):
    """Token + learned positions (fairseq layout: ``pad_idx + 1`` offset rows) → LayerNorm → dropout."""

    def __init__(self, cfg):
        super().__init__()
        self.pad_idx = cfg.pad_idx
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_idx)
        self.embed_positions = nn.Embedding(cfg.max_positions + cfg.pad_idx + 1, cfg.embed_dim, padding_idx=cfg.pad_idx)
        self.layernorm_embedding = nn.LayerNorm(cfg.embed_dim, eps=1e-5)
        self.dropout = nn.Dropout(cfg.embed_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        not_pad = tokens.ne(self.pad_idx)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_idx
        x = self.embed_tokens(tokens) + self.embed_positions(positions)
        return self.dropout(self.layernorm_embedding(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pad_idx = cfg.pad_idx
        self.local_encoder = TextLocalEncoder(cfg)
        self.context_encoder = _context_encoder(cfg, with_norm=cfg.prenet_depth > 0)

    def reset_parameters(self) -> None:
        pass

    def local_features(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
        """Without ``lengths`` the blocks are taken as unpadded (fixed 512-token blocks), which keeps
        the attention free of a padding bias; with them, positions past each length are padding."""
        valid = None
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        return self.local_encoder(tokens), valid

    def num_positions(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
        return tokens.shape[1], lengths

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, mask: MaskInfo | None, clones: int = 1):
        if mask is None:
            bias = key_padding_bias(valid)
            return self.context_encoder(x, bias), bias
        return self.context_encoder(gather_kept(x, mask, clones)), None


def build_encoder(cfg) -> nn.Module:
    return {"image": ImageEncoder, "audio": AudioEncoder, "text": TextEncoder}[cfg.modality](cfg)
