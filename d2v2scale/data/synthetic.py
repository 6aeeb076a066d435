"""Random inputs of the right shape for each modality: smoke tests, benchmarks, dry runs."""
from __future__ import annotations

import torch

from .. import counter_rng
from ..config import Config


def synthetic_batch(cfg: Config, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (B, C, H, W) ~ N(0, 1); audio (B, S) ~ N(0, 1) with S = ``data.sample_length``;
    text (B, T) token ids that avoid the padding id, T = ``data.sample_length`` or ``model.max_positions``."""
    m = cfg.model
    if m.modality == "image":
        return torch.randn(batch_size, m.in_chans, m.img_size, m.img_size, generator=generator)
    if m.modality == "audio":
        length = cfg.data.sample_length or cfg.data.max_sample_size
        return torch.randn(batch_size, length, generator=generator)
    length = min(cfg.data.sample_length or m.max_positions, m.max_positions)
    tokens = torch.randint(0, m.vocab_size - 1, (batch_size, length), generator=generator)
    return tokens + (tokens >= m.pad_idx).long()


class SyntheticSource:
    """An endless dataset of random items; item ``p`` is drawn from a generator seeded by (seed, p),
    so a position yields the same tensor whatever rank or batch it lands in."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        items = []
        for p in positions.tolist():
            gen = torch.Generator().manual_seed(int(counter_rng.combine(self.cfg.seed, p)))
            items.append(synthetic_batch(self.cfg, 1, gen))
        return torch.cat(items), None
