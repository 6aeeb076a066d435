"""Random inputs of the right shape for each modality: smoke tests, benchmarks, dry runs."""
from __future__ import annotations

import torch

from .. import counter_rng
from .. import modality_registry
from ..config import Config


def synthetic_batch(cfg: Config, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch_size`` model-ready inputs of the modality's shape (images (B, C, H, W) ~ N(0, 1);
    audio (B, S) ~ N(0, 1); text (B, T) token ids that avoid the padding id)."""
    return modality_registry.get(cfg.model.modality).synthetic_batch(cfg, batch_size, generator)


class SyntheticSource:
    """An endless dataset of random items; item ``p`` is drawn from a generator seeded by (seed, p),
    so a position yields the same tensor whatever rank or batch it lands in.

    Under a sample budget (audio's ``data.max_tokens``) the schedule counts samples, not items, and
    hands out micro-batch ids (``by_batch``), as the real audio source does: micro-batch ``b`` holds
    items ``b·n .. b·n + n - 1``, ``n`` the items of the synthetic length the budget fits."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        budget = modality_registry.batch_budget(cfg)
        self.by_batch = budget is not None
        if self.by_batch:
            length = synthetic_batch(cfg, 1, torch.Generator()).shape[-1]  # a private generator: no global draw
            self.per_batch = max(1, budget // length)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        items = []
        for p in positions.tolist():
            gen = torch.Generator().manual_seed(int(counter_rng.combine(self.cfg.seed, p)))
            items.append(synthetic_batch(self.cfg, 1, gen))
        return torch.cat(items), None

    def batch_by_id(self, batch_id: int) -> tuple[torch.Tensor, None, torch.Tensor]:
        """(items, no lengths: all are full, sample ids) of micro-batch ``batch_id``."""
        ids = torch.arange(batch_id * self.per_batch, (batch_id + 1) * self.per_batch, dtype=torch.int64)
        return *self.batch(ids), ids
