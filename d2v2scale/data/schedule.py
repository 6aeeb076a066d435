"""Which samples each rank reads at each step: a pure function of (step, global batch, DP layout).

Global position ``p = step·G + j`` (j < G) is the j-th sample of the step; DP rank r owns the
contiguous slice ``[r·G/dp, (r+1)·G/dp)`` of it, cut into ``grad_accum`` micro-batches. Position
``p`` reads dataset item ``perm_e[p mod N]`` with a permutation per epoch ``e = p // N``, seeded
from (seed, e). The position doubles as the sample id that keys its masks, so every layout of the
same global batch sees the same samples with the same masks, and resuming needs only the step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankSchedule:
    global_batch: int
    micro_batch: int
    grad_accum: int
    dp_rank: int
    dp_size: int

    def positions(self, step: int) -> list[torch.Tensor]:
        """The global positions of this rank's micro-batches at ``step``."""
        per_rank = self.micro_batch * self.grad_accum
        start = step * self.global_batch + self.dp_rank * per_rank
        return [torch.arange(start + i * self.micro_batch, start + (i + 1) * self.micro_batch)
                for i in range(self.grad_accum)]

    def batch_ids(self, step: int) -> list[int]:
        """For sources that pre-build micro-batches (audio by token budget): this rank's global
        micro-batch ids at ``step``; ``grad_accum`` per rank, ``dp·grad_accum`` per step."""
        first = (step * self.dp_size + self.dp_rank) * self.grad_accum
        return list(range(first, first + self.grad_accum))


def epoch_indices(positions: torch.Tensor, num_items: int, seed: int) -> torch.Tensor:
    """Dataset indices for global positions: a fresh seeded permutation every epoch."""
    out = torch.empty_like(positions)
    epochs = positions // num_items
    for epoch in epochs.unique().tolist():
        sel = epochs == epoch
        out[sel] = epoch_permutation(num_items, seed, epoch)[positions[sel] % num_items]
    return out


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order an epoch visits ``num_items`` things in; drawn once per epoch (an ImageNet
    permutation costs ~10 ms: not once per micro-batch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

