"""Rank bookkeeping: launch environment, TP × DP layout, and which samples each rank reads."""
import pytest
import torch

from d2v2scale.data.schedule import RankSchedule, epoch_indices
from d2v2scale.distributed.dims import LaunchEnv, ParallelDims
from d2v2scale.train.backend.deepspeed import DeepSpeedMPU


def test_launch_env_sources():
    assert LaunchEnv.detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == LaunchEnv(3, 1, 8)
    slurm = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert LaunchEnv.detect(slurm) == LaunchEnv(9, 1, 16)
    assert LaunchEnv.detect({}) == LaunchEnv(0, 0, 1)
    # torchrun's variables win over the Slurm ones when both exist (torchrun inside an allocation)
    assert LaunchEnv.detect({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).world_size == 2


def test_tp_fastest_layout():
    layout = [ParallelDims(tp=2, world_size=8, rank=r) for r in range(8)]
    assert [(d.tp_rank, d.dp_rank) for d in layout] == [(r % 2, r // 2) for r in range(8)]
    d = layout[5]
    assert d.tp_ranks(d.dp_rank) == [4, 5] and d.dp_ranks(d.tp_rank) == [1, 3, 5, 7]
    assert d.dp == 4 and DeepSpeedMPU(d).get_data_parallel_world_size() == 4 and DeepSpeedMPU(d).get_model_parallel_world_size() == 2
    assert not hasattr(DeepSpeedMPU(d), "initialize_sequence_parallel")  # would make DeepSpeed drop the DP group


def test_tp_must_divide_world():
    with pytest.raises(ValueError, match="parallel.tp=3 must divide the world size 8; allowed values: 1, 2, 4, 8"):
        ParallelDims(tp=3, world_size=8, rank=0)


def test_schedule_covers_each_global_batch_once_and_tp_ranks_agree():
    g, micro, dp = 32, 4, 4
    gas = g // (micro * dp)
    per_rank = {r: RankSchedule(g, micro, gas, r, dp) for r in range(dp)}
    for step in (0, 7):
        seen = torch.cat([torch.cat(s.positions(step)) for s in per_rank.values()])
        assert sorted(seen.tolist()) == list(range(step * g, (step + 1) * g))
    # two TP ranks of one DP rank build the same schedule object → the same samples
    assert per_rank[1].positions(3)[0].tolist() == RankSchedule(g, micro, gas, 1, dp).positions(3)[0].tolist()


def test_epoch_permutations():
    idx = epoch_indices(torch.arange(0, 30), 10, seed=1)
    for e in range(3):
        assert sorted(idx[e * 10 : (e + 1) * 10].tolist()) == list(range(10))
    assert idx[:10].tolist() != idx[10:20].tolist()
