"""What a run's data set was, in a few numbers: stored in every checkpoint, compared on resume.

Batches are a pure function of the step and the index (:mod:`d2v2scale.data.schedule`), so a run
resumed on a data set whose files were added, removed or renamed continues on another data order
than the one it left, silently. The fingerprint — rows, files, total length where the index
records lengths (audio samples), and a hash of every name, length and segment offset — is cheap
to take from the mapped index and says which of these changed.
"""
from __future__ import annotations

import hashlib

from .index import DataIndex


def fingerprint(index: DataIndex) -> dict:
    """Rows, files, total length (None: the index records no lengths) and a SHA-256 of the rows."""
    digest = hashlib.sha256()
    for array in (index.names, index.ends, index.length, index.offset, index.file):
        digest.update(b"-" if array is None else array.tobytes())
    return {"rows": len(index), "files": index.num_files,
            "total_length": None if index.length is None else int(index.length.sum()),
            "sha256": digest.hexdigest()}


def describe_change(saved: dict, now: dict) -> str | None:
    """One phrase naming what differs between two fingerprints (counts first), or None when equal."""
    if saved.get("sha256") == now.get("sha256"):
        return None
    changes = [f"{key.replace('_', ' ')} {saved.get(key)} → {now.get(key)}" for key in ("rows", "files", "total_length")
               if saved.get(key) != now.get(key)]
    return ", ".join(changes) if changes else "the same counts, but other names or lengths"
