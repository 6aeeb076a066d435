"""Data files: their suffixes, and why a file's bytes cannot be trained on.

A corrupt file must cost one log line, not a crashed 64-node job, and finding it must not cost an
open per file per rank at start-up: files are checked when a batch reads them (the bytes are in
memory then, so the check is free). Empty files, files whose magic bytes do not match their format
and JPEGs without an end-of-image marker (the usual truncation) are caught here; files that pass
but still fail to decode are caught by the loaders (see :mod:`d2v2scale.data.images`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..logs import LOG

_MAGIC = {
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".wav": (b"RIFF",),
    ".flac": (b"fLaC",),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUDIO_SUFFIXES = (".wav", ".flac")


class DataError(RuntimeError):
    """No usable data at the configured path; the message says where and why."""


JPEG_TAIL = 64 * 1024  # bytes searched for the end-of-image marker (cameras append data after it)


def bytes_problem(data: np.ndarray | bytes, suffix: str) -> str | None:
    """Why a file's bytes are unusable (empty, wrong format, truncated JPEG), or None."""
    head = bytes(data[:16])
    if len(data) == 0:
        return "empty file"
    magic = _MAGIC.get(suffix.lower())
    if magic and not head.startswith(magic):
        return f"not a {suffix.lower()[1:].upper()} file (magic bytes {head[:4].hex()})"
    if suffix.lower() in (".jpg", ".jpeg") and b"\xff\xd9" not in bytes(data[-JPEG_TAIL:]):
        return "truncated JPEG (no end-of-image marker)"
    return None


def read_file(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(bytes, None), or (None, why the file cannot be used): unreadable, or :func:`bytes_problem`."""
    if path.is_symlink() and not path.exists():
        return None, "broken symbolic link"
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except IsADirectoryError:
        return None, "a directory, not a file"
    except OSError as e:
        return None, f"unreadable ({e.strerror})"
    problem = bytes_problem(data, path.suffix)
    return (None, problem) if problem else (data, None)


def list_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A folder (searched recursively) or a text file listing paths (relative paths are taken
    relative to the list file); for tools that take a handful of files (features)."""
    root = Path(root)
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if root.is_file():
        base = root.parent
        lines = [line.strip() for line in root.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return [p if p.is_absolute() else base / p for p in map(Path, lines)]
    raise DataError(f"data.path '{root}' does not exist")


def log_once(logged: set[str], path: str, reason: str, enabled: bool = True) -> None:
    """One line per unusable file per run, with its path and why (``logged``: the paths said so far)."""
    if enabled and path not in logged:
        logged.add(path)
        LOG.warning(f"skipping {path}: {reason}")
