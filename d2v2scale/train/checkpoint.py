"""Atomic checkpoints with everything an exact resume needs, in a layout-free format by default.

Layout::

    RUN/checkpoints/<tag>/shards/rank_<R>.pt   this rank's pieces of the weights, AdamW moments and
                                               EMA teacher, located in the full tensors (layout-free:
                                               any world size, ZeRO stage, TP degree or backend reads
                                               them, see :mod:`d2v2scale.train.shards`)
                         rank_tp{T}_dp{D}.pt   this rank's RNG states (+ its teacher shard in the
                                               native format)
                         run.json              step, layout, resolved config, optimizer/schedule
                                               counters (rank 0)
    RUN/checkpoints/latest                     the newest complete tag

``train.checkpoint_format=native`` writes the backend's own format (DeepSpeed's ``save_checkpoint``) instead of
``shards/`` (resumable on the same layout only).

Everything is written into ``<tag>.tmp/``, every rank fsyncs, a barrier, then rank 0 renames the
directory and replaces ``latest`` through a temporary file. A crash at any point leaves the
previous ``latest`` pointing at a complete checkpoint; stale ``*.tmp`` directories are removed by
the next save. The last ``train.keep_last`` tags are kept, and never the one ``latest`` names.

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

from ..distributed.runtime import all_reduce, barrier
from .shards import Piece, ShardReader, has_shards, write_shards

LATEST = "latest"
RUN_FILE = "run.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def rank_file(tp_rank: int, dp_rank: int) -> str:
    return f"rank_tp{tp_rank:02d}_dp{dp_rank:05d}.pt"


def _fsync_tree(path: Path) -> None:
    """fsync every finished file (other ranks may be renaming their ``.part`` files meanwhile)."""
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".part")):
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_point(name: str, step: int) -> None:
    """Test hook: ``D2V2SCALE_TEST_CRASH=<point>:<step>`` ends this process abruptly (like kill -9)
    at that point of that step's save."""
    if os.environ.get("D2V2SCALE_TEST_CRASH") == f"{name}:{step}":
        os._exit(137)


def rng_state(tp_rng=None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tp_rng is not None:
        state["tp_region"] = tp_rng.state.clone()
    return state


def set_rng_state(state: dict, tp_rng=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def read_run_info(tag_dir: Path) -> dict:
    return json.loads((tag_dir / RUN_FILE).read_text())


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
    failure: BaseException | None = None
    native = tr.cfg.train.checkpoint_format == "native"
    try:
        state = {"rng": rng_state(tr.tp_rng), "step": step}
        if native:
            tr.backend.save_native(ckpt_dir, tmp.name, step)
            state["teacher"] = tr.teacher.state_dict()
        else:
            write_shards(tmp, tr.dims.rank, pieces(tr))
        part = tmp / (rank_file(tr.dims.tp_rank, tr.dims.dp_rank) + ".part")
        torch.save(state, part)
        os.replace(part, tmp / rank_file(tr.dims.tp_rank, tr.dims.dp_rank))
        if rank0:
            counters = {**tr.backend.scalars(), "teacher_updates": tr.teacher.num_updates}
            (tmp / RUN_FILE).write_text(json.dumps({**run_info, "step": step, "state": counters}, indent=1))
    except (OSError, RuntimeError) as e:
        failure = e
    if _any_rank(failure is not None, tr.device):
        reason = _why(failure, ckpt_dir) if failure is not None else "another rank failed to write its part"
        barrier()
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {tmp}: {reason}; removed the partial checkpoint, "
                                   f"latest stays {read_latest(ckpt_dir)}")
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


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    part = ckpt_dir / f"{LATEST}.part"
    with open(part, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)


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
    if has_shards(tag_dir):
        reader = ShardReader(tag_dir)

        def read(kind: str, name: str, start: int, stop: int) -> torch.Tensor:
            return reader.read(f"{kind}/{name}", tr.params[name][1], start, stop).to(tr.device)

        tr.backend.load_state(read, info["state"])
        tr.teacher.load_ranges(lambda name, start, stop: read("teacher", name, start, stop), info["state"]["teacher_updates"])
        step = int(info["step"])
    else:
        step = tr.backend.load_native(tag_dir)
    rank_path = tag_dir / rank_file(tr.dims.tp_rank, tr.dims.dp_rank)
    if not has_shards(tag_dir) or layout is None or same_layout(info, layout):
        # Our own per-rank file; weights_only=False only because numpy's RNG state is not a tensor.
        state = torch.load(rank_path, weights_only=False)
        if "teacher" in state:
            tr.teacher.load_state_dict(state["teacher"])
        set_rng_state(state["rng"], tr.tp_rng)
    return step
