"""A data set's index — relative paths, lengths, segment offsets — as flat arrays in one file.

Start-up must not grow with files × ranks, so a data set is indexed once per job
(:mod:`.indexing`) and every rank maps the result with one open. The index is flat arrays, not
Python objects: the relative paths as one UTF-8 blob with end offsets, and per row an int64
length (audio: 16 kHz samples, as a manifest states them), an optional segment offset (frames)
and the row's file number (segments of one recording share it). Mapped read-only, a node's ranks
share one copy in the page cache.

File format: ``MAGIC``, a little-endian u64 header length, a JSON header ``{"root", "meta",
"arrays": {name: [dtype, count, offset]}}``, then each array 64-byte aligned.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from .files import DataError

MAGIC = b"D2V2IDX1"
SUFFIX = ".d2v2index"  # the index prepare writes beside a manifest: OUT.tsv.d2v2index


@dataclass
class DataIndex:
    """Rows of a data set. ``length``/``offset``/``file`` are None where they carry nothing (images
    have no lengths, whole files no offsets, one row per file needs no file numbers)."""

    root: str
    names: np.ndarray  # uint8: relative paths, UTF-8, concatenated
    ends: np.ndarray  # int64 (files,): end of each name in ``names``
    length: np.ndarray | None = None  # int64 (rows,): 16 kHz samples
    offset: np.ndarray | None = None  # int64 (rows,): first frame of a segment, -1 for a whole file
    file: np.ndarray | None = None  # int64 (rows,): the file (name) of each row; None: row i is file i
    meta: dict = field(default_factory=dict)  # kind, signature, build stamp, skipped files (path, reason)
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
    try:
        with atomic_output(path, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for a, spec in zip(arrays, specs.values()):
                f.seek(start + spec[2])
                f.write(a.tobytes())
    except OSError as e:
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
        raise DataError(f"the data index {path} is damaged ({e})") from None


def is_index_file(path: Path) -> bool:
    """Whether ``path`` is an index file (by its first bytes: any name works)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
