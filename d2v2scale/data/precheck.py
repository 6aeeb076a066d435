"""What can be wrong with ``data.path``, found before any process group starts.

Indexing is the cheap half of reading a data set (listing, the byte-level screen, audio headers,
the token file's metadata); doing it here turns "no usable images" into a one-line exit 2 instead
of a traceback on every rank after start-up. The indexes are memoised per process, so the loader
built later reuses them instead of scanning twice.
"""
from __future__ import annotations

from ..config import Config
from .files import IMAGE_SUFFIXES, build_index


def check_data(cfg: Config, verbose: bool) -> None:
    """Raise :class:`~d2v2scale.data.files.DataError` when ``cfg.data`` cannot feed a run."""
    d, m = cfg.data, cfg.model
    if d.kind == "images":
        build_index(d.path, IMAGE_SUFFIXES, log=verbose)
    elif d.kind == "audio":
        from .audio import index_audio

        index_audio(d.path, d.min_sample_size, verbose)
    elif d.kind == "text":
        from .text import TokenBlocks

        TokenBlocks(d.path, d.sample_length or m.max_positions, m.vocab_size, cfg.seed)
