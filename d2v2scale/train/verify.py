"""Checkpoint files that can be trusted: a checksum written with each file, a tag verified before a
resume, and loading that never unpickles code.

A 64-node allocation must not end on a damaged checkpoint, nor continue on corrupt values. Each
rank records (bytes, CRC-32) of what it writes, computed as it writes (no slower than reading the
file back afterwards, within ``bench/checksum.py``'s noise, and no second pass); rank 0 lists them
in the tag's ``run.json`` after every rank is done, so a tag is complete exactly when every listed
file matches. ``zlib.crc32`` is in the standard library, runs at 1.4-2.8 GB/s here, and catches
every burst of up to 32 flipped bits and any truncation.

Every checkpoint file is read with ``torch.load(weights_only=True)``: tensors and plain Python
values only, plus a short allow-list of data classes (numpy's array reconstruction, for RNG states
saved before they were stored as tensors; DeepSpeed's loss scaler, in its native files). A file
that names anything else is refused in one line, before anything from it runs.
"""
from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

RUN_FILE = "run.json"
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding pickled code); one line."""


class ChecksumWriter:
    """A binary file wrapper that counts and checksums every byte written through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checked(obj: Any, path: Path) -> tuple[int, int]:
    """``torch.save`` to ``path`` (through ``path.part``, renamed when complete); (bytes, crc32)."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        writer = ChecksumWriter(f)
        torch.save(obj, writer)
    part.replace(path)
    return writer.size, writer.crc


def checksum_file(path: Path) -> tuple[int, int]:
    """(bytes, crc32) of a file written by someone else (DeepSpeed's native files)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def read_run_info(tag_dir: Path) -> dict:
    """A tag's ``run.json``, or :class:`CheckpointError` saying why it cannot be read."""
    path = tag_dir / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{RUN_FILE} is missing (the checkpoint was never completed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{RUN_FILE} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(info, dict) or "step" not in info:
        raise CheckpointError(f"{RUN_FILE} is unreadable (not a checkpoint description)")
    return info


def problem(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint directory (the file and how), or None when every file its
    ``run.json`` lists is there with its size and checksum. Checkpoints from before checksums were
    recorded have only their ``run.json`` checked."""
    try:
        info = read_run_info(tag_dir)
    except CheckpointError as e:
        return str(e)
    files = info.get("files", {})
    for rel, (size, crc) in sorted(files.items()):
        path = tag_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} is truncated ({actual} of {size} bytes)" if actual < size else \
                f"{rel} has {actual} bytes, {size} were written"
    for rel, (size, crc) in sorted(files.items()):
        if checksum_file(tag_dir / rel)[1] != crc:
            return f"{rel} does not match its checksum (damaged after it was written)"
    return None


def _allowed_globals() -> list:
    """Data classes a checkpoint file may name (see the module docstring); nothing that runs code."""
    numpy_core = getattr(np, "_core", None) or np.core
    allowed: list = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Path, **kwargs) -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; one line for a refused or
    unreadable file."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        named = text.split("GLOBAL ", 1)[1].split(" ", 1)[0] if "GLOBAL " in text else "a Python object"
        raise CheckpointError(f"{path} holds pickled code ({named}); it is not loaded (a checkpoint holds "
                              "tensors and plain values only)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def scan(paths: list[Path]) -> None:
    """Refuse files that would unpickle code, before a library that loads them without the check
    (DeepSpeed's native loader) reads them: the same bytes, checked with the safe unpickler."""
    for path in paths:
        safe_load(path, mmap=True)
