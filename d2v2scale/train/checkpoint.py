"""Checkpoints: the DeepSpeed engine state plus every rank's EMA-teacher shard and the step.

Layout: ``RUN/checkpoints/<tag>/`` (DeepSpeed's files + ``teacher_rank{R}.pt``) and
``RUN/checkpoints/latest`` naming the newest tag.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..teacher import EMATeacher


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, teacher: EMATeacher, ckpt_dir: Path, step: int, rank: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    torch.save(teacher.state_dict(), ckpt_dir / tag / f"teacher_rank{rank:05d}.pt")
    _barrier()
    return ckpt_dir / tag


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_checkpoint(engine, teacher: EMATeacher, ckpt_dir: Path, tag: str, rank: int) -> int:
    """Restore engine and teacher from ``tag``; returns the step the checkpoint was taken after."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {ckpt_dir}")
    teacher.load_state_dict(torch.load(ckpt_dir / tag / f"teacher_rank{rank:05d}.pt", weights_only=True))
    return int(client["step"])
