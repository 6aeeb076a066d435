"""What can be wrong with ``data.path``, found before any process group starts.

Indexing is the cheap half of reading a data set, and it is done once per job: rank 0 (the
builder) indexes ``data.path`` here (or finds its index current), so that "no usable images" is a
one-line exit 2 instead of a traceback on every rank after start-up; the other ranks only check
that the path exists and map the builder's index after the process group meets
(:func:`~d2v2scale.data.indexing.shared_index`).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .. import modality_registry
from ..config import Config
from ..logs import LOG
from .files import DataError
from .indexing import IndexSpec, ensure_index


def index_spec(cfg: Config) -> IndexSpec | None:
    """How ``data.path`` is indexed (None: synthetic, digits and token files need no index)."""
    d, kind = cfg.data, modality_registry.data_kind(cfg)
    if kind is None or kind.index is None:
        return None
    return IndexSpec(str(d.path), kind.index, d.index_cache, max(1, d.num_workers))


def check_data(cfg: Config, builder: bool, verbose: bool) -> None:
    """Raise :class:`~d2v2scale.data.files.DataError` when ``cfg.data`` cannot feed a run."""
    spec, kind = index_spec(cfg), modality_registry.data_kind(cfg)
    if spec is not None and not builder:
        if not Path(spec.source).exists():
            raise DataError(f"data.path '{spec.source}' does not exist")
    elif spec is not None:
        t0 = time.perf_counter()
        progress = functools.partial(tqdm, disable=not (verbose and sys.stderr.isatty()), unit="")
        index = ensure_index(spec, progress)
        if verbose:
            how = f"built in {time.perf_counter() - t0:.1f} s" if index.origin == "built" else index.origin
            LOG.info(f"data index of {spec.source}: {len(index)} rows of {index.num_files} files ({how}; "
                     f"{index.nbytes() / 1e6:.1f} MB{'; cache ' + spec.cache if spec.cache else ''})")
    elif kind is not None and kind.check is not None:
        kind.check(cfg)
