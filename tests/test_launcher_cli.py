"""Bad input on the launcher's command line: exit code 2, one line naming the key, no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "launchers/pretrain.py", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_config_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BASE = ["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image"]


@pytest.mark.parametrize(
    "args,needles",
    [
        (BASE + ["model.foo=1"], ["model.foo", "embed_dim"]),
        (BASE + ["train.max_updates=ten"], ["train.max_updates", "int"]),
        (["--ds_config", "ds_configs/cpu_tiny.json", "--preset", "vit_z"], ["vit_z", "vit_b", "tiny_image"]),
        (["--ds_config", "ds_configs/nope.json", "--preset", "tiny_image"], ["nope.json"]),
        (BASE + ["masking.mask_prob=1.5"], ["masking.mask_prob", "0 < mask_prob < 1"]),
        (BASE + ["parallel.tp=3"], ["parallel.tp", "1, 2, 4"]),
        (BASE + ["train.global_batch=30", "model.clone_batch=0"], ["model.clone_batch", ">= 1"]),
        (["--preset", "tiny_image"], ["--ds_config"]),
        (BASE + ["--resume", "step_00000042"], ["--resume", "auto"]),
        (BASE + ["data.kind=imagenet"], ["data.kind", "digits"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needles):
    _assert_config_error(_run(*args), *needles)


def test_batch_math_that_does_not_add_up(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 5
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    proc = _run("--ds_config", str(tmp_path / "ds.json"), "--preset", "tiny_image")
    _assert_config_error(proc, "batch math", "train.global_batch=32", "micro-batch 5")
    ds["train_batch_size"] = 64
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    _assert_config_error(_run("--ds_config", str(tmp_path / "ds.json"), "--preset", "tiny_image"), "train_batch_size=64")


def test_invalid_ds_json(tmp_path):
    (tmp_path / "bad.json").write_text("{ not json")
    _assert_config_error(_run("--ds_config", str(tmp_path / "bad.json"), "--preset", "tiny_image"), "not valid JSON")


def test_tp_misconfiguration_names_both_values(tmp_path):
    env_world = {"WORLD_SIZE": "2", "RANK": "0"}
    proc = _run_env(env_world, *BASE, "parallel.tp=4")
    _assert_config_error(proc, "parallel.tp=4", "2")
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["zero_optimization"] = {"stage": 3}
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    proc = _run_env({"WORLD_SIZE": "4", "RANK": "0"}, "--ds_config", str(tmp_path / "z3.json"), "--preset",
                    "tiny_image", "parallel.tp=2")
    _assert_config_error(proc, "parallel.tp=2", "zero_optimization.stage=3")
    proc = _run(*BASE, "parallel.tp=3")
    _assert_config_error(proc, "parallel.tp=3", "model.num_heads=4")


def _run_env(extra, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    return subprocess.run([sys.executable, "launchers/pretrain.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
