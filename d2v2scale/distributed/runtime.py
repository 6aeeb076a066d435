"""Start torch.distributed on GPU (NCCL) or CPU (gloo); a backend may wrap the group afterwards."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from .dims import LaunchEnv, ParallelDims


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(tp: int, timeout_s: float | None = None) -> tuple[ParallelDims, torch.device]:
    """Initialise the default process group and the TP/DP groups; a plain process becomes rank 0 of 1.
    ``timeout_s`` bounds every collective (and the rendezvous); None keeps torch's default."""
    env = LaunchEnv.detect()
    if env.world_size > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT", "0") != "0"):
        raise RuntimeError("a multi-process launch needs MASTER_ADDR and MASTER_PORT (torchrun and DeepSpeed's "
                           "launcher set them; under srun export them from the job script)")
    env.export(master_port=int(os.environ.get("MASTER_PORT", 0)) or free_port())
    device = pick_device(env.local_rank)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    dims = ParallelDims(tp=tp, world_size=env.world_size, rank=env.rank)
    dims.build_groups()
    return dims, device


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over ``group`` (default: every rank); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def barrier() -> None:
    """Every rank waits here for the others (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (a picklable value; itself in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def shutdown() -> None:
    """Leave together: rank 0 hosts the rendezvous store, and a peer still talking to it when
    rank 0 exits can abort, turning a finished run into a failed one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
