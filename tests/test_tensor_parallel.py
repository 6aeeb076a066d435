"""Tensor parallelism and the sharded EMA teacher, against unsharded references (CPU, gloo)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from d2v2scale.runfiles import read_metrics
from d2v2scale.train.shards import ShardReader

from test_deepspeed_training import _launch, _port, _torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    _launch(_torchrun(2), "tests/dist/tp_checks.py", str(out))
    return json.loads(out.read_text())


def test_mappings_match_arithmetic(tp_results):
    for rank in tp_results:
        assert all(v == 0.0 for v in rank["mappings"].values()), rank["mappings"]


def test_dropout_streams(tp_results):
    """Inside sharded regions each TP rank draws its own dropout masks; outside them (and after a
    forward with dropout everywhere) the ranks stay in lockstep, so replicated activations agree."""
    a, b = tp_results[0]["rng"], tp_results[1]["rng"]
    assert a["outside_before"] == b["outside_before"] and a["outside_after"] == b["outside_after"]
    assert a["inside"] != b["inside"]
    assert a["dropout_block_out"] == b["dropout_block_out"]


def test_activation_checkpointing_replays_tp_dropout(tp_results):
    """Recomputing a TP block in backward draws the same dropout masks, inside and outside the
    sharded regions, so output and gradients are bit-identical to the un-checkpointed block."""
    for rank in tp_results:
        assert rank["checkpoint_replay"] == {"out": 0.0, "dx": 0.0, "fc1_grad": 0.0}, rank["checkpoint_replay"]


def test_tp2_block_equals_unsharded_block(tp_results):
    # fp32, two partial sums added by an all-reduce instead of one matmul: ~1 ulp of O(1) values
    for rank in tp_results:
        b = rank["block"]
        assert b["block_out"] < 1e-5 and b["block_ffn"] < 1e-5 and b["block_dx"] < 1e-5
        assert b["block_grads"] < 1e-5


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio"])
def test_tp2_training_step_equals_unsharded(tp_results, preset):
    for rank in tp_results:
        r = rank[preset]
        assert r["loss"] < 1e-6  # relative
        assert r["grads"] < 1e-5  # every gradient, compared shard by shard with the full one
        # AdamW normalises each update by sqrt(v): for near-zero gradients fp32 round-off can move
        # an update by a fraction of lr (1e-3); 1e-4 (lr/10) after 3 steps still catches a wrong shard.
        assert r["params_after_3"] < 1e-4
        assert r["teacher_after_3"] < 1e-6


def test_tp2_dp2_deepspeed_launcher_matches_tp1(tmp_path):
    """TP=2 × DP=2 on 4 processes (deepspeed launcher, ZeRO-1 and ZeRO-2) reproduces the TP=1 × DP=1
    loss and clipped-grad-norm sequence with the same global batch and micro-batch (1e-5 relative:
    see test_zero_stages_match_single_process)."""
    common = ["--preset", "tiny_image", "train.max_updates=6", "train.allow_long_warmup=true", "train.log_every=1", "train.save_every=6",
              "model.mask_noise_std=0"]
    ref_dir = tmp_path / "ref"
    _launch([sys.executable], "launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny_zero1_mb16.json",
            "--run_dir", str(ref_dir), *common)
    ref = read_metrics(ref_dir / "metrics.jsonl")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    for stage in (1, 2):
        run_dir = tmp_path / f"tp2_zero{stage}"
        proc = _launch([deepspeed, "--num_gpus", "4", "--master_port", str(_port())], "launchers/pretrain.py",
                       "--ds_config", f"ds_configs/cpu_tiny_zero{stage}_mb16.json", "--run_dir", str(run_dir),
                       *common, "parallel.tp=2")
        assert "data-parallel 2" in proc.stdout
        rows = read_metrics(run_dir / "metrics.jsonl")
        assert [r["step"] for r in rows] == [r["step"] for r in ref]
        for got, want in zip(rows, ref):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        files = {p.name for p in (run_dir / "checkpoints" / "step_00000006").iterdir()}
        assert {f"rank_tp{t:02d}_dp{d:05d}.pt" for t in range(2) for d in range(2)} <= files
        # The layout-free shards of TP=2 × DP=2, put together, are the TP=1 run's full tensors: every
        # TP slice (qkv's interleaved q/k/v rows, row-parallel columns) lands where the full weight has it.
        got, want = ShardReader(run_dir / "checkpoints" / "step_00000006"), ShardReader(ref_dir / "checkpoints" / "step_00000006")
        assert got.keys() == want.keys() and any(".qkv." in k for k in got.keys())
        for key in sorted(want.keys()):
            assert torch.allclose(got.full(key), want.full(key), rtol=0, atol=1e-4), key  # lr·1e-1: see test above
