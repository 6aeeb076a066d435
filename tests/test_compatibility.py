"""Runs written before a change keep working after it. Each ``fixtures/run_<sha>`` is a run directory
written by commit <sha>: a 4-step tiny_image run (the arguments below), cut to its step-2 checkpoint
and the first two ``metrics.jsonl`` rows; ``reference_metrics.jsonl`` holds all four rows of the
uninterrupted run. ``run_4fe8ae5`` predates the rearrangement of the package's rooms (planner, run
files, teacher, batch math, TP plan); ``run_05f6c52`` predates the typed modality keys (issue #36)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from d2v2scale.config import config_from_dict
from d2v2scale.runfiles import read_metrics
from test_deepspeed_training import _launch

FIXTURES = [Path(__file__).parent / "fixtures" / name for name in ("run_4fe8ae5", "run_05f6c52")]
ARGS = ["launchers/pretrain.py", "--preset", "tiny_image", "--ds_config", "ds_configs/cpu_tiny.json",
        "train.global_batch=8", "train.max_updates=4", "train.save_every=2", "train.log_every=1",
        "train.allow_long_warmup=true", "model.mask_noise_std=0", "model.embed_dim=16", "model.num_heads=2",
        "model.depth=2", "model.average_top_k_layers=2", "decoder.dim=16", "decoder.groups=4", "decoder.layers=1"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_an_old_config_loads_and_writes_back_the_same_keys(fixture):
    """config.yaml (one modality's keys) and run.json (every modality's) load with today's checks,
    and every key they hold is written back with its value; keys added since take their defaults."""
    saved = yaml.safe_load((fixture / "config.yaml").read_text())
    info = json.loads((fixture / "checkpoints" / "step_00000002" / "run.json").read_text())
    for old, now in ((saved, config_from_dict(saved).run_dict()), (info["config"], config_from_dict(info["config"]).to_dict())):
        for section, value in old.items():
            if isinstance(value, dict):
                assert {k: now[section][k] for k in value} == value, section
            else:
                assert now[section] == value, section


def test_todays_config_yaml_is_written_line_for_line_as_before():
    """What today's code writes for the newest fixture's config keeps every line of that
    config.yaml in its order (flat ``section: key: value``); a new line is a key added since."""
    old = (FIXTURES[-1] / "config.yaml").read_text().splitlines()
    saved = yaml.safe_load("\n".join(old))
    now = yaml.safe_dump(config_from_dict(saved).run_dict(), sort_keys=False).splitlines()
    lines = iter(now)
    assert all(line in lines for line in old), "a line of the old config.yaml is missing or moved"
    added = [line for line in now if line not in old]
    assert all(line.startswith("  ") for line in added), added  # keys added since, each in its section


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_an_older_run_resumes_where_it_stopped(tmp_path, fixture):
    """Today's code resumes the old checkpoint (same config keys, same run.json) and logs steps 3-4
    with the losses the old code logged (1e-6: one process, fp32, the same arithmetic)."""
    run = tmp_path / "run"
    shutil.copytree(fixture, run)
    proc = _launch([sys.executable], *ARGS, "--run_dir", str(run), "--resume", "auto")
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in proc.stdout
    want = {r["step"]: r for r in read_metrics(fixture / "reference_metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "loss_reg", "loss_cls", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6), (step, key)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12)
