"""Mask generators for data2vec 2.0: inverse block masks (2-D), block masks (1-D), random masks.

All generators return :class:`MaskInfo` with **exactly the same kept count in every row**, so the
student can gather kept tokens into a rectangular (rows, K, D) tensor. Each row's draws come from
the counter-based RNG keyed by (seed, step, sample index, clone), computed per sample on its real
(unpadded) length. This fixes two defects of the reference: it reads the kept length from row 0
only, and it crops audio masks to a batch length they were not computed for.

Row order is ``repeat_interleave`` order: sample 0's M clones, then sample 1's, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import counter_rng

_STREAM_CENTRES, _STREAM_FILL = 1, 2


@dataclass
class MaskInfo:
    """``mask`` (rows, T) bool, True = masked and counted in the loss; ``keep_idx`` (rows, K) ascending."""

    mask: torch.Tensor
    keep_idx: torch.Tensor

    @property
    def num_kept(self) -> int:
        return self.keep_idx.shape[1]


def row_keys(seed: int, step: int, sample_ids: torch.Tensor, clones: int) -> torch.Tensor:
    """One RNG key per (sample, clone) row, in repeat_interleave order; independent of batch composition."""
    clone_ids = torch.arange(clones, device=sample_ids.device, dtype=torch.int64)
    keys = counter_rng.combine(seed, step, sample_ids.to(torch.int64)[:, None], clone_ids[None, :])
    return keys.reshape(-1)


def num_kept(length: int | torch.Tensor, mask_prob: float) -> torch.Tensor:
    """``int(L * (1 - R))`` with Python float semantics, elementwise."""
    length = torch.as_tensor(length, dtype=torch.float64)
    return torch.floor(length * (1.0 - mask_prob)).to(torch.int64)


def _select_kept(keys: torch.Tensor, preferred: torch.Tensor, valid: torch.Tensor, k: int) -> MaskInfo:
    """Keep exactly ``k`` valid positions per row: a uniform random subset of ``preferred`` ones if
    there are enough, else all of them plus uniformly drawn others (the reference's clear/fill
    equalisation, done with one top-k instead of a per-row loop)."""
    score = counter_rng.uniform(keys, preferred.shape[1], _STREAM_FILL) + preferred.float()
    score = score.masked_fill(~valid, -1.0)
    keep_idx = score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    mask = valid.clone()
    mask.scatter_(1, keep_idx, False)
    return MaskInfo(mask=mask, keep_idx=keep_idx)


def inverse_block_mask_2d(
    keys: torch.Tensor, grid: tuple[int, int], mask_prob: float, mask_length: int, mask_prob_adjust: float
) -> MaskInfo:
    """Images: square blocks mark what is *kept* (inverse masking), then each row is equalised to
    ``int(L * (1 - mask_prob))`` kept patches. Block centres are drawn with replacement and blocks
    are clamped into the grid, as in fairseq's ``compute_block_mask_2d``."""
    h, w = grid
    rows, length = keys.shape[0], h * w
    keep_prob = 1.0 - mask_prob
    n_centres = int(length * ((keep_prob + mask_prob_adjust) / mask_length**2))
    device = keys.device
    blocks = torch.zeros(rows, length, dtype=torch.bool, device=device)
    if n_centres > 0:
        u = counter_rng.uniform(keys, n_centres, _STREAM_CENTRES)
        centres = (u * length).long().clamp_(max=length - 1)
        offs = torch.arange(mask_length, device=device) - mask_length // 2
        ci = (centres // w)[:, :, None, None] + offs[None, None, :, None]
        cj = (centres % w)[:, :, None, None] + offs[None, None, None, :]
        idx = ci.clamp(0, h - 1) * w + cj.clamp(0, w - 1)
        blocks.scatter_(1, idx.reshape(rows, -1), True)
    valid = torch.ones_like(blocks)
    k = int(num_kept(length, mask_prob))
    return _select_kept(keys, blocks, valid, k)


def block_mask_1d(
    keys: torch.Tensor, lengths: torch.Tensor, max_len: int, mask_prob: float, mask_length: int, mask_prob_adjust: float
) -> MaskInfo:
    """Audio: spans of ``mask_length`` frames mark what is *masked*; each row is computed on its own
    valid length and every row keeps the same number of frames, the smallest ``int(T_i * (1 - R))``."""
    rows, device = keys.shape[0], keys.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    n_centres = torch.floor(lengths.double() * ((mask_prob + mask_prob_adjust) / mask_length)).long()
    n_max = int(n_centres.max()) if rows else 0
    spans = torch.zeros(rows, max_len + 1, dtype=torch.bool, device=device)  # last column: discard slot
    if n_max > 0:
        u = counter_rng.uniform(keys, n_max, _STREAM_CENTRES)
        centres = (u * lengths[:, None]).long()
        offs = torch.arange(mask_length, device=device) - mask_length // 2
        pos = torch.minimum((centres[:, :, None] + offs).clamp(min=0), (lengths - 1)[:, None, None])
        used = torch.arange(n_max, device=device)[None, :] < n_centres[:, None]
        pos = torch.where(used[:, :, None], pos, torch.full_like(pos, max_len))
        spans.scatter_(1, pos.reshape(rows, -1), True)
    valid = torch.arange(max_len, device=device)[None, :] < lengths[:, None]
    k = int(num_kept(lengths, mask_prob).min())
    return _select_kept(keys, valid & ~spans[:, :max_len], valid, k)


def random_mask(keys: torch.Tensor, lengths: torch.Tensor, max_len: int, mask_prob: float) -> MaskInfo:
    """Text: MAE-style uniform random masking, exactly ``int(T * (1 - R))`` kept per row."""
    device = keys.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    valid = torch.arange(max_len, device=device)[None, :] < lengths[:, None]
    k = int(num_kept(lengths, mask_prob).min())
    return _select_kept(keys, torch.zeros_like(valid), valid, k)


def mask_from_bool(mask: torch.Tensor, valid: torch.Tensor | None = None) -> MaskInfo:
    """Wrap an externally computed mask (True = masked), e.g. fairseq's ``precomputed_mask``."""
    valid = torch.ones_like(mask) if valid is None else valid
    kept = valid & ~mask
    counts = kept.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"precomputed mask keeps different counts per row: {sorted(set(counts.tolist()))}")
    k = int(counts[0]) if counts.numel() else 0
    keep_idx = kept.float().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return MaskInfo(mask=mask & valid, keep_idx=keep_idx)


def grid_shape(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"2-D block masking needs a square patch grid, got {num_patches} patches")
    return side, side


@dataclass
class MaskGenerator:
    """Builds the (B·M)-row :class:`MaskInfo` for one batch from (seed, step, sample ids)."""

    kind: str  # block2d | block1d | random
    mask_prob: float
    mask_length: int
    mask_prob_adjust: float
    clones: int

    def __call__(
        self, seed: int, step: int, sample_ids: torch.Tensor, max_len: int, lengths: torch.Tensor | None = None
    ) -> MaskInfo:
        keys = row_keys(seed, step, sample_ids, self.clones)
        if self.kind == "block2d":
            if lengths is not None and bool((lengths != max_len).any()):
                raise ValueError("2-D block masking does not support padded inputs")
            return inverse_block_mask_2d(keys, grid_shape(max_len), self.mask_prob, self.mask_length, self.mask_prob_adjust)
        if lengths is None:
            lengths = torch.full((sample_ids.shape[0],), max_len, dtype=torch.int64, device=sample_ids.device)
        row_lengths = lengths.to(sample_ids.device).repeat_interleave(self.clones)
        if self.kind == "block1d":
            return block_mask_1d(keys, row_lengths, max_len, self.mask_prob, self.mask_length, self.mask_prob_adjust)
        if self.kind == "random":
            return random_mask(keys, row_lengths, max_len, self.mask_prob)
        raise ValueError(f"unknown mask kind {self.kind!r}; allowed: block2d, block1d, random")
