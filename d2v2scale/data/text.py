"""Pre-tokenised text: one flat token file read through a memory map, cut into fixed blocks.

``PREFIX.bin`` holds the token ids (uint16 or int32, native byte order) and ``PREFIX.json``
``{"dtype": ..., "num_tokens": N, "vocab_size": V}``. Block ``i`` is tokens
``[i·L, (i+1)·L)`` (L = ``data.sample_length`` or ``model.max_positions``); blocks are read by
global position like every other source (see :mod:`d2v2scale.data.schedule`). Build the files
with ``python -m d2v2scale.data.build_tokens``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .files import DataError
from .schedule import epoch_indices

DTYPES = {"uint16": np.uint16, "int32": np.int32}


def token_files(prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    base = prefix.with_suffix("") if prefix.suffix in (".bin", ".json") else prefix
    return base.with_suffix(".bin"), base.with_suffix(".json")


class TokenBlocks:
    def __init__(self, prefix: str | Path, block_size: int, vocab_size: int, seed: int):
        bin_path, meta_path = token_files(prefix)
        if not bin_path.is_file() or not meta_path.is_file():
            raise DataError(f"data.path '{prefix}': expected {bin_path} and {meta_path} "
                            "(build them with python -m d2v2scale.data.build_tokens)")
        try:
            meta = json.loads(meta_path.read_text())
            meta["dtype"], meta["num_tokens"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path}: not a token-file description ({type(e).__name__}: {e}); expected "
                            '{"dtype", "num_tokens", "vocab_size"} (python -m d2v2scale.data.build_tokens)') from None
        if meta["dtype"] not in DTYPES:
            raise DataError(f"{meta_path}: dtype {meta['dtype']!r}; allowed: {', '.join(DTYPES)}")
        if meta.get("vocab_size", 0) > vocab_size:
            raise DataError(f"{meta_path}: vocabulary of {meta['vocab_size']} tokens exceeds model.vocab_size={vocab_size}")
        self.tokens = np.memmap(bin_path, dtype=DTYPES[meta["dtype"]], mode="r", shape=(int(meta["num_tokens"]),))
        self.block_size, self.seed = block_size, seed
        self.num_blocks = len(self.tokens) // block_size
        if self.num_blocks == 0:
            raise DataError(f"data.path '{prefix}' has {len(self.tokens)} tokens, fewer than one block of {block_size}")

    def __len__(self) -> int:
        return self.num_blocks

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, None]:
        blocks = epoch_indices(positions, self.num_blocks, self.seed).tolist()
        rows = [np.asarray(self.tokens[b * self.block_size : (b + 1) * self.block_size], dtype=np.int64) for b in blocks]
        return torch.from_numpy(np.stack(rows)), None
