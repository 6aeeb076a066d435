"""Indexing a data set once per job: the builder rank builds, every other rank maps its file.

One rank (the builder, rank 0) finds a prepared index (``python -m d2v2scale.prepare``), or a
current cache in ``data.index_cache``, or builds the index: it lists a folder, parses a manifest or
a file list (a manifest's lengths are trusted, as fairseq trusts them), and then, as the data
kind's :class:`IndexRules` say, reads each file's length once, in threads (audio headers), or opens
a few sampled files (images: no other is opened), so that a folder of nothing but broken files is
refused at start. It then publishes the index as a file and sends every rank a ticket (the file and
the build it holds); the others map that file — they open no data file, and a stale or foreign
file at the same path is never taken for it.

An index records what it was built from (``signature``): a file's size and mtime, or every
folder's mtime under a data root (adding, removing or renaming an entry changes its folder's
mtime), so a stale cache is found with one stat per folder, and an image folder's is brought up to
date by listing only the folders that changed.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .files import DataError, Folder, read_file, read_list, walk
from .index import SUFFIX, DataIndex, is_index_file, load_index, pack_names, save_index
from .manifest import read_manifest

FORMAT = 1
WAIT_S = 120.0  # how long a reading rank waits for the builder's file to become visible (shared file systems)
SETTLE_S = 2.0  # a folder modified this close to a build may have changed within the same mtime tick


@dataclass(frozen=True)
class IndexRules:
    """How a data kind's files become an index: the kind provides them (its
    :class:`~d2v2scale.modality_registry.DataKind`), so the indexer never asks which kind it indexes."""

    kind: str  # the data kind's name, recorded in the index (a prepared index of another kind is refused)
    suffixes: tuple[str, ...]  # the files a folder is indexed for
    reuse_folders: bool = False  # an older index's unchanged folders are not listed again (rows hold only names)
    manifest: bool = False  # a ``.tsv`` data path is a fairseq manifest (its lengths and offsets are trusted)
    length: Callable[[Path], int] | None = None  # a file's length, read once (ValueError: unusable); None: no lengths
    sample: int = 0  # files opened, evenly spaced, to tell a wrong folder from a data set with some bad files


# ------------------------------------------------------------------------------- signatures
def signature(source: Path, kind: str) -> dict:
    """What an index of ``source`` depends on, cheaply: a file's (size, mtime); a folder's mtime
    (every subfolder's is added when it is listed)."""
    st = source.stat()
    return {"format": FORMAT, "kind": kind, "source": str(source.resolve()),
            "stat": [st.st_size, st.st_mtime_ns] if source.is_file() else [0, st.st_mtime_ns]}


def is_current(index: DataIndex, source: Path, kind: str) -> bool:
    """Whether ``index`` still describes ``source``: its signature, and for a folder every folder's mtime."""
    try:
        sig = index.meta.get("signature", {})
        if {k: sig.get(k) for k in ("format", "kind", "source", "stat")} != signature(source, kind):
            return False
        return all((source / rel).stat().st_mtime_ns == mtime for rel, mtime in sig.get("dirs", {}).items())
    except OSError:
        return False


def known_folders(previous: DataIndex | None, root: Path) -> dict[str, Folder]:
    """What ``previous`` (an older index of the folder ``root``) saw in each folder, for
    :func:`~d2v2scale.data.files.walk` to reuse; folders changed near its build are left out."""
    sig = previous.meta.get("signature", {}) if previous is not None else {}
    if sig.get("source") != str(root.resolve()) or "dirs" not in sig:
        return {}
    settled = (previous.meta.get("built_at", 0) - SETTLE_S) * 1e9
    known = {rel: Folder(mtime, [], []) for rel, mtime in sig["dirs"].items() if mtime < settled}
    for rel in sig["dirs"]:
        parent = rel.rpartition("/")[0]
        if rel and parent in known:
            known[parent].subdirs.append(rel)
    for f in range(previous.num_files):
        name = previous.name(f)
        if name.rpartition("/")[0] in known:
            known[name.rpartition("/")[0]].files.append(name)
    return known


# ------------------------------------------------------------------------------- building
def _lengths(root: Path, names: list[str], read: Callable[[Path], int], threads: int,
             progress: Callable | None) -> list[tuple]:
    """(length, None) or (None, why) per file, each read once, in threads."""

    def one(name: str):
        try:
            return read(root / name), None
        except ValueError as e:
            return None, str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(one, names)
        return list(progress(results, total=len(names), desc="lengths") if progress else results)


def _sample(root: Path, names: list[str], count: int) -> list[list[str]]:
    """(path, reason) of the unusable ones among ``count`` evenly spaced files."""
    picks = np.unique(np.linspace(0, len(names) - 1, min(count, len(names))).round().astype(int))
    bad = [[str(root / names[i]), read_file(root / names[i])[1]] for i in picks]
    return [b for b in bad if b[1] is not None]


def build_index(source: Path, rules: IndexRules, threads: int = 8, progress: Callable | None = None,
                previous: DataIndex | None = None) -> DataIndex:
    """Index ``source`` (a folder, a file list, or a ``.tsv`` manifest where ``rules`` read one)
    opening no file but what ``rules`` ask for: each file's length, or a sample. ``previous`` (an
    older index of the same folder): its unchanged folders are not listed again where ``rules``
    allow it."""
    sig = signature(source, rules.kind)
    skipped: list[list[str]] = []
    length = offset = None
    if source.is_dir():
        known = known_folders(previous, source) if rules.reuse_folders else {}
        names, sig["dirs"] = walk(source, rules.suffixes, threads, known,
                                  progress and (lambda it, total: progress(it, total=total, desc="folders")))
        root = str(source)
    elif rules.manifest and source.suffix == ".tsv":
        root, names, length, offset = read_manifest(source)
    else:
        root, names = str(source.parent), read_list(source)
    if rules.length is not None and length is None:
        results = _lengths(Path(root), names, rules.length, threads, progress)
        skipped = [[str(Path(root) / n), why] for n, (_, why) in zip(names, results) if why is not None]
        length = np.asarray([n for n, _ in results if n is not None], dtype=np.int64)
        names = [name for name, (n, _) in zip(names, results) if n is not None]
    sampled = _sample(Path(root), names, rules.sample) if names and rules.sample else []
    if not names or (sampled and len(sampled) == min(rules.sample, len(names))):  # every sampled one unusable
        unusable = skipped + sampled
        example = f"; e.g. {unusable[0][0]}: {unusable[0][1]}" if unusable else ""
        raise DataError(f"data.path '{source}' has no usable files with suffixes {', '.join(rules.suffixes)}"
                        f" ({len(unusable)} read and unusable{example})")
    numbers: dict[str, int] = {}
    file = np.fromiter((numbers.setdefault(n, len(numbers)) for n in names), dtype=np.int64, count=len(names))
    blob, ends = pack_names(list(numbers))
    stamp = f"{time.time_ns()}-{os.getpid()}-{os.uname().nodename}"
    return DataIndex(root, blob, ends, length, offset, None if len(numbers) == len(names) else file,
                     {"kind": rules.kind, "signature": sig, "skipped": skipped, "built": stamp, "built_at": time.time()})


# ------------------------------------------------------------------------------ who builds
@dataclass(frozen=True)
class IndexSpec:
    """Where a run's index comes from and goes: ``source`` is ``data.path``; ``cache`` is
    ``data.index_cache`` (None: kept in memory, every process indexes for itself)."""

    source: str
    rules: IndexRules
    cache: str | None = None
    threads: int = 8

    def prepared_path(self) -> Path | None:
        """An index file given as the data path, or the one ``prepare`` wrote beside a manifest."""
        src = Path(self.source)
        if is_index_file(src):
            return src
        beside = Path(self.source + SUFFIX)
        return beside if src.is_file() and beside.is_file() else None


def _load_prepared(spec: IndexSpec) -> DataIndex | None:
    path = spec.prepared_path()
    if path is None:
        return None
    index = load_index(path)
    index.origin = "prepared"
    if path == Path(spec.source):
        if index.meta.get("kind") != spec.rules.kind:
            raise DataError(f"data.path '{path}' is an index of {index.meta.get('kind')}, not {spec.rules.kind}")
        return index
    return index if is_current(index, Path(spec.source), spec.rules.kind) else None


def _load_cache(spec: IndexSpec) -> tuple[DataIndex | None, DataIndex | None]:
    """(the cache if current, else None; a stale cache, for what it still knows)."""
    if not spec.cache or not Path(spec.cache).is_file():
        return None, None
    try:
        cached = load_index(Path(spec.cache))
    except DataError:  # damaged (a crash mid-copy, another program): rebuilt, not fatal
        return None, None
    if is_current(cached, Path(spec.source), spec.rules.kind):
        cached.origin = "cache"
        return cached, None
    return None, cached


_INDEXES: dict[IndexSpec, DataIndex] = {}  # this process's, found or built (the start-up check and the loader share them)


def ensure_index(spec: IndexSpec, progress: Callable | None = None) -> DataIndex:
    """The builder's side: a prepared index, the cache if it is current, or a fresh build (kept in
    memory; :func:`shared_index` writes it for the other ranks)."""
    if spec in _INDEXES:
        return _INDEXES[spec]
    index = _load_prepared(spec)
    stale = None
    if index is None:
        index, stale = _load_cache(spec)
    if index is None:
        source = Path(spec.source)
        if not source.exists():
            raise DataError(f"data.path '{source}' does not exist")
        index = build_index(source, spec.rules, spec.threads, progress, stale)
        index.origin = "built"
    _INDEXES[spec] = index
    return index


def publish(index: DataIndex, spec: IndexSpec) -> dict | None:
    """The ticket other ranks read ``index`` by: its file (written to the cache unless it is already
    there or prepared) and its build stamp. None when there is no file to share."""
    if index.origin == "prepared":
        path = spec.prepared_path()
    elif spec.cache:
        path = Path(spec.cache)
        on_disk = load_index(path).meta.get("built") if is_index_file(path) else None
        if on_disk != index.meta.get("built"):  # built now, or moved aside since (--overwrite)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_index(index, path)
    else:
        return None
    return {"path": str(path), "built": index.meta.get("built"), "rows": len(index)}


def read_ticket(ticket: dict, wait_s: float = WAIT_S) -> DataIndex:
    """A reading rank's side: map the builder's file once it is visible here with the builder's
    stamp (a shared file system may show the old file for a while). Opens no data file."""
    path, deadline = Path(ticket["path"]), time.monotonic() + wait_s
    while True:
        try:
            index = load_index(path) if path.is_file() else None
        except DataError:  # caught mid-replace: try again
            index = None
        if index is not None and index.meta.get("built") == ticket["built"] and len(index) == ticket["rows"]:
            index.origin = "shared"
            return index
        if time.monotonic() > deadline:
            raise DataError(f"the data index {path} that rank 0 wrote is not visible here after {wait_s:.0f} s "
                            "(is data.index_cache on a file system every node sees?)")
        time.sleep(0.5)


def shared_index(spec: IndexSpec, builder: bool, share: Callable[[object], object]) -> DataIndex:
    """Every rank's index: the builder ensures and publishes it, ``share`` hands its ticket to every
    rank (a broadcast from rank 0), the others map the file the ticket names."""
    index = ensure_index(spec) if builder else None
    ticket = share(publish(index, spec) if builder else None)
    if builder:
        return index
    if spec in _INDEXES:
        return _INDEXES[spec]
    _INDEXES[spec] = ensure_index(spec) if ticket is None else read_ticket(ticket)
    return _INDEXES[spec]


def as_index(source: "str | Path | DataIndex", rules: IndexRules) -> DataIndex:
    """``source`` itself when it is an index; else the in-memory index of a path (for direct use)."""
    return source if isinstance(source, DataIndex) else ensure_index(IndexSpec(str(source), rules))
