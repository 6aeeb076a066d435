"""Every file a later read trusts whole is written here: a temporary file beside the target,
fsynced, renamed over it, and the directory fsynced, so a crash at any moment leaves either the
old file or the new one — never half of one, and never a rename the disk forgot.

Checkpoint files, ``latest``, a run's ``config.yaml`` and ``ds_config.json``, a rewritten
``metrics.jsonl``, data indexes and manifests, a planned DeepSpeed JSON, converted weights, the
report and the job marker all go through :func:`atomic_output`. ``durable=False`` skips the two
fsyncs for scratch copies a re-run makes again anyway (node-local staging: 10^5 fsyncs would be
its whole cost); the rename still makes them all-or-nothing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

TEMPORARY_SUFFIX = ".tmp"


def is_temporary(path: Path) -> bool:
    """A file :func:`atomic_output` has not renamed into place yet (a walker of a folder being
    written skips it)."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w", durable: bool = True) -> Iterator[IO]:
    """A file object whose content replaces ``path`` when the block succeeds; on any failure (or a
    crash) ``path`` is untouched and the temporary file is gone (or, after a kill, left as a
    dot-file that :func:`is_temporary` names)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a folder to be created would go)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor)


def cannot_write(folder: Path) -> str | None:
    """Why ``folder`` does not take a file (``strerror (ECODE)``), or None: a real write, since
    permission bits do not say (root ignores them; a read-only mount says so only on writing)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".d2v2scale-probe.", suffix=TEMPORARY_SUFFIX)
        try:
            os.write(fd, b"d2v2scale")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        code = f" ({errno.errorcode.get(e.errno, e.errno)})" if e.errno else ""
        return f"{e.strerror or e}{code}"
    return None


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text``, atomically and durably."""
    with atomic_output(path) as f:
        f.write(text)
