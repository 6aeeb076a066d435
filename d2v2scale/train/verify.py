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

A resume reads the checkpoint to verify it once per restart, not once per rank
(:func:`find_problem`: each rank checks a share of the files, balanced by bytes, and the ranks
agree on the result); afterwards each rank checks the size of every file it opens (one stat,
:func:`check_size`), so a file changed since the verification is still refused by whoever reads it.
"""
from __future__ import annotations

import heapq
import json
import pickle
import zlib
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import numpy as np
import torch

from ..atomic import atomic_output
from ..distributed.runtime import gather_objects

RUN_FILE = "run.json"
_CHUNK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding pickled code); one line."""


class ChecksumWriter:
    """A binary file wrapper that counts and checksums every byte written through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checked(obj: Any, path: Path) -> tuple[int, int]:
    """``torch.save`` to ``path``, atomically (:mod:`d2v2scale.atomic`); (bytes, crc32)."""
    with atomic_output(path, "wb") as f:
        writer = ChecksumWriter(f)
        # torch.save's stub asks for IO[bytes]; it only calls write() and flush() on a buffer
        torch.save(obj, cast(IO[bytes], writer))
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


def size_problem(tag_dir: Path, rel: str, size: int) -> str | None:
    """What is wrong with the size of a listed file (missing, truncated, grown), or None: one stat."""
    path = tag_dir / rel
    if not path.is_file():
        return f"{rel} is missing"
    actual = path.stat().st_size
    if actual == size:
        return None
    return f"{rel} is truncated ({actual} of {size} bytes)" if actual < size else \
        f"{rel} has {actual} bytes, {size} were written"


def _mismatch(rel: str) -> str:
    return f"{rel} does not match its checksum (damaged after it was written)"


def problem(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint directory (the file and how), or None when every file its
    ``run.json`` lists is there with its size and checksum. Checkpoints from before checksums were
    recorded have only their ``run.json`` checked.

    The single-process check: the caller reads every file. A resume on many ranks verifies with
    :func:`find_problem` instead, which reads each file once in all."""
    try:
        info = read_run_info(tag_dir)
    except CheckpointError as e:
        return str(e)
    files = info.get("files", {})
    for rel, (size, _) in sorted(files.items()):
        if (why := size_problem(tag_dir, rel, size)) is not None:
            return why
    for rel, (_, crc) in sorted(files.items()):
        if checksum_file(tag_dir / rel)[1] != crc:
            return _mismatch(rel)
    return None


def listed_files(tag_dir: Path) -> dict:
    """``run.json``'s ``{file: [bytes, crc32]}``; {} for shards written outside a checkpoint (no
    ``run.json``) and for a checkpoint from before checksums (nothing to check against)."""
    return read_run_info(tag_dir).get("files", {}) if (tag_dir / RUN_FILE).is_file() else {}


def check_size(tag_dir: Path, rel: str, files: dict) -> None:
    """Refuse a checkpoint file about to be opened whose size is not what ``run.json`` lists (one
    stat): the tag was verified once, by all ranks together, so a file changed since (or one the
    listing does not name) must still be refused by the rank that reads it. ``files`` empty: no check."""
    if not files:
        return
    why = f"{rel} is not listed in {RUN_FILE}" if rel not in files else size_problem(tag_dir, rel, files[rel][0])
    if why is not None:
        raise CheckpointError(f"checkpoint file {tag_dir / rel} does not match {RUN_FILE} ({why}); it is not loaded")


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


RUN_STAGE, SIZE_STAGE, CRC_STAGE, SCAN_STAGE = range(4)


class Problem(NamedTuple):
    """One thing wrong with a tag. Problems order as :func:`problem` reports them (``run.json``,
    then sizes, then checksums; files sorted), and a file that would unpickle code (or cannot be
    unpickled) last: it is only looked for where nothing is damaged."""

    stage: int
    rel: str
    message: str

    @property
    def refused(self) -> bool:
        """A file that is as written but would unpickle code (or cannot be unpickled) was crafted,
        not damaged: a resume stops rather than quietly taking an older tag (the single-process
        :func:`~d2v2scale.train.checkpoint.damage` raises for it too)."""
        return self.stage == SCAN_STAGE


def share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's files of a listing: largest first, each to the rank with the fewest bytes so
    far (ties: the lowest rank). Every rank computes the same split from the same listing, and no
    rank gets more than ``total / world_size`` + the largest file."""
    loads = [(0, r) for r in range(world_size)]
    mine = []
    for rel, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        load, r = heapq.heappop(loads)
        heapq.heappush(loads, (load + size, r))
        if r == rank:
            mine.append(rel)
    return sorted(mine)


def _file_problem(tag_dir: Path, rel: str, record: list | None) -> Problem | None:
    """Size, CRC-32 (``record`` = [bytes, crc32]; None: a file the listing does not name), then
    (``*.pt``) the safe unpickler over the same file; an I/O error is a problem, never a crash on
    one rank while the others wait."""
    try:
        if record is not None:
            if (why := size_problem(tag_dir, rel, record[0])) is not None:
                return Problem(SIZE_STAGE, rel, why)
            if checksum_file(tag_dir / rel)[1] != record[1]:
                return Problem(CRC_STAGE, rel, _mismatch(rel))
    except OSError as e:
        return Problem(CRC_STAGE, rel, f"{rel} cannot be read ({e.strerror or e})")
    if rel.endswith(".pt"):
        try:
            scan([tag_dir / rel])
        except CheckpointError as e:
            return Problem(SCAN_STAGE, rel, str(e))
    return None


def find_problem(tag_dir: Path, rank: int, world_size: int) -> Problem | None:
    """The first :class:`Problem` of a tag, the same on every rank, or None when it is intact;
    collective over the default process group (a plain process: ``world_size`` 1).

    Each rank checks its :func:`share` of the files ``run.json`` lists (size, CRC-32, and the
    safe unpickler over its ``*.pt`` files), so the checkpoint is read once in all, not once per
    rank; the last rank also scans ``*.pt`` files the listing does not name (none in a checkpoint
    this code wrote: only that rank walks the directory)."""
    found: list[Problem | None] = []
    try:
        files = read_run_info(tag_dir).get("files", {})
    except CheckpointError as e:
        found.append(Problem(RUN_STAGE, RUN_FILE, str(e)))
    else:
        for rel in share({rel: record[0] for rel, record in files.items()}, rank, world_size):
            found.append(_file_problem(tag_dir, rel, files[rel]))
        if rank == world_size - 1:
            unlisted = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*.pt"))
            found.extend(_file_problem(tag_dir, rel, None) for rel in unlisted if rel not in files)
    everyone = gather_objects([p for p in found if p is not None])
    if len(everyone) != world_size:
        raise RuntimeError(f"find_problem on {world_size} ranks needs a process group of {world_size} "
                           f"(found {len(everyone)})")
    return min((Problem(*p) for part in everyone for p in part), default=None)


def verify_collectively(tag_dir: Path, rank: int, world_size: int) -> str | None:
    """What is wrong with a tag (the message of :func:`find_problem`), the same on every rank, or
    None: collective, each file read by one rank only."""
    found = find_problem(tag_dir, rank, world_size)
    return None if found is None else found.message
