"""Runs written before a change keep working after it. ``fixtures/run_4fe8ae5`` is a run directory
written by commit 4fe8ae5 (before the package's rooms were rearranged: planner, run files, teacher,
batch math, TP plan): a 4-step tiny_image run, cut to its step-2 checkpoint and the first two
``metrics.jsonl`` rows; ``reference_metrics.jsonl`` holds all four rows of the uninterrupted run."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from d2v2scale.runfiles import read_metrics
from test_deepspeed_training import _launch

FIXTURE = Path(__file__).parent / "fixtures" / "run_4fe8ae5"
ARGS = ["launchers/pretrain.py", "--preset", "tiny_image", "--ds_config", "ds_configs/cpu_tiny.json",
        "train.global_batch=8", "train.max_updates=4", "train.save_every=2", "train.log_every=1",
        "train.allow_long_warmup=true", "model.mask_noise_std=0", "model.embed_dim=16", "model.num_heads=2",
        "model.depth=2", "model.average_top_k_layers=2", "decoder.dim=16", "decoder.groups=4", "decoder.layers=1"]


@pytest.mark.slow
def test_a_run_written_before_the_rearrangement_resumes_where_it_stopped(tmp_path):
    """Today's code resumes the old checkpoint (same config keys, same run.json) and logs steps 3-4
    with the losses the old code logged (1e-6: one process, fp32, the same arithmetic)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    proc = _launch([sys.executable], *ARGS, "--run_dir", str(run), "--resume", "auto")
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in proc.stdout
    want = {r["step"]: r for r in read_metrics(FIXTURE / "reference_metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "loss_reg", "loss_cls", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6), (step, key)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12)
