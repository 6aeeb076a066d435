"""Data files: finding them, reading them, and why a file's bytes cannot be trained on.

Listing a data set must not open its files (a folder is walked with ``os.scandir``, top-level
folders in parallel threads), and a corrupt file must cost one log line, not a crashed 64-node
job: files are checked when a batch reads them, on the bytes already in memory. Empty files, files
whose magic bytes do not match their format and JPEGs without an end-of-image marker (the usual
truncation) are caught here; files that pass but still fail to decode are caught by the loaders.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

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


_FOR_GOOD = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.ELOOP)


def read_file(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(bytes, None), or (None, why the file cannot be used): unreadable, or :func:`bytes_problem`.
    An I/O error other than a missing or forbidden file is tried once more (a shared file system's
    passing hiccup must not drop a file for the rest of the run, or a resume would read it)."""
    if path.is_symlink() and not path.exists():
        return None, "broken symbolic link"
    for attempt in range(2):
        try:
            data = np.fromfile(path, dtype=np.uint8)
            break
        except IsADirectoryError:
            return None, "a directory, not a file"
        except OSError as e:
            if attempt or e.errno in _FOR_GOOD:
                return None, f"unreadable ({e.strerror})"
    problem = bytes_problem(data, path.suffix)
    return (None, problem) if problem else (data, None)


class Folder(NamedTuple):
    """What a listing saw in one folder: its mtime, its data files and its subfolders (relative)."""

    mtime: int
    files: list[str]
    subdirs: list[str]


def _list_folder(root: Path, rel: str, suffixes: tuple[str, ...], mtime: int) -> Folder:
    files, subdirs = [], []
    with os.scandir(root / rel) as it:
        for entry in it:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.lower().endswith(suffixes):
                files.append(sub)  # a folder named x.jpg or a broken link fails at read time, once
            elif entry.is_dir(follow_symlinks=False):  # linked folders are not followed (no cycles)
                subdirs.append(sub)
    return Folder(mtime, files, subdirs)


def walk(root: Path, suffixes: tuple[str, ...], threads: int, known: dict[str, Folder] | None = None,
         progress: Callable | None = None) -> tuple[list[str], dict[str, int]]:
    """Relative paths of the data files under ``root`` (sorted as the parts of a path sort) and
    every folder's mtime, without opening a file. Top-level folders are listed in parallel threads
    (``progress`` wraps their iterator); a folder ``known`` from an earlier listing with the same
    mtime is not listed again (adding, removing or renaming an entry changes its folder's mtime)."""
    known = known or {}

    def folder(rel: str) -> Folder:
        seen = known.get(rel)
        mtime = (root / rel).stat().st_mtime_ns
        return seen if seen is not None and seen.mtime == mtime else _list_folder(root, rel, suffixes, mtime)

    def scan(top: str) -> tuple[list[str], dict[str, int]]:
        files, dirs, stack = [], {}, [top]
        while stack:
            rel = stack.pop()
            f = folder(rel)
            dirs[rel] = f.mtime
            files += f.files
            stack += f.subdirs
        return files, dirs

    try:
        top = folder("")
        files, dirs = list(top.files), {"": top.mtime}
        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = pool.map(scan, sorted(top.subdirs))
            for sub_files, sub_dirs in (progress(results, total=len(top.subdirs)) if progress else results):
                files += sub_files
                dirs.update(sub_dirs)
    except OSError as e:
        raise DataError(f"'{root}' cannot be listed ({e.strerror}: {e.filename})") from None
    return sorted(files, key=lambda rel: rel.split("/")), dirs


def read_list(path: Path) -> list[str]:
    """A text file of paths, one per line (``#`` starts a comment line), relative to its folder."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"file list {path} cannot be read ({e})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def list_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The data files of a folder (searched recursively) or of a file list, as paths (for tools
    that take a handful of files, e.g. features)."""
    root = Path(root)
    if root.is_dir():
        return [root / rel for rel in walk(root, suffixes, threads=1)[0]]
    if root.is_file():
        return [root.parent / rel for rel in read_list(root)]  # an absolute line stays absolute
    raise DataError(f"data.path '{root}' does not exist")


def input_files(path: Path, suffixes: tuple[str, ...], modality: str) -> list[Path]:
    """:func:`list_files` kept to ``suffixes``, and at least one (the feature tool's inputs)."""
    files = [p for p in list_files(path, suffixes) if p.suffix.lower() in suffixes]
    if not files:
        raise DataError(f"{path} holds no {modality} files ({', '.join(suffixes)}); this model's modality is {modality}")
    return files


def log_once(logged: set[str], path: str, reason: str, enabled: bool = True) -> None:
    """One line per unusable file per run, with its path and why (``logged``: the paths said so far)."""
    if enabled and path not in logged:
        logged.add(path)
        LOG.warning(f"skipping {path}: {reason}")
