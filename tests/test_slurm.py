"""The sbatch scripts on a real single-node Slurm: tiny CPU runs complete; pre-emption checkpoints,
requeues and resumes; DRY_RUN prints the plan; shellcheck is clean."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import missing_dependency

from d2v2scale.runfiles import read_metrics

from slurm_cluster import LocalSlurm, ensure_packages

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_packages()
    if reason:
        missing_dependency(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _env(preset, run_dir, extra, **more):
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PRESET": preset,
           "DS_CONFIG": "ds_configs/cpu_tiny.json", "RUN_DIR": str(run_dir), "TP": "1", "SCALE_BATCH": "none",
           "EXTRA": extra}
    env.update(more)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    return env


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else "(no log)"


@pytest.mark.parametrize("script,preset", [("slurm/vit_h.sbatch", "tiny_image"),
                                           ("slurm/libri_light_large.sbatch", "tiny_audio")])
def test_sbatch_tiny_run_completes(slurm, tmp_path, script, preset):
    """Submitted as a user would from a fresh clone: the scripts' own #SBATCH --output=logs/%x-%j.out
    (no override), which needs logs/ to exist before the job starts (the repository ships it)."""
    run_dir = tmp_path / "run"
    job = slurm.submit(script, *TINY,
                       env=_env(preset, run_dir, "train.max_updates=6 train.log_every=2 train.save_every=3 "
                                                 "train.allow_long_warmup=true"), cwd=ROOT)
    name = next(line.split("=", 1)[1].strip() for line in (ROOT / script).read_text().splitlines()
                if line.startswith("#SBATCH --job-name="))
    out = ROOT / "logs" / f"{name}-{job}.out"
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert info["JobState"] == "COMPLETED", _log(out)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert "effective global batch" in _log(out) and "data-parallel 2" in _log(out)
    out.unlink()


def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    job = slurm.submit("slurm/vit_h.sbatch", *TINY, f"--output={out}",
                       env=_env("tiny_image", run_dir, "train.max_updates=120 train.log_every=1 train.save_every=1000"),
                       cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 5:
            break
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), _log(out)
        time.sleep(0.3)
    assert slurm.run("scancel", "--signal=USR1", "--batch", str(job)).returncode == 0
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    log = _log(out)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) == 1, log
    assert "requeueing job" in log and "resumed from" in log and "restart 1" in log
    preempt_step = int(next(line for line in log.splitlines() if "checkpoint at step" in line)
                       .split("checkpoint at step ")[1].split()[0])
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps[-1] == 120 and sorted(set(steps)) == list(range(1, 121))  # no step lost
    assert steps.index(preempt_step + 1) == preempt_step  # the resumed run continued right after it


@pytest.mark.parametrize("script", ["vit_h.sbatch", "libri_light_large.sbatch"])
def test_dry_run_plans_every_node_count(script):
    """With only NODES set, the planner chooses the layout: each count from 8 to 64 nodes plans,
    prints the choice, its memory and predicted step time, and the launcher's batch math agrees."""
    for nodes in (8, 16, 32, 48, 64):
        env = {k: v for k, v in os.environ.items() if k not in ("TP", "SCALE_BATCH", "AUTO_PLAN", "EXTRA")}
        env.update(DRY_RUN="1", NODES=str(nodes), PYTHON=sys.executable)
        out = subprocess.run(["bash", f"slurm/{script}"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (nodes, out.stderr[-2000:])
        chosen = next(line for line in out.stderr.splitlines() if "chosen #1" in line)
        tp = int(chosen.split("tp=")[1].split(",")[0])
        assert "s/step" in out.stderr and "GB per GPU" in out.stderr
        assert f"on {nodes * 8} × a100-40gb" in out.stdout and f"tp={tp}," in out.stdout and "fits" in out.stdout
        assert f"parallel.tp={tp}" in out.stdout.splitlines()[-1] and "srun " in out.stdout


def test_dry_run_with_a_pinned_layout_is_not_replanned():
    env = dict(os.environ, DRY_RUN="1", NODES="64", TP="1", SCALE_BATCH="none", PYTHON=sys.executable)
    bad = subprocess.run(["bash", "slurm/vit_h.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "batch math" in bad.stderr and "chosen" not in bad.stderr
    env.update(SCALE_BATCH="linear")
    scaled = subprocess.run(["bash", "slurm/vit_h.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert scaled.returncode == 0 and "linear rule" in scaled.stdout


def test_shellcheck():
    if not shutil.which("shellcheck"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "shellcheck"],
                       capture_output=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not shutil.which("shellcheck"):
        missing_dependency("shellcheck is not installed and could not be installed")
    proc = subprocess.run(["shellcheck", "-x", "slurm/vit_h.sbatch", "slurm/libri_light_large.sbatch", "slurm/common.sh"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
