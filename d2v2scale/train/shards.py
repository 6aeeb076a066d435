"""Layout-free checkpoint shards: each rank writes the pieces it holds, located in the full tensors.

Every sharded training state is, per parameter, a contiguous range of the *TP-local* tensor
flattened: ZeRO-1/2 and DeepSpeed's bf16 optimizer cut one flat vector per parameter group into
DP partitions, ZeRO-3 cuts each parameter's flat vector, FSDP2 cuts dim 0 (a flat range too). A
TP-local tensor is itself a box of the full tensor (:class:`~d2v2scale.distributed.tensor_parallel.TPSlice`).
So one :class:`Piece` — (key, full shape, TP box, flat range, values) — describes any layout, and
reading a piece back needs nothing about the layout that wrote it.

Layout: ``<tag>/shards/rank_<global rank>.pt`` per rank, ``{"pieces": [meta...], "data": [tensor...]}``.
Loading maps every rank file (``mmap``: only the pages a key needs are read), rebuilds one full
tensor at a time from its pieces, checks that the pieces cover it exactly once, and cuts out the
range the running layout wants. Each rank thus reads the whole checkpoint once (the page cache
is shared by the ranks of a node); a resume is rare, its cost is one read of the checkpoint per node.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..distributed.tensor_parallel import TPSlice
from .verify import CheckpointError, check_size, listed_files, safe_load, save_checked

SHARD_DIR = "shards"


class ShardFormatError(CheckpointError):
    """The shard files do not describe complete tensors (a missing rank file, a corrupt one)."""


@dataclass
class Piece:
    """``data`` = elements ``[start, stop)`` of the flattened TP-local tensor that ``tp`` places in
    the full tensor ``key`` of shape ``shape`` (``tp=None``: the local tensor is the full one)."""

    key: str
    shape: tuple[int, ...]
    tp: TPSlice | None
    start: int
    stop: int
    data: torch.Tensor

    def meta(self) -> tuple:
        tp = None if self.tp is None else (tuple(self.tp.view), self.tp.dim, self.tp.index)
        return self.key, tuple(self.shape), tp, self.start, self.stop


def shard_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def write_shards(tag_dir: Path, rank: int, pieces: list[Piece]) -> dict[str, tuple[int, int]]:
    """This rank's pieces, fp32, into ``tag_dir/shards/``; ``{file relative to the tag: (bytes, crc32)}``."""
    out = tag_dir / SHARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = save_checked({"pieces": [p.meta() for p in pieces],
                           "data": [p.data.detach().reshape(-1).float().cpu().clone() for p in pieces]},
                          out / shard_file(rank))
    return {f"{SHARD_DIR}/{shard_file(rank)}": record}


def has_shards(tag_dir: Path) -> bool:
    return (tag_dir / SHARD_DIR).is_dir()


def _box(full: torch.Tensor, tp) -> torch.Tensor:
    if tp is None:
        return full
    view, dim, index = tp
    return full.view(*view).select(dim, index)


class ShardReader:
    """Read any range of any key of a layout-free checkpoint, whatever layout wrote it."""

    def __init__(self, tag_dir: Path, listing: dict | None = None):
        """``listing``: ``run.json``'s files (None: read it from the tag): each shard file's size is
        checked against it before the file is opened (CheckpointError), since the tag was verified
        once for all ranks, not by this one."""
        files = sorted((tag_dir / SHARD_DIR).glob("rank_*.pt"))
        if not files:
            raise ShardFormatError(f"{tag_dir / SHARD_DIR}: no shard files")
        listing = listed_files(tag_dir) if listing is None else listing
        self.index: dict[str, list[tuple[tuple, torch.Tensor]]] = {}
        for f in files:
            check_size(tag_dir, f"{SHARD_DIR}/{f.name}", listing)
            try:
                saved = safe_load(f, mmap=True)
            except CheckpointError as e:
                raise ShardFormatError(f"{f.name}: unreadable shard file: {e}") from None
            for meta, data in zip(saved["pieces"], saved["data"]):
                self.index.setdefault(meta[0], []).append((meta, data))
        self._cached: tuple[str, torch.Tensor] | None = None

    def keys(self) -> set[str]:
        return set(self.index)

    def full(self, key: str) -> torch.Tensor:
        """The whole fp32 tensor ``key``, from every piece of it (each element exactly once)."""
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        if key not in self.index:
            raise ShardFormatError(f"the checkpoint has no '{key}' (written by another model or preset?)")
        entries = self.index[key]
        shape = entries[0][0][1]
        full = torch.zeros(shape, dtype=torch.float32)
        by_box: dict = {}
        for (_, _, tp, start, stop), data in entries:
            by_box.setdefault(tp, []).append((start, stop, data))
        covered = 0
        for tp, parts in by_box.items():
            box = _box(full, tp)
            flat = torch.zeros(box.numel(), dtype=torch.float32)
            for start, stop, data in parts:
                flat[start:stop] = data
                covered += stop - start
            box.copy_(flat.view(box.shape))
        if covered != full.numel():
            raise ShardFormatError(f"'{key}': the shard files cover {covered} of its {full.numel()} elements "
                                   "(a rank file is missing or from another checkpoint)")
        self._cached = (key, full)
        return full

    def read(self, key: str, tp: TPSlice | None, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened TP-local tensor ``tp`` of ``key``."""
        meta = None if tp is None else (tuple(tp.view), tp.dim, tp.index)
        return _box(self.full(key), meta).reshape(-1)[start:stop]
