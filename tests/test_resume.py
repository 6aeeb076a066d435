"""Exact resume after kill -9, atomic checkpoints, pre-emption signals, non-finite steps."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2v2scale.config import ConfigError, config_from_dict
from d2v2scale.train.checkpoint import read_run_info
from d2v2scale.runfiles import read_metrics
from d2v2scale.train.run import check_resume

from test_deepspeed_training import ROOT, _env, _launch, _port, _torchrun

pytestmark = pytest.mark.slow

LAUNCH = ["launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json"]
STEPS = 10


def _args(preset, run_dir, *extra):
    return [*LAUNCH, "--preset", preset, "--run_dir", str(run_dir), f"train.max_updates={STEPS}", "train.allow_long_warmup=true",
            "train.log_every=1", "train.save_every=2", *extra]


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return rows[-1]["step"] if rows else 0


def _run_until_killed(prefix, args, run_dir: Path, kill_at: int) -> None:
    """Start a run and SIGKILL the launcher and every worker once it has logged step ``kill_at``.
    (torchrun starts its workers in process groups of their own: killing the launcher's group
    alone would leave them running to the end, and the "resume" would resume nothing.)"""
    import psutil

    proc = subprocess.Popen([*prefix, *args], cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and _last_step(run_dir) < kill_at and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before step {kill_at}"
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def _by_step(run_dir: Path) -> dict:
    """The last record of every step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, preset):
    """fp32 on CPU with one thread per rank is deterministic, and everything a step consumes —
    weights, optimizer and scheduler state, teacher masters, RNG streams, data position — is
    restored; so the resumed loss sequence must equal the uninterrupted one exactly."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _launch(_torchrun(2), *_args(preset, ref_dir))
    ref = _by_step(ref_dir)
    for kill_at in (3, 7):  # killed twice: the second attempt resumed, and is itself resumed
        _run_until_killed(_torchrun(2), _args(preset, run_dir, "--resume", "auto"), run_dir, kill_at)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    resumed_at = int(latest.split("_")[-1])
    assert 0 < resumed_at < STEPS
    final = _launch(_torchrun(2), *_args(preset, run_dir, "--resume", "auto"))
    # it really resumed (a --resume that silently restarted would also reach step 10)...
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {resumed_at}" in final.stdout
    # ...and no step was logged twice: the rows the killed attempts wrote past their checkpoints were dropped
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    got = _by_step(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        for key in ("loss", "loss_reg", "loss_cls", "grad_norm", "lr", "ema_decay", "target_var"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def test_sigterm_checkpoints_and_exits_3_within_one_step(tmp_path):
    """Two ranks launched like srun launches them; only rank 0 gets the signal (they arrive at
    different times on a cluster): both agree, checkpoint the step in progress, and exit 3."""
    run_dir = tmp_path / "run"
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *_args("tiny_image", run_dir, "train.max_updates=200")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    while _last_step(run_dir) < 3:
        assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
        time.sleep(0.02)
    signalled_after = _last_step(run_dir)
    procs[0].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outputs[0][-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.split("_")[-1])
    # The step in progress when the flag is agreed: the logged step itself if the signal lands between
    # its metrics line and the agreement, else the next one; +1 because the poll above can lag a step.
    assert signalled_after <= saved <= signalled_after + 2
    assert _last_step(run_dir) == saved
    assert "requeue" in outputs[0]


def test_crash_while_writing_a_checkpoint_leaves_latest_loadable(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([*_torchrun(2), *_args("tiny_image", run_dir, "train.max_updates=6")], cwd=ROOT,
                          env=dict(_env(), D2V2SCALE_TEST_CRASH="before_rename:4"), capture_output=True, text=True)
    assert proc.returncode != 0
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / "step_00000004.tmp").is_dir() and not (ckpt / "step_00000004").exists()
    _launch(_torchrun(2), *_args("tiny_image", run_dir, "train.max_updates=6", "--resume", "auto"))
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert not list(ckpt.glob("*.tmp"))
    assert _last_step(run_dir) == 6


def _weights_finite(tag_dir: Path) -> bool:
    from d2v2scale.weights import read_weights

    _, student, teacher = read_weights(str(tag_dir))
    return all(torch.isfinite(v).all() for v in (*student.values(), *teacher.values()) if v.is_floating_point())


def test_injected_nan_skips_the_update(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(_env(), D2V2SCALE_TEST_NAN_STEPS="3")
    proc = subprocess.run([sys.executable, *_args("tiny_image", run_dir, "train.max_updates=6")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_step(run_dir)
    assert [rows[s]["skipped_updates"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert rows[3]["loss"] == "nan" and isinstance(rows[4]["loss"], float)
    assert _weights_finite(run_dir / "checkpoints" / "step_00000006")


@pytest.mark.parametrize("stage", [0, 1])
def test_a_non_finite_later_micro_batch_is_skipped_at_every_stage(tmp_path, stage):
    """Step 3's second micro-batch (of 2) is NaN: its first one was finite, so the loop's pre-backward
    check passes and the NaN reaches the gradients. DeepSpeed's ZeRO-0 fp32 path has no overflow
    check of its own; the step must still be skipped, with no EMA update and finite weights."""
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds["zero_optimization"], ds["train_micro_batch_size_per_gpu"] = {"stage": stage}, 16  # 2 micro-batches
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    env = dict(_env(), D2V2SCALE_TEST_NAN_STEPS="3:1")
    args = ["launchers/pretrain.py", "--ds_config", str(tmp_path / "ds.json"), "--preset", "tiny_image",
            "--run_dir", str(run_dir), "train.max_updates=6", "train.allow_long_warmup=true", "train.log_every=1",
            "train.save_every=6"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _by_step(run_dir)
    assert [rows[s]["skipped_updates"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(isinstance(rows[s]["loss"], float) for s in (4, 5, 6))
    assert _weights_finite(run_dir / "checkpoints" / "step_00000006")


def test_too_many_non_finite_steps_stop_with_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(_env(), D2V2SCALE_TEST_NAN_STEPS="3,4,5,6,7,8")
    proc = subprocess.run([sys.executable, *_args("tiny_image", run_dir, "train.max_updates=10",
                                                  "train.max_consecutive_skips=3")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    # steps 3, 4, 5 skipped → stop after step 5; the step-4 checkpoint holds the (unchanged) step-2 weights
    assert "3 consecutive steps" in proc.stderr and "Last good checkpoint: step_00000004" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert _weights_finite(ckpt / "step_00000004")


def test_resume_config_checks(tmp_path):
    run_dir = tmp_path / "run"
    _launch([sys.executable], *_args("tiny_text", run_dir, "train.max_updates=4"))
    bad = subprocess.run([sys.executable, *_args("tiny_text", run_dir, "train.max_updates=6", "model.depth=4",
                                                 "model.average_top_k_layers=3", "--resume", "auto")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "model.depth" in bad.stderr and "Traceback" not in bad.stderr
    tag = run_dir / "checkpoints" / "step_00000004"
    info = read_run_info(tag)
    for key, value in (("compile", True), ("activation_checkpointing", 1), ("kernels", "torch")):
        cfg = config_from_dict(info["config"])  # how the same math runs may change (found on a GPU run)
        setattr(cfg.model, key, value)
        assert check_resume(tag, cfg, info["ds_config"], info["layout"]) is None
    _launch([sys.executable], *_args("tiny_text", run_dir, "train.max_updates=6", "model.activation_checkpointing=1",
                                     "--resume", "auto"))
    # a checkpoint from before model.cls_loss_reference_micro_batch weighted its CLS loss by the
    # micro-batch it ran with: that value continues it, another one is a change of objective
    old = {**info, "config": {**info["config"], "model": {**info["config"]["model"], "cls_loss": 0.01}},
           "ds_config": {**info["ds_config"], "train_micro_batch_size_per_gpu": 4}}
    old["config"]["model"].pop("cls_loss_reference_micro_batch")
    tag = tmp_path / "before_the_key"
    tag.mkdir()
    (tag / "run.json").write_text(json.dumps(old))  # all check_resume reads on the same layout
    cfg = config_from_dict(info["config"])
    cfg.model.cls_loss, cfg.model.cls_loss_reference_micro_batch = 0.01, 4
    assert check_resume(tag, cfg, info["ds_config"], info["layout"]) is None
    cfg.model.cls_loss_reference_micro_batch = None
    with pytest.raises(ConfigError, match="model.cls_loss_reference_micro_batch was 4 in the checkpoint, is None now"):
        check_resume(tag, cfg, info["ds_config"], info["layout"])
    assert _last_step(run_dir) == 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
