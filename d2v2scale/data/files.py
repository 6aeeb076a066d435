"""Listing data files and screening out unusable ones before training starts.

A corrupt file must cost one log line, not a crashed 64-node job. The screen is cheap (a few
bytes from each end of each file): empty files, files whose magic bytes do not match their
format, and JPEGs without an end-of-image marker (the usual truncation) are skipped, counted and
logged with their path. Files that pass the screen but still fail to decode are caught by the
loaders at run time (see :mod:`d2v2scale.data.images`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

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


def screen(path: Path) -> str | None:
    """Why ``path`` is unusable, or None when it passes the cheap checks."""
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        return "a directory, not a file"
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - JPEG_TAIL))
            tail = f.read(JPEG_TAIL)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    magic = _MAGIC.get(path.suffix.lower())
    if magic and not head.startswith(magic):
        return f"not a {path.suffix.lower()[1:].upper()} file (magic bytes {head[:4].hex()})"
    if path.suffix.lower() in (".jpg", ".jpeg") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


@dataclass
class FileIndex:
    """The usable files under a data path, in a fixed (sorted) order, and what was skipped."""

    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def list_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A folder (searched recursively, e.g. ImageNet's class folders) or a text file listing paths
    (relative paths are taken relative to the list file)."""
    root = Path(root)
    if root.is_dir():
        # every entry with a data suffix, so that directories named x.jpg and broken links are screened
        # out with a log line instead of vanishing
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if root.is_file():
        base = root.parent
        lines = [line.strip() for line in root.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return [p if p.is_absolute() else base / p for p in map(Path, lines)]
    raise DataError(f"data.path '{root}' does not exist")


def log_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One line per unusable file, with its path and why."""
    for path, reason in skipped:
        LOG.warning(f"skipping {path}: {reason}")


@functools.lru_cache(maxsize=8)
def build_index(root: str | Path, suffixes: tuple[str, ...], log: bool = True) -> FileIndex:
    """The usable files under ``root`` (memoised: the start-up check and the loader share one scan)."""
    files = list_files(root, suffixes)
    usable, skipped = [], []
    for path in files:
        reason = screen(path)
        if reason is None:
            usable.append(path)
        else:
            skipped.append((path, reason))
    if not usable:
        example = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"data.path '{root}' has no usable files with suffixes {', '.join(suffixes)} "
                        f"({len(files)} found, {len(skipped)} skipped as unusable{example})")
    if log:
        log_skipped(skipped)
    return FileIndex(usable, skipped)
