"""Atomic checkpoints with everything an exact resume needs, in a layout-free format by default.

Layout::

    RUN/checkpoints/<tag>/shards/rank_<R>.pt   this rank's pieces of the weights, AdamW moments and
                                               EMA teacher, located in the full tensors (layout-free:
                                               any world size, ZeRO stage, TP degree or backend reads
                                               them, see :mod:`d2v2scale.train.shards`)
                         rank_tp{T}_dp{D}.pt   this rank's RNG states (+ its teacher shard in the
                                               native format)
                         run.json              step, layout, resolved config, optimizer/schedule
                                               counters, and every file above with its bytes and
                                               CRC-32 (rank 0, written last)
    RUN/checkpoints/latest                     the newest complete tag

``train.checkpoint_format=native`` writes the backend's own format (DeepSpeed's ``save_checkpoint``) instead of
``shards/`` (resumable on the same layout only).

Everything is written into ``<tag>.tmp/``; each rank checksums what it writes as it writes it
(:mod:`d2v2scale.train.verify`), rank 0 lists every file in ``run.json`` once all ranks are done,
every rank fsyncs, a barrier, then rank 0 renames the directory and replaces ``latest`` through a
temporary file. A crash at any point leaves the previous ``latest`` pointing at a complete
checkpoint; stale ``*.tmp`` directories are removed by the next save. The last
``train.keep_last`` tags are kept, and never the one just written. Every file is read back with
``weights_only=True``: a checkpoint cannot run code.

The data position needs no saving beyond the step: the samples of a step are a pure function of
(step, global batch), split over the ranks of whatever layout runs it (see
:mod:`d2v2scale.data.schedule`). Dropout RNG streams belong to a layout: they are restored when
the layout is the same, and start from their seeds otherwise.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import fsync_dir, is_temporary, write_text
from ..distributed.runtime import all_reduce, barrier, broadcast_object, gather_objects
from .shards import Piece, ShardReader, has_shards, write_shards
from .verify import (RUN_FILE, CheckpointError, check_size, checksum_file, find_problem, problem, read_run_info,
                     safe_load, save_checked, scan)

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tags(ckpt_dir: Path) -> list[Path]:
    """The checkpoint directories under ``ckpt_dir``, newest first."""
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: step_of(p.name), reverse=True)


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint (:func:`~d2v2scale.train.verify.problem`), or None; a file
    that would unpickle code raises :class:`~d2v2scale.train.verify.CheckpointError` instead."""
    found = problem(tag_dir)
    if found is None:
        scan(sorted(tag_dir.rglob("*.pt")))
    return found


def _in_reach(ckpt_dir: Path) -> list[Path]:
    """The tags a resume may start from, newest first: those at or before the one ``latest`` names
    (all tags when it names none: DeepSpeed's convention, and a user may point it back)."""
    candidates = tags(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if latest is not None and (ckpt_dir / latest).is_dir() and latest.startswith("step_") and latest[5:].isdigit():
        candidates = [t for t in candidates if step_of(t.name) <= step_of(latest)]
    return candidates


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """The tags a resume may start from (as :func:`newest_intact` picks them), newest first, whose
    ``run.json`` reads: one small read per tag, no checksum, no unpickling, no collective, so every
    rank can call it before the process group exists. Which of them is intact is
    :func:`newest_verified`'s to say, once the ranks can share the reading."""
    out = []
    for tag in _in_reach(ckpt_dir):
        try:
            read_run_info(tag)
        except CheckpointError:
            continue
        out.append(tag)
    return out


def newest_intact(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint at or before the one ``latest`` names, and a line for each newer
    damaged one passed over; None when there is no checkpoint at all. Damaged ones only:
    CheckpointError. Single-process: reads every file (:func:`newest_verified` reads each once
    over all ranks)."""
    passed: list[str] = []
    for tag in _in_reach(ckpt_dir):
        found = damage(tag)
        if found is None:
            return tag, [f"warning: checkpoint {p}; resuming from {tag.name}" for p in passed]
        passed.append(f"{tag.name} is damaged ({found})")
    if passed:
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(passed)}")
    return None, []


def newest_verified(ckpt_dir: Path, rank: int, world_size: int) -> tuple[Path | None, list[str]]:
    """:func:`newest_intact`, collectively (every rank calls it, after the process group starts):
    each tag is verified by all ranks together (:func:`~d2v2scale.train.verify.find_problem`, each
    file read once in all), newest first, until one is intact. The same answer, warnings and
    CheckpointError on every rank: the tags tried are rank 0's listing (a shared file system may
    show a new tag to some nodes first), and every verdict is agreed. A tag holding pickled code
    is refused (CheckpointError), not passed over."""
    passed: list[str] = []
    names = broadcast_object([t.name for t in _in_reach(ckpt_dir)])
    assert isinstance(names, list)  # rank 0's tag names
    for tag in (ckpt_dir / name for name in names):
        found = find_problem(tag, rank, world_size)
        if found is None:
            return tag, [f"warning: checkpoint {p}; resuming from {tag.name}" for p in passed]
        if found.refused:
            raise CheckpointError(found.message)
        passed.append(f"{tag.name} is damaged ({found.message})")
    if passed:
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(passed)}")
    return None, []


def verify_tag(tag_dir: Path, rank: int, world_size: int) -> None:
    """Refuse a tag named explicitly (CheckpointError, the same on every rank) unless it is intact;
    collective, as :func:`newest_verified`."""
    found = find_problem(tag_dir, rank, world_size)
    if found is not None and found.refused:
        raise CheckpointError(found.message)
    if found is not None:
        raise CheckpointError(f"checkpoint {tag_dir.name} is damaged ({found.message})")


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def rank_file(tp_rank: int, dp_rank: int) -> str:
    return f"rank_tp{tp_rank:02d}_dp{dp_rank:05d}.pt"


def _fsync_tree(path: Path) -> None:
    """fsync every finished file: ours already are (:mod:`d2v2scale.atomic`), DeepSpeed's native
    ones are not (other ranks may be renaming their temporary files meanwhile)."""
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not is_temporary(p)):
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path)


def _crash_point(name: str, step: int) -> None:
    """Test hook: ``D2V2SCALE_TEST_CRASH=<point>:<step>`` ends this process abruptly (like kill -9)
    at that point of that step's save."""
    if os.environ.get("D2V2SCALE_TEST_CRASH") == f"{name}:{step}":
        os._exit(137)


def rng_state(tp_rng=None) -> dict:
    """Every RNG's state as tensors and plain values (so the file loads with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    legacy = np.random.get_state(legacy=True)  # the default; a dict only for a non-MT19937 global generator
    assert isinstance(legacy, tuple)
    kind, keys, pos, has_gauss, cached = legacy
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tp_rng is not None:
        state["tp_region"] = tp_rng.state.clone()
    return state


def set_rng_state(state: dict, tp_rng=None) -> None:
    """Restore :func:`rng_state` (or the tuples checkpoints held before it stored tensors)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]) if isinstance(py, dict) else py)
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tp_rng is not None and "tp_region" in state:
        tp_rng.state = state["tp_region"].clone()


def read_latest(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag or None


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); ``latest`` is untouched."""


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0], device=device), op="max").item())


def _why(error: BaseException, where: Path) -> str:
    """One line for a failed write; torch.save reports ENOSPC as an iostream error, so ask the disk."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "No space left on device (ENOSPC)"
    try:
        if shutil.disk_usage(where).free < 1 << 20:
            return "No space left on device (ENOSPC)"
    except OSError:
        pass
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return f"{type(error).__name__}: {text}"


def check_free_space(ckpt_dir: Path, step: int, device: torch.device | str = "cpu", measure: bool = True) -> None:
    """Refuse (on every rank alike) a save that the last checkpoint's size says cannot fit; one
    rank (``measure``) walks the shared checkpoint folder, the others only agree."""
    latest = read_latest(ckpt_dir)
    needed = _tree_bytes(ckpt_dir / latest) if measure and latest and (ckpt_dir / latest).is_dir() else 0
    free = shutil.disk_usage(ckpt_dir).free
    if _any_rank(needed > 0 and free < 1.05 * needed, device):
        raise CheckpointWriteError(
            f"not enough space for the step-{step} checkpoint in {ckpt_dir}: {free / 1e9:.2f} GB free, the last one "
            f"({latest}) took {needed / 1e9:.2f} GB; nothing written, latest stays {latest}")


def save_checkpoint(tr, ckpt_dir: Path, step: int, keep_last: int, run_info: dict) -> Path:
    """Write ``step``'s checkpoint atomically (collective: every rank calls it). On a failed write
    (disk full, ...) every rank raises :class:`CheckpointWriteError`, the partial tag is removed and
    ``latest`` still names the previous complete checkpoint."""
    tag = tag_for(step)
    final, tmp = ckpt_dir / tag, ckpt_dir / f"{tag}.tmp"
    rank0 = tr.dims.rank == 0
    if rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
    barrier()
    check_free_space(ckpt_dir, step, tr.device, measure=rank0)
    native = tr.cfg.train.checkpoint_format == "native"

    def write_own() -> dict:
        state = {"rng": rng_state(tr.tp_rng), "step": step}
        written = {}
        if native:
            tr.backend.save_native(ckpt_dir, tmp.name, step)
            state["teacher"] = tr.teacher.state_dict()
        else:
            written.update(write_shards(tmp, tr.dims.rank, pieces(tr)))
        name = rank_file(tr.dims.tp_rank, tr.dims.dp_rank)
        written[name] = save_checked(state, tmp / name)
        return written

    files = _merged(_collectively(tr, ckpt_dir, tmp, write_own))
    if native:  # DeepSpeed wrote its own files: each rank checksums a share of them
        files = _merged(_collectively(tr, ckpt_dir, tmp, lambda: _checksum_share(tmp, files, tr.dims)), files)

    def describe() -> dict:
        if rank0:
            counters = {**tr.backend.counters(), "teacher_updates": tr.teacher.num_updates}
            info = {**run_info, "step": step, "state": counters, "files": files}
            write_text(tmp / RUN_FILE, json.dumps(info, indent=1))  # last: complete when its listed files match
        return {}

    _collectively(tr, ckpt_dir, tmp, describe)
    _crash_point("before_fsync", step)
    _fsync_tree(tmp)
    barrier()
    if rank0:
        _crash_point("before_rename", step)
        if final.exists():  # the same step saved before (a resumed run ending where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last, tag)
    barrier()
    return final


def _collectively(tr, ckpt_dir: Path, tmp: Path, write) -> list[dict]:
    """Run this rank's part of a save; every rank's results, or (on every rank alike, when any
    rank failed) :class:`CheckpointWriteError` with the partial tag removed."""
    failure: BaseException | None = None
    result: dict = {}
    try:
        result = write()
    except (OSError, RuntimeError) as e:
        failure = e
    if _any_rank(failure is not None, tr.device):
        reason = _why(failure, ckpt_dir) if failure is not None else "another rank failed to write its part"
        barrier()
        if tr.dims.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {tmp}: {reason}; removed the partial checkpoint, "
                                   f"latest stays {read_latest(ckpt_dir)}")
    return gather_objects(result)


def _merged(parts: list[dict], base: dict | None = None) -> dict:
    """One ``{file: [bytes, crc32]}`` listing from every rank's part (keys relative to the tag)."""
    out = dict(base or {})
    for part in parts:
        out.update({name: list(record) for name, record in part.items()})
    return out


def _checksum_share(tmp: Path, known: dict, dims) -> dict:
    """Checksums of this rank's share of the tag's files nobody checksummed while writing them."""
    others = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()
                    and str(p.relative_to(tmp)) not in known and not is_temporary(p))
    return {name: checksum_file(tmp / name) for name in others[dims.rank :: dims.world_size]}


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    write_text(ckpt_dir / LATEST, tag + "\n")


def _prune(ckpt_dir: Path, keep_last: int, latest: str) -> None:
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                   and not p.name.endswith(".tmp")), key=step_of)
    for name in tags[:-keep_last] if keep_last > 0 else []:
        if name != latest:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)
    for p in ckpt_dir.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def pieces(tr) -> list[Piece]:
    """This rank's model, AdamW and teacher state as layout-free pieces (a weight replicated over
    TP is written by TP rank 0 only)."""
    out = []

    def add(kind: str, name: str, start: int, stop: int, data: torch.Tensor) -> None:
        shape, tp = tr.params[name]
        if stop > start and (tp is not None or tr.dims.tp_rank == 0):
            out.append(Piece(f"{kind}/{name}", tp.full_shape() if tp else shape, tp, start, stop, data))

    for name, start, stop, values in tr.backend.state_ranges():
        for kind, data in values.items():
            add(kind, name, start, stop, data)
    for name, start, stop, data in tr.teacher.ranges():
        add("teacher", name, start, stop, data)
    return out


def same_layout(info: dict, layout: dict) -> bool:
    return info.get("layout") == layout


def load_checkpoint(tr, tag_dir: Path, layout: dict | None = None) -> int:
    """Restore weights, optimizer, schedule, teacher and (same layout only) RNG states; returns the step.

    A layout-free checkpoint is read into whatever layout ``tr`` runs; a native DeepSpeed one
    only into the layout that wrote it (checked before the launch, :func:`d2v2scale.train.run.check_resume`)."""
    info = read_run_info(tag_dir)
    files = info.get("files", {})  # verified at the start; each file's size is checked again before it is opened
    if has_shards(tag_dir):
        reader = ShardReader(tag_dir, files)

        def read(kind: str, name: str, start: int, stop: int) -> torch.Tensor:
            return reader.read(f"{kind}/{name}", tr.params[name][1], start, stop).to(tr.device)

        tr.backend.load_state(read, info["state"])
        tr.teacher.load_ranges(lambda name, start, stop: read("teacher", name, start, stop), info["state"]["teacher_updates"])
        step = int(info["step"])
    else:
        native_files = sorted(tag_dir.rglob("*.pt"))
        for path in native_files:
            check_size(tag_dir, path.relative_to(tag_dir).as_posix(), files)
        scan(native_files)  # DeepSpeed unpickles its files without checking them
        step = tr.backend.load_native(tag_dir)
    rank_path = tag_dir / rank_file(tr.dims.tp_rank, tr.dims.dp_rank)
    if not has_shards(tag_dir) or layout is None or same_layout(info, layout):
        check_size(tag_dir, rank_path.name, files)
        state = safe_load(rank_path)
        if "teacher" in state:
            tr.teacher.load_state_dict(state["teacher"])
        set_rng_state(state["rng"], tr.tp_rng)
    return step
