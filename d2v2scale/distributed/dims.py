"""ParallelDims: who this process is, and the tensor-parallel × data-parallel process groups.

Rank and world size come from the environment the launcher set: torchrun and DeepSpeed's
launcher export ``RANK/LOCAL_RANK/WORLD_SIZE``; under ``srun`` only ``SLURM_PROCID``,
``SLURM_LOCALID`` and ``SLURM_NTASKS`` exist; a plain ``python`` process is rank 0 of 1.
Ranks are laid out TP-fastest (consecutive ranks form a TP group, as in Megatron), so a TP
group sits inside one node. Groups are created once, here; everything else asks this object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int

    @staticmethod
    def detect(environ: dict[str, str] | None = None) -> "LaunchEnv":
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
        return LaunchEnv(0, 0, 1)

    def export(self, master_addr: str = "127.0.0.1", master_port: int = 29500) -> None:
        """Make the torch.distributed env:// variables agree with this launch (srun, plain python)."""
        os.environ["RANK"] = str(self.rank)
        os.environ["LOCAL_RANK"] = str(self.local_rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)
        os.environ.setdefault("MASTER_ADDR", master_addr)
        os.environ.setdefault("MASTER_PORT", str(master_port))


@dataclass
class ParallelDims:
    """tp × dp == world. ``tp_group``/``dp_group`` exist after :meth:`build_groups`."""

    tp: int
    world_size: int
    rank: int
    tp_group: object = field(default=None, repr=False)
    dp_group: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world_size % self.tp != 0:
            raise ValueError(
                f"parallel.tp={self.tp} must divide the world size {self.world_size}; "
                f"allowed values: {', '.join(str(k) for k in range(1, self.world_size + 1) if self.world_size % k == 0)}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def tp_ranks(self, dp_rank: int) -> list[int]:
        return [dp_rank * self.tp + t for t in range(self.tp)]

    def dp_ranks(self, tp_rank: int) -> list[int]:
        return [d * self.tp + tp_rank for d in range(self.dp)]

    def build_groups(self) -> None:
        """Create every TP and DP group (all ranks must call this, in the same order)."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        for d in range(self.dp):
            group = dist.new_group(self.tp_ranks(d))
            if d == self.dp_rank:
                self.tp_group = group
        for t in range(self.tp):
            group = dist.new_group(self.dp_ranks(t))
            if t == self.tp_rank:
                self.dp_group = group
