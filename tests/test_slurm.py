"""The sbatch scripts on a real single-node Slurm: tiny CPU runs complete; pre-emption checkpoints,
requeues and resumes; a killed rank and a hung rank each cost one restart in the allocation; a
cancel stops and the same command continues; bad input, a deterministic failure and a spent budget
stop with one line; DRY_RUN prints the plan; shellcheck is clean."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import missing_dependency
from data_fixtures import make_jpegs

from d2v2scale.data.index import load_index
from d2v2scale.prepare import main as prepare_main
from d2v2scale.resilience.events import read_events
from d2v2scale.resilience.watchdog import collective_timeout_s
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
    (no override), which needs logs/ to exist before the job starts (the repository ships it). The
    image run trains on a prepared index with STAGE_DATA=1: the job trains on the node-local copy."""
    run_dir = tmp_path / "run"
    extra = "train.max_updates=6 train.log_every=2 train.save_every=3 train.allow_long_warmup=true"
    more = {}
    if preset == "tiny_image":
        make_jpegs(tmp_path / "shared" / "imgs", 40)
        index = tmp_path / "shared" / "imgs.d2v2index"
        assert prepare_main(["images", str(tmp_path / "shared" / "imgs"), str(index)]) == 0
        more = {"STAGE_DATA": "1", "STAGE_DIR": str(tmp_path / "node_local"), "DATA_PATH": str(index)}
        extra += " data.kind=images"
    job = slurm.submit(script, *TINY, env=_env(preset, run_dir, extra, **more), cwd=ROOT)
    name = next(line.split("=", 1)[1].strip() for line in (ROOT / script).read_text().splitlines()
                if line.startswith("#SBATCH --job-name="))
    out = ROOT / "logs" / f"{name}-{job}.out"
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert info["JobState"] == "COMPLETED", _log(out)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert "effective global batch" in _log(out) and "data-parallel 2" in _log(out)
    if more:
        staged = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"])
        assert staged.parent == tmp_path / "node_local" and "stage: 40 files" in _log(out), _log(out)
        assert Path(load_index(staged).root).parent == tmp_path / "node_local"  # the copy, not the shared folder
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
    assert "requeued job" in log and "resumed from" in log and "restart 1" in log
    preempt_step = int(next(line for line in log.splitlines() if "checkpoint at step" in line)
                       .split("checkpoint at step ")[1].split()[0])
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps[-1] == 120 and sorted(set(steps)) == list(range(1, 121))  # no step lost
    assert steps.index(preempt_step + 1) == preempt_step  # the resumed run continued right after it


def _rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []


def _until(what: str, check, slurm, job: int, out: Path, timeout: float = 240, poll: float = 0.1):
    """Poll ``check()`` until it returns something truthy; fail (with the job log) when the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), f"{what}: job {state}\n{_log(out)}"
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}\n{_log(out)}")


def _reached(run_dir: Path, step: int):
    return lambda: (rows := _rows(run_dir)) and rows[-1]["step"] >= step


def _rank_pid(job: int, rank: int) -> int | None:
    """The training process of ``rank`` in ``job`` (found by its environment)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            cmd = (entry / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if "launchers/pretrain.py" in cmd and env.get("SLURM_JOB_ID") == str(job) and \
                env.get("SLURM_PROCID") == str(rank) and "srun" not in cmd.split("\0")[0]:
            return int(entry.name)
    return None


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == kind]


def test_a_killed_rank_and_a_hung_rank_each_cost_one_restart(slurm, tmp_path):
    """SIGKILL rank 1 mid-run (a lost GPU), then SIGSTOP it in the next attempt (a hung collective):
    the job restarts twice in the allocation and finishes by itself; each failure is in events.jsonl
    with its rank, step and signal; the hang leaves every rank's stacks; the report's goodput
    accounts for the kill's downtime as measured from outside."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    save_every, hang_s, setup_s = 10, 10, 60
    extra = (f"train.max_updates=60 train.log_every=1 train.save_every={save_every} train.hang_timeout_s={hang_s} "
             f"train.setup_timeout_s={setup_s}")
    job = slurm.submit("slurm/vit_h.sbatch", *TINY, f"--output={out}",
                       env=_env("tiny_image", run_dir, extra, RESTART_BACKOFF_S="1"), cwd=ROOT)
    _until("step 15", _reached(run_dir, 15), slurm, job, out)
    pid = _rank_pid(job, 1)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    (resume,) = _until("the resume", lambda: _events(run_dir, "resume"), slurm, job, out)
    first = resume["from_step"] + 1
    _until(f"step {first} after the resume", lambda: (rows := _rows(run_dir)) and rows[-1]["step"] == first,
           slurm, job, out, poll=0.02)
    t_first = time.time()
    _until("12 steps more", _reached(run_dir, first + 12), slurm, job, out)
    t_stop = time.time()
    os.kill(_rank_pid(job, 1), signal.SIGSTOP)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 0, log  # restarted in the allocation
    killed, hung = _events(run_dir, "failure")
    assert (killed["kind"], killed["rank"], killed["signal"], killed["action"]) == ("killed", 1, "SIGKILL", "restart")
    assert killed["step"] >= 16 and resume["recomputed"] <= save_every
    assert (hung["kind"], hung["action"]) == ("hang", "restart")
    assert hung["time"] - t_stop <= hang_s + collective_timeout_s(hang_s, setup_s)
    assert "rank 1 on" in log and "killed by SIGKILL" in log and "hang:" in log
    (folder,) = list((run_dir / "incidents").iterdir())
    stacks = {p.name: p.read_text() for p in folder.glob("rank_*.txt")}
    assert set(stacks) == {"rank_0.txt", "rank_1.txt"}, stacks.keys()
    assert all("train/engine.py" in text and " in train" in text for text in stacks.values())  # the stuck frame
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps == list(range(1, 61))  # nothing lost, nothing twice
    proc = subprocess.run([sys.executable, "-m", "d2v2scale.report", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    goodput = json.loads((run_dir / "report" / "report.json").read_text())["goodput"]
    assert 0 < goodput["goodput"] < 1 and goodput["attempts"] == 3
    down = goodput["incidents"][0]["downtime_s"]
    assert down == pytest.approx(t_first - t_kill, rel=0.1), (down, t_first - t_kill)  # as seen from outside
    assert goodput["lost_s"]["hang"] >= hang_s
    assert "## Goodput" in (run_dir / "report" / "report.md").read_text()


def test_a_cancel_stops_and_the_same_command_continues(slurm, tmp_path):
    """scancel mid-run: the ranks checkpoint, the job is not requeued; the same sbatch command (no
    RUN_DIR: the default follows the job name) resumes from that checkpoint."""
    name = f"d2v2-test-cancel-{os.getpid()}"
    run_dir = ROOT / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    env = _env("tiny_image", run_dir, "train.max_updates=40 train.log_every=1 train.save_every=5")
    del env["RUN_DIR"]
    command = ["slurm/vit_h.sbatch", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
               "--time=00:05:00", f"--job-name={name}"]
    try:
        out = tmp_path / "first.out"
        job = slurm.submit(*command, f"--output={out}", env=env, cwd=ROOT)
        _until("step 12", _reached(run_dir, 12), slurm, job, out)
        assert slurm.run("scancel", str(job)).returncode == 0
        slurm.wait(job, ("CANCELLED",), timeout=60)
        time.sleep(3)
        info = slurm.job(job)
        assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, _log(out)  # a cancel cancels
        last_before = _rows(run_dir)[-1]["step"]
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert int(latest.split("_")[1]) >= last_before - 5, (latest, last_before)
        left, lead = map(int, re.search(r"time limit in (\d+) s: .* checkpoint (\d+) s before it", _log(out)).groups())
        assert 240 < left <= 300 and lead == round(left / 5) and "scaled to a fifth of the limit" in _log(out)
        out2 = tmp_path / "second.out"
        job2 = slurm.submit(*command, f"--output={out2}", env=env, cwd=ROOT)
        info = slurm.wait(job2, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
        log = _log(out2)
        assert info["JobState"] == "COMPLETED", log
        assert f"resumed from runs/{name}/checkpoints/{latest}" in log, log
        assert _rows(run_dir)[-1]["step"] == 40
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_node_slurm_reports_unhealthy_is_left_out_of_the_requeue(slurm, tmp_path):
    """A rank dies while Slurm has the node draining (a node going bad): the job is requeued with
    the node in its ExcNodeList instead of restarting on it."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = slurm.submit("slurm/vit_h.sbatch", *TINY, f"--output={out}",
                       env=_env("tiny_image", run_dir, "train.max_updates=200 train.log_every=1 train.save_every=5"),
                       cwd=ROOT)
    try:
        _until("step 6", _reached(run_dir, 6), slurm, job, out)
        assert slurm.run("scontrol", "update", f"NodeName={slurm.host}", "State=DRAIN", "Reason=test").returncode == 0
        os.kill(_rank_pid(job, 1), signal.SIGKILL)
        # The job is PENDING (held) before the supervisor has set ExcNodeList: read it once the
        # supervisor says the requeue is done (hold, update, release); the job passes through
        # requeue states meanwhile, so only the log is polled.
        deadline = time.time() + 60
        while f"requeued job {job} without {slurm.host}" not in _log(out):
            assert time.time() < deadline, f"no requeue line within 60 s\n{_log(out)}"
            time.sleep(0.1)
        info = slurm.wait(job, ("PENDING",), timeout=60)
        assert info["ExcNodeList"] == slurm.host and int(info["Restarts"]) == 1, _log(out)
        (failure,) = _events(run_dir, "failure")
        assert failure["action"] == "requeue" and "unhealthy" in failure["why"]
    finally:
        slurm.run("scancel", str(job))
        slurm.run("scontrol", "update", f"NodeName={slurm.host}", "State=RESUME")


@pytest.mark.parametrize("case", ["bad_key", "bad_batch", "deterministic", "budget"])
def test_failures_that_must_not_loop_stop_with_one_line(slurm, tmp_path, case):
    """A wrong key is refused by every node's check before anything launches; a batch that does not
    split over the job's ranks by the training step itself (exit 2: never retried); a failure at
    the same step twice, or a third failure with MAX_RESTARTS=1, stops the job: one line each."""
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    extra = "train.max_updates=30 train.log_every=1 train.save_every=4"
    more = {"RESTART_BACKOFF_S": "1"}
    if case == "bad_key":
        extra += " train.no_such_key=1"
    elif case == "bad_batch":
        extra += " train.global_batch=33"
    elif case == "deterministic":
        more["D2V2SCALE_TEST_FAIL"] = "1:6"  # rank 1 fails in step 6, every attempt
    else:
        more.update(D2V2SCALE_TEST_FAIL="1:+5", MAX_RESTARTS="1")  # a new step each attempt (past a checkpoint)
    job = slurm.submit("slurm/vit_h.sbatch", *TINY, f"--output={out}", env=_env("tiny_image", run_dir, extra, **more),
                       cwd=ROOT)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    log = _log(out)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0, log
    lines = [line for line in log.splitlines() if "[supervisor] training step exited" in line]
    launches = _events(run_dir, "launch")
    if case.startswith("bad_"):
        assert "Traceback" not in log  # bad input is one line; a crash (below) keeps its traceback
    if case == "bad_key":
        assert info["ExitCode"] == "2:0" and not launches and "nothing launched" in log, log
        assert sum("train.no_such_key" in line for line in log.splitlines()) == 1, log  # one node, one line
    elif case == "bad_batch":
        assert info["ExitCode"] == "2:0" and len(launches) == 1 and len(lines) == 1, log
        assert "never retried" in lines[0] and sum("global_batch" in line for line in log.splitlines()) == 1, log
    elif case == "deterministic":
        assert len(launches) == 2 and "deterministic failure: crash at step 6 again" in lines[-1], log
        assert "injected failure at step 6" in lines[-1]
    else:
        failures = _events(run_dir, "failure")
        assert len(launches) == 2 and [f["step"] for f in failures] == [5, 9], failures
        assert "restart budget exhausted: 1 restarts in this job (MAX_RESTARTS=1)" in lines[-1], log


@pytest.mark.parametrize("script", ["vit_h.sbatch", "libri_light_large.sbatch"])
def test_dry_run_plans_every_node_count(script):
    """With only NODES set, the planner chooses the layout: each count from 8 to 64 nodes plans,
    prints the choice, its memory and predicted step time, and the launcher's batch math agrees."""
    procs = {}
    for nodes in (8, 16, 32, 48, 64):  # side by side: each is a few single-threaded Python start-ups
        env = {k: v for k, v in os.environ.items() if k not in ("TP", "SCALE_BATCH", "AUTO_PLAN", "EXTRA")}
        env.update(DRY_RUN="1", NODES=str(nodes), PYTHON=sys.executable)
        procs[nodes] = subprocess.Popen(["bash", f"slurm/{script}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    for nodes, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
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
