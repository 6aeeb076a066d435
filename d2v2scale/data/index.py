"""A data set's index — relative paths, lengths, segment offsets — built once, read everywhere.

Start-up must not grow with files × ranks. One rank of a job (the builder) lists a folder, reads
a manifest or a file list, or reads each audio file's header once (in threads), and writes the
result atomically into one file; every other rank maps that file with one open. A manifest's
lengths are trusted, as fairseq trusts them. Nothing opens an image at indexing time: a file that
cannot be read is found when a batch reads it (see :mod:`.images`).

The index is flat arrays, not Python objects: the relative paths as one UTF-8 blob with end
offsets, and per row an int64 length (audio, in 16 kHz samples), an optional segment offset (in
the file's frames) and the row's file number (segments of one recording share it). Mapped
read-only, a node's ranks share one copy in the page cache.

An index records what it was built from (``signature``): a file's size and mtime, or every
folder's mtime under a data root (adding or removing a file changes its folder's mtime). The
builder rebuilds a stale one; readers check only what is O(1) (a manifest's stat).

File format: ``MAGIC``, a little-endian u64 header length, a JSON header ``{"meta", "arrays":
{name: [dtype, count, offset]}}``, then each array 64-byte aligned.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .files import DataError

MAGIC = b"D2V2IDX1"
SUFFIX = ".d2v2index"
FORMAT = 1
RATE = 16_000
WAIT_S = 120.0  # how long a reading rank waits for the builder's file to become visible (shared file systems)


@dataclass
class DataIndex:
    """Rows of a data set. ``length``/``offset``/``file`` are None where they carry nothing (images
    have no lengths, whole files no offsets, one row per file needs no file numbers)."""

    root: str
    names: np.ndarray  # uint8: relative paths, UTF-8, concatenated
    ends: np.ndarray  # int64 (files,): end of each name in ``names``
    length: np.ndarray | None = None  # int64 (rows,): 16 kHz samples
    offset: np.ndarray | None = None  # int64 (rows,): first frame of a segment, -1 for a whole file
    file: np.ndarray | None = None  # int64 (rows,): file number
    meta: dict = field(default_factory=dict)  # kind, signature, skipped files (path, reason)
    origin: str = ""  # how this process got it: prepared | cache | built (not stored)

    def __len__(self) -> int:
        return len(self.file) if self.file is not None else len(self.ends)

    @property
    def num_files(self) -> int:
        return len(self.ends)

    def name(self, file: int) -> str:
        start = int(self.ends[file - 1]) if file else 0
        return bytes(self.names[start : int(self.ends[file])]).decode()

    def path(self, row: int) -> Path:
        return Path(self.root) / self.name(int(self.file[row]) if self.file is not None else row)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of files the builder could not index (audio headers)."""
        return [tuple(s) for s in self.meta.get("skipped", [])]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.names, self.ends, self.length, self.offset, self.file) if a is not None)


def pack_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 blob and end offsets of ``names``."""
    encoded = [n.encode() for n in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), ends


# ------------------------------------------------------------------------------------ the file
_ARRAYS = ("names", "ends", "length", "offset", "file")


def save_index(index: DataIndex, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    arrays, pos, specs = [], 0, {}
    for name in _ARRAYS:
        a = getattr(index, name)
        if a is not None:
            a = np.ascontiguousarray(a)
            specs[name] = [a.dtype.str, int(a.size), pos]
            arrays.append(a)
            pos += -(-a.nbytes // 64) * 64
    header = json.dumps({"root": index.root, "meta": index.meta, "arrays": specs}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // 64) * 64
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for a, spec in zip(arrays, specs.values()):
                f.seek(start + spec[2])
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the data index {path} ({e.strerror or e})") from None


def load_index(path: Path) -> DataIndex:
    """Map an index file read-only (one open; the arrays are views of the mapping)."""
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the data index {path} ({getattr(e, 'strerror', None) or e})") from None
    if mapped[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a d2v2scale data index (made by python -m d2v2scale.prepare)")
    (size,) = struct.unpack("<Q", mapped[len(MAGIC) : len(MAGIC) + 8])
    try:
        header = json.loads(mapped[len(MAGIC) + 8 : len(MAGIC) + 8 + size])
        start = -(-(len(MAGIC) + 8 + size) // 64) * 64
        arrays = {name: np.frombuffer(mapped, dtype=np.dtype(dtype), count=count, offset=start + pos)
                  for name, (dtype, count, pos) in header["arrays"].items()}
        return DataIndex(header["root"], meta=header["meta"], **arrays)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"the data index {path} is damaged ({e}); delete it to rebuild") from None


# ------------------------------------------------------------------------------- signatures
def _split(rel: str) -> list[str]:
    return rel.split("/")


def walk(root: Path, suffixes: tuple[str, ...], threads: int,
         previous: DataIndex | None = None) -> tuple[list[str], dict[str, int]]:
    """Relative paths under ``root`` with a data suffix (sorted as the parts of a path sort), and
    every folder's mtime. No data file is opened. Top-level folders are listed in parallel threads;
    a folder whose mtime ``previous`` recorded is taken from it without being listed again (adding,
    removing or renaming an entry changes the folder's mtime)."""
    known = _known_folders(previous, root)

    def scan(top: str) -> tuple[list[str], dict[str, int]]:
        files, dirs, stack = [], {}, [top]
        while stack:
            here = stack.pop()
            mtime = (root / here).stat().st_mtime_ns
            dirs[here] = mtime
            if here in known and known[here][0] == mtime:
                files += known[here][1]
                stack += known[here][2]
                continue
            with os.scandir(root / here) as it:
                for entry in it:
                    sub = f"{here}/{entry.name}" if here else entry.name
                    if entry.name.lower().endswith(suffixes):
                        files.append(sub)  # a folder named x.jpg or a broken link fails at read time, once
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append(sub)
        return files, dirs

    try:
        files, dirs, subdirs = scan_level(root, suffixes, known)
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for sub_files, sub_dirs in pool.map(scan, subdirs):
                files += sub_files
                dirs.update(sub_dirs)
    except OSError as e:
        raise DataError(f"data.path '{root}' cannot be listed ({e.strerror}: {e.filename})") from None
    return sorted(files, key=_split), dirs


def scan_level(root: Path, suffixes: tuple[str, ...], known: dict) -> tuple[list[str], dict[str, int], list[str]]:
    """The root folder itself: its data files, its mtime, and its subfolders (from ``known`` when unchanged)."""
    mtime = root.stat().st_mtime_ns
    if "" in known and known[""][0] == mtime:
        return list(known[""][1]), {"": mtime}, sorted(known[""][2])
    files, subdirs = [], []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.lower().endswith(suffixes):
                files.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
    return files, {"": mtime}, sorted(subdirs)


def _known_folders(previous: DataIndex | None, root: Path) -> dict[str, tuple[int, list[str], list[str]]]:
    """folder → (mtime, its data files, its subfolders) as ``previous`` (an index of ``root``) saw them."""
    sig = previous.meta.get("signature", {}) if previous is not None else {}
    if sig.get("source") != str(root.resolve()) or "dirs" not in sig:
        return {}
    known = {rel: (mtime, [], []) for rel, mtime in sig["dirs"].items()}
    for rel in known:
        if rel and rel.rpartition("/")[0] in known:
            known[rel.rpartition("/")[0]][2].append(rel)
    for f in range(previous.num_files):
        name = previous.name(f)
        if name.rpartition("/")[0] in known:
            known[name.rpartition("/")[0]][1].append(name)
    return known


def signature(source: Path, kind: str) -> dict:
    """What an index of ``source`` depends on, cheaply: a file's (size, mtime); a folder's mtime
    (its subfolders' are added by the builder, see :func:`walk`)."""
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


# ------------------------------------------------------------------------------- building
def read_list(path: Path) -> list[str]:
    """A text file of paths, one per line (``#`` comments), relative to the list's folder."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"file list {path} cannot be read ({e})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_manifest(path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray | None]:
    """A fairseq/wav2vec ``.tsv``: the root folder, then ``relative/path<TAB>frames[<TAB>offset]``
    (the offset column: segments of a longer recording, see ``python -m d2v2scale.prepare audio``).
    Returns (root, names per row, frames per row, offsets per row (-1: a whole file) or None)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"manifest {path} cannot be read ({e})") from None
    if not lines or not lines[0].strip():
        raise DataError(f"manifest {path}: the first line must be the audio root folder")
    names, frames, offsets = [], [], []
    for k, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not all(f.strip().isdigit() for f in fields[1:]):
            raise DataError(f"manifest {path}:{k}: expected 'relative/path<TAB>num_samples' (a segment: "
                            f"'<TAB>offset' after it), got {line[:80]!r}")
        names.append(fields[0])
        frames.append(int(fields[1]))
        offsets.append(int(fields[2]) if len(fields) == 3 else -1)
    offset = np.asarray(offsets, dtype=np.int64)
    return lines[0].strip(), names, np.asarray(frames, dtype=np.int64), offset if (offset >= 0).any() else None


def _rows_by_file(names: list[str]) -> tuple[list[str], np.ndarray | None]:
    """Unique file names in first-seen order and each row's file number (None when rows are files)."""
    numbers: dict[str, int] = {}
    file = np.fromiter((numbers.setdefault(n, len(numbers)) for n in names), dtype=np.int64, count=len(names))
    return list(numbers), None if len(numbers) == len(names) else file


def _headers(root: Path, names: list[str], threads: int, progress: Callable | None):
    """Each audio file's length in 16 kHz samples from its header, read once, in threads."""
    from .audio import header_length

    def read(name: str):
        try:
            frames, rate = header_length(root / name)
        except (OSError, ValueError, EOFError, struct.error) as e:
            return None, f"unreadable audio header ({e})"
        if not rate or not frames:
            return None, "no audio samples"
        return int(frames * RATE // rate), None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(progress(pool.map(read, names), total=len(names)) if progress else pool.map(read, names))
    return results


SAMPLE = 8  # images the builder reads to tell a wrong folder from a data set with some bad files


def _sample(root: Path, names: list[str]) -> list[list[str]]:
    """(path, reason) of the unusable ones among ``SAMPLE`` evenly spaced images: when all are, the
    folder is refused at start instead of at step 1 (the others are checked when they are read)."""
    from .files import read_file

    picks = np.unique(np.linspace(0, len(names) - 1, min(SAMPLE, len(names))).round().astype(int))
    bad = [[str(root / names[i]), read_file(root / names[i])[1]] for i in picks]
    return [b for b in bad if b[1] is not None]


def build_index(source: Path, kind: str, suffixes: tuple[str, ...], threads: int = 8,
                progress: Callable | None = None, previous: DataIndex | None = None) -> DataIndex:
    """Index ``source`` (a folder, a file list, or for audio a ``.tsv`` manifest) without opening
    any image; audio folders have each header read once. ``previous`` (a stale index of a folder):
    its unchanged folders are not listed again."""
    sig = signature(source, kind)
    skipped: list[list[str]] = []
    length = offset = None
    if source.is_dir():
        names, dirs = walk(source, suffixes, threads, previous if kind == "images" else None)
        sig["dirs"] = dirs
        root = str(source)
    elif kind == "audio" and source.suffix == ".tsv":
        root, names, length, offset = read_manifest(source)  # trusted, as fairseq trusts it
    else:
        root, names = str(source.parent), read_list(source)
    if kind == "audio" and length is None:
        results = _headers(Path(root), names, threads, progress)
        keep = [i for i, (n, _) in enumerate(results) if n is not None]
        skipped = [[str(Path(root) / names[i]), why] for i, (_, why) in enumerate(results) if why is not None]
        length = np.asarray([results[i][0] for i in keep], dtype=np.int64)
        names = [names[i] for i in keep]
    unusable = skipped if kind == "audio" else _sample(Path(root), names) if names else []
    if not names or (kind == "images" and len(unusable) == min(SAMPLE, len(names))):  # every sampled one
        example = f"; e.g. {unusable[0][0]}: {unusable[0][1]}" if unusable else ""
        raise DataError(f"data.path '{source}' has no usable files with suffixes {', '.join(suffixes)}"
                        f" ({len(unusable)} read and unusable{example})")
    unique, file = _rows_by_file(names)
    blob, ends = pack_names(unique)
    return DataIndex(root, blob, ends, length, offset, file,
                     {"kind": kind, "signature": sig, "skipped": skipped, "built": time.time()})


# ------------------------------------------------------------------------------ who builds
@dataclass(frozen=True)
class IndexSpec:
    """Where a run's index comes from and goes: ``source`` is ``data.path``; ``cache`` is
    ``data.index_cache`` (None: kept in memory only)."""

    source: str
    kind: str  # images | audio
    suffixes: tuple[str, ...]
    cache: str | None = None
    threads: int = 8

    def prepared(self) -> Path | None:
        """An index file given as the data path, or one ``prepare`` wrote beside a manifest/list."""
        src = Path(self.source)
        if is_index_file(src):
            return src
        beside = Path(self.source + SUFFIX)
        return beside if src.is_file() and beside.is_file() else None


def is_index_file(path: Path) -> bool:
    """Whether ``path`` is an index file (by its first bytes: any name works)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _prepared(spec: IndexSpec) -> DataIndex | None:
    path = spec.prepared()
    if path is None:
        return None
    index = load_index(path)
    index.origin = "prepared"
    if path == Path(spec.source):
        if index.meta.get("kind") != spec.kind:
            raise DataError(f"data.path '{path}' is an index of {index.meta.get('kind')}, not {spec.kind}")
        return index
    return index if is_current(index, Path(spec.source), spec.kind) else None


_BUILT: dict[IndexSpec, DataIndex] = {}


def ensure_index(spec: IndexSpec, progress: Callable | None = None) -> DataIndex:
    """The builder's side: a prepared index, the cache if it is current, or a fresh build written
    to the cache. Memoised per process (the start-up check and the loader share it)."""
    if spec in _BUILT:
        return _BUILT[spec]
    index = _prepared(spec)
    stale = None
    if index is None and spec.cache and Path(spec.cache).is_file():
        cached = load_index(Path(spec.cache))
        if is_current(cached, Path(spec.source), spec.kind):
            index, cached.origin = cached, "cache"
        else:
            stale = cached
    if index is None:
        source = Path(spec.source)
        if not source.exists():
            raise DataError(f"data.path '{source}' does not exist")
        index = build_index(source, spec.kind, spec.suffixes, spec.threads, progress, stale)
        index.origin = "built"
        if spec.cache:
            try:
                Path(spec.cache).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(f"data.index_cache {spec.cache}: cannot create its folder ({e.strerror})") from None
            save_index(index, Path(spec.cache))
    _BUILT[spec] = index
    return index


def read_built_index(spec: IndexSpec, wait_s: float = WAIT_S) -> DataIndex:
    """A reading rank's side, after the builder is done: the prepared index or the cache the builder
    wrote, waited for while a shared file system makes it visible. Opens no data file."""
    if spec in _BUILT:
        return _BUILT[spec]
    index = _prepared(spec)
    if index is None:
        if not spec.cache:
            return ensure_index(spec)  # no shared cache: every process indexes for itself
        deadline = time.monotonic() + wait_s
        while not Path(spec.cache).is_file():
            if time.monotonic() > deadline:
                raise DataError(f"the data index {spec.cache} did not appear within {wait_s:.0f} s (rank 0 "
                                "builds it; is data.index_cache on a file system every node sees?)")
            time.sleep(0.5)
        index = load_index(Path(spec.cache))
    _BUILT[spec] = index
    return index


def shared_index(spec: IndexSpec, builder: bool, barrier: Callable[[], None]) -> DataIndex:
    """Every rank's index: the builder ensures it, everyone meets at ``barrier``, the others read it."""
    if builder:
        index = ensure_index(spec)
        if spec.cache and not Path(spec.cache).is_file():  # moved aside since (--overwrite moves the run)
            save_index(index, Path(spec.cache))
    barrier()
    return ensure_index(spec) if builder else read_built_index(spec)


def as_index(source: "str | Path | DataIndex", kind: str, suffixes: tuple[str, ...]) -> DataIndex:
    """``source`` itself when it is an index; else the in-memory index of a path (for direct use)."""
    return source if isinstance(source, DataIndex) else ensure_index(IndexSpec(str(source), kind, suffixes))
