"""Small layers shared by the convolutional parts (decoders, conv positional encoder)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, ...) without affine parameters (eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],)).movedim(-1, 1)


class TrimEven(nn.Module):
    """fairseq ``SamePad``: an even kernel with padding k//2 yields one extra step per dim; drop it."""

    def __init__(self, kernel: int, dims: int):
        super().__init__()
        self.trim = 1 if kernel % 2 == 0 else 0
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trim:
            return x
        return x[..., :-1] if self.dims == 1 else x[..., :-1, :-1]
