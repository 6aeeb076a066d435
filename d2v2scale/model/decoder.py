"""Convolutional decoders (fairseq ``Decoder1d`` / ``Decoder2d``).

Each layer is grouped conv → channel LayerNorm without affine → GELU, with a residual when the
shapes match; then a linear projection back to the encoder width. Module names
(``blocks.{i}.0``, ``proj``) match fairseq for checkpoint interop.
"""
from __future__ import annotations

import torch
from torch import nn

from .conv_layers import ChannelLayerNorm, TrimEven


def _conv_block(conv: type[nn.Module], dims: int, in_dim: int, cfg) -> nn.Sequential:
    return nn.Sequential(
        conv(in_dim, cfg.dim, kernel_size=cfg.kernel, padding=cfg.kernel // 2, groups=cfg.groups),
        TrimEven(cfg.kernel, dims),
        ChannelLayerNorm(),
        nn.GELU(),
    )


def _projection(cfg, embed_dim: int) -> nn.Module:
    if cfg.projection_layers == 1:
        return nn.Linear(cfg.dim, embed_dim)
    layers: list[nn.Module] = []
    cur = cfg.dim
    for i in range(cfg.projection_layers - 1):
        nxt = int(cur * cfg.projection_ratio) if i == 0 else cur
        layers += [nn.Linear(cur, nxt), nn.GELU()]
        cur = nxt
    layers.append(nn.Linear(cur, embed_dim))
    return nn.Sequential(*layers)


class _ConvDecoder(nn.Module):
    dims = 1

    def __init__(self, cfg, embed_dim: int):
        super().__init__()
        conv = nn.Conv1d if self.dims == 1 else nn.Conv2d
        self.residual = cfg.residual
        self.blocks = nn.ModuleList(
            _conv_block(conv, self.dims, embed_dim if i == 0 else cfg.dim, cfg) for i in range(cfg.layers)
        )
        self.proj = _projection(cfg, embed_dim)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for layer in self.blocks:
            x = layer(x)
            if self.residual and residual.shape[1] == x.shape[1]:
                x = x + residual
            residual = x
        return x


class Decoder1d(_ConvDecoder):
    """Audio and text: (B, T, D) → (B, T, D) over the time axis."""

    dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._run_blocks(x.transpose(1, 2)).transpose(1, 2))


class Decoder2d(_ConvDecoder):
    """Images: (B, h·w, D) reshaped to the patch grid, convolved in 2-D, and flattened back."""

    dims = 2

    def __init__(self, cfg, embed_dim: int, grid: tuple[int, int]):
        super().__init__(cfg, embed_dim)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        x = self._run_blocks(x.transpose(1, 2).reshape(b, c, *self.grid))
        return self.proj(x.reshape(b, -1, t).transpose(1, 2))
