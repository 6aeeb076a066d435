"""The pieces of a self-healing run, each against a hand-made case: the supervisor's decisions, the
goodput accounting, Slurm's duration format, the hang watchdog (its bounds, a real firing, a
stopped sibling's stacks) and the supervisor's loop around a stand-in for srun."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from d2v2scale.exit_codes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED
from d2v2scale.resilience import policy
from d2v2scale.resilience.events import read_events, write_event
from d2v2scale.resilience.goodput import account
from d2v2scale.resilience.slurm import parse_duration
from d2v2scale.resilience.watchdog import AUTO_FLOOR_S, Watchdog, collective_timeout_s, read_heartbeat

ROOT = Path(__file__).resolve().parents[1]
KILLED = ["srun: error: vm: task 1: Killed\n", "srun: error: vm: task 0: Terminated\n"]


def _decide(rc, failure=None, previous=None, restarts=0, cancelled=False, unhealthy=()):
    return policy.decide(rc, cancelled=cancelled, failure=failure, previous=previous, restarts_so_far=restarts,
                         max_restarts=3, backoff_s=10, unhealthy=list(unhealthy))


def test_srun_reports_name_the_rank_node_and_signal_of_the_first_failure():
    f = policy.classify(143, KILLED, last_step=14, errors=[])
    assert (f.kind, f.rank, f.node, f.signal, f.step) == ("killed", 1, "vm", "SIGKILL", 15)
    own = [{"time": 2.0, "rank": 0, "cause": "RuntimeError: Connection reset by peer"},
           {"time": 1.0, "rank": 1, "cause": "RuntimeError: injected"}]
    f = policy.classify(1, ["srun: error: vm: task 1: Exited with exit code 1\n"], last_step=7, errors=own)
    assert (f.kind, f.rank, f.step) == ("crash", 1, 8) and f.cause == "rank 1: RuntimeError: injected"
    assert policy.classify(EXIT_HUNG, [], last_step=3, errors=[]).kind == "hang"


def test_each_exit_code_gets_its_action():
    crash = policy.Failure(1, "crash", 8, cause="rank 1: boom")
    assert _decide(EXIT_OK).action == "finish"
    bad = _decide(EXIT_BAD_INPUT)
    assert (bad.action, bad.exit_code) == ("stop", EXIT_BAD_INPUT)
    assert _decide(EXIT_PREEMPTED).action == "requeue"
    assert _decide(EXIT_PREEMPTED, cancelled=True).action == "cancelled"  # a user's scancel is never requeued
    first = _decide(1, crash)
    assert (first.action, first.backoff_s) == ("restart", 10)
    assert _decide(1, crash, restarts=2).backoff_s == 40  # doubles per restart of the job
    same = _decide(1, crash, previous={"step": 8, "kind": "crash"}, restarts=1)
    assert (same.action, same.exit_code) == ("stop", EXIT_ERROR) and "deterministic" in same.why and "step 8" in same.why
    assert _decide(1, crash, previous={"step": 7, "kind": "crash"}, restarts=1).action == "restart"
    spent = _decide(1, crash, restarts=3)
    assert spent.action == "stop" and "budget exhausted" in spent.why and "step 8" in spent.why
    node = _decide(137, crash, unhealthy=["gpu07"])
    assert (node.action, node.exclude) == ("requeue", ["gpu07"])


def test_slurm_durations():
    assert parse_duration("4:56") == 296
    assert parse_duration("1:00:00") == 3600
    assert parse_duration("2-03:04:05") == 2 * 86400 + 3 * 3600 + 4 * 60 + 5
    assert parse_duration("UNLIMITED") is None and parse_duration("") is None


def _events(tmp_path, rows):
    for kind, t, fields in rows:
        write_event(tmp_path, kind, time=t, **fields)
    return read_events(tmp_path)


def test_goodput_accounts_for_every_second_of_a_run_with_a_crash(tmp_path):
    """Hand-made timeline: attempt 1 starts at 100, trains from 110 to 150 (40 steps, one 2-s
    checkpoint at step 20), dies after step 40 (progress at 150); attempt 2 launches at 160, trains
    from 170 to 225 (steps 20..70, one 5-s checkpoint) and finishes."""
    events = _events(tmp_path, [
        ("job_start", 100.0, {"job": "1"}), ("launch", 100.0, {"attempt": 1}),
        ("attempt", 108.0, {"start_step": 0}), ("train_start", 110.0, {"step": 0}),
        ("checkpoint", 132.0, {"step": 20, "seconds": 2.0}),
        ("failure", 155.0, {"kind": "killed", "step": 41, "cause": "rank 1 killed", "action": "restart",
                            "last_progress": [40, 150.0]}),
        ("launch", 160.0, {"attempt": 2}), ("attempt", 168.0, {"start_step": 20}),
        ("resume", 168.5, {"from_step": 20, "reached_step": 40, "recomputed": 20}),
        ("train_start", 170.0, {"step": 20}), ("checkpoint", 225.0, {"step": 70, "seconds": 5.0}),
        ("finished", 225.0, {"step": 70})])
    g = account(events)
    # attempt 1: 40 s loop - 2 s checkpoint = 38 s for 40 steps; 20 of them redone: 19 s lost
    assert g.wall_s == pytest.approx(125.0)
    assert g.lost_s["startup"] == pytest.approx(10 + 10)
    assert g.lost_s["checkpoint"] == pytest.approx(7.0)
    assert g.lost_s["recomputed"] == pytest.approx(19.0)
    assert g.lost_s["restart"] == pytest.approx(10.0)  # last progress 150 -> next launch 160
    assert g.productive_s == pytest.approx(19.0 + 50.0)
    assert g.productive_s + sum(g.lost_s.values()) == pytest.approx(g.wall_s)
    assert g.goodput == pytest.approx(69.0 / 125.0)
    (incident,) = g.incidents
    assert incident["downtime_s"] == pytest.approx(20.0) and incident["recomputed_steps"] == 20


def test_goodput_counts_a_hang_and_the_gap_between_jobs(tmp_path):
    events = _events(tmp_path, [
        ("job_start", 0.0, {}), ("launch", 0.0, {}), ("attempt", 5.0, {"start_step": 0}),
        ("train_start", 5.0, {"step": 0}),
        ("failure", 45.0, {"kind": "hang", "step": 11, "action": "restart", "last_progress": [10, 15.0]}),
        ("launch", 46.0, {}), ("attempt", 50.0, {"start_step": 10}), ("train_start", 50.0, {"step": 10}),
        ("checkpoint", 60.0, {"step": 20, "seconds": 0.0}), ("requeue", 61.0, {}),
        ("job_start", 100.0, {}), ("launch", 100.0, {}), ("attempt", 104.0, {"start_step": 20}),
        ("train_start", 104.0, {"step": 20}), ("finished", 114.0, {"step": 30})])
    g = account(events)
    assert g.lost_s["hang"] == pytest.approx(30.0)  # progress at 15, the watchdog decided at 45
    assert g.lost_s["restart"] == pytest.approx(1.0)
    assert g.lost_s["between_jobs"] == pytest.approx(39.0)  # requeued at 61, the next job started at 100
    assert g.productive_s + sum(g.lost_s.values()) == pytest.approx(g.wall_s)


def test_watchdog_bounds_follow_the_section_and_the_measured_steps(tmp_path):
    w = Watchdog(tmp_path, 0, "a", None, 900.0, heartbeat=True)
    try:
        assert w.bound() == 900.0  # start-up
        w.beat(1)
        w.slowest = 50.0
        assert w.bound() == 500.0  # 10 x the slowest step
        w.slowest = 1.0
        assert w.bound() == AUTO_FLOOR_S
        with w.section("checkpoint"):
            assert w.bound() == 900.0
        assert read_heartbeat(tmp_path)[0] == 1
        w.beat(2)
        assert read_heartbeat(tmp_path)[0] == 2
    finally:
        w.close()
    assert Watchdog(tmp_path, 1, "a", 20.0, 60.0, heartbeat=False).bound() == 60.0
    assert collective_timeout_s(20.0, 60.0) > 60.0 and collective_timeout_s(None, 1800.0) > 1800.0


HUNG = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from d2v2scale.resilience.watchdog import Watchdog
    rank = int(sys.argv[2])
    w = Watchdog(Path(sys.argv[1]), rank, "att", 1.0, 5.0, heartbeat=rank == 0, poll_s=0.1)
    w.start()
    w.beat(7)
    def stuck_in_a_collective():
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)  # what a stuck rank looks like to the others
        time.sleep(60)
    stuck_in_a_collective()
""")


def test_a_hang_writes_every_ranks_stacks_and_exits_with_its_code(tmp_path):
    """Two sibling processes: rank 0 blocks, rank 1 stops itself. Rank 0's watchdog fires, writes
    its stacks, has the stopped sibling dump its own, and exits with EXIT_HUNG."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG.format(root=str(ROOT)))
    stopped = subprocess.Popen([sys.executable, str(script), str(tmp_path), "1"])
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{stopped.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.05)
    t0 = time.time()
    hung = subprocess.run([sys.executable, str(script), str(tmp_path), "0"], timeout=60)
    assert hung.returncode == EXIT_HUNG
    assert time.time() - t0 < 20  # 1 s bound + start-up, not the 60-s sleep
    folder = tmp_path / "incidents" / "att"
    mine, theirs = (folder / "rank_0.txt").read_text(), (folder / "rank_1.txt").read_text()
    assert "no step finished" in mine and "last finished step 7" in mine and "stuck_in_a_collective" in mine
    assert "stopped (state T)" in theirs and "stuck_in_a_collective" in theirs  # the stopped rank's own frame
    (hang,) = [e for e in read_events(tmp_path) if e["event"] == "hang"]
    assert hang["step"] == 7 and hang["rank"] == 0
    stopped.kill()
    stopped.wait()


FAKE_SRUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    run, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    n = len(list(run.glob("launch_*")))
    (run / f"launch_{{n}}").touch()
    rc, step = plan[min(n, len(plan) - 1)]
    (run / "heartbeat").write_text(f"{{step}} {{time.time()}}")
    if rc:
        print(f"srun: error: vm: task 1: Exited with exit code {{rc}}", file=sys.stderr)
    sys.exit(rc)
""")


@pytest.mark.parametrize("plan,expect_rc,launches,words", [
    ([[1, 5], [0, 9]], EXIT_OK, 2, "training finished"),
    ([[2, 0]], EXIT_BAD_INPUT, 1, "never retried"),
    ([[1, 5], [1, 5]], EXIT_ERROR, 2, "deterministic failure: crash at step 6"),
    ([[1, 5], [1, 6], [1, 7]], EXIT_ERROR, 2, "restart budget exhausted: 1 restarts"),
    ([[4, 5], [0, 9]], EXIT_OK, 2, "hang"),
])
def test_the_supervisor_loop_restarts_stops_and_says_why(tmp_path, plan, expect_rc, launches, words):
    """The supervisor around a stand-in for srun that fails as planned (exit code, last step)."""
    fake = tmp_path / "srun.py"
    fake.write_text(FAKE_SRUN.format())
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "d2v2scale.resilience.supervisor", "--run_dir", str(run),
                           "--max_restarts", "1", "--backoff_s", "0.1", "--", sys.executable, str(fake), str(run),
                           json.dumps(plan)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    assert len(list(run.glob("launch_*"))) == launches
    assert words in proc.stdout, proc.stdout
    failures = [e for e in read_events(run) if e["event"] == "failure"]
    assert len(failures) == sum(1 for rc, _ in plan[:launches] if rc not in (0, 2))


def test_a_cancel_during_the_backoff_stops_without_another_launch(tmp_path):
    fake = tmp_path / "srun.py"
    fake.write_text(FAKE_SRUN.format())
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen([sys.executable, "-m", "d2v2scale.resilience.supervisor", "--run_dir", str(run),
                             "--backoff_s", "30", "--", sys.executable, str(fake), str(run), "[[1, 5]]"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(e["event"] == "failure" for e in read_events(run)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK and "stop signal during the backoff (TERM)" in out, out
    assert len(list(run.glob("launch_*"))) == 1
    assert [e["event"] for e in read_events(run)][-1] == "failure"  # nothing launched or requeued after it


def test_a_run_directory_trained_by_another_running_job_is_refused(tmp_path):
    """Two jobs must never train one run directory side by side: the second refuses in one line
    (exit 2) while the first is running, and takes the directory over once it is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    state = tmp_path / "state"
    squeue.write_text(f"#!/bin/sh\ncat {state}\n")
    squeue.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.id").write_text("41\n")
    fake = tmp_path / "srun.py"
    fake.write_text(FAKE_SRUN.format())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="42")
    command = [sys.executable, "-m", "d2v2scale.resilience.supervisor", "--run_dir", str(run), "--", sys.executable,
               str(fake), str(run), "[[0, 3]]"]
    state.write_text("RUNNING\n")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_BAD_INPUT and "is being trained by running job 41" in proc.stdout, proc.stdout
    assert not list(run.glob("launch_*"))
    state.write_text("")  # job 41 is gone
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert (run / "job.id").read_text().strip() == "42"


def test_a_fresh_start_says_so_and_names_older_run_directories_of_the_preset(tmp_path):
    """``--resume auto`` without a checkpoint: one line saying the run starts at step 0, and a
    warning for a sibling directory of the same preset that holds checkpoints (e.g. one named after
    a job id, as run directories once were); one of another preset is not named."""
    from test_hardening import _main

    runs = tmp_path / "runs"
    for name, preset in (("d2v2-tiny_image-1234", "tiny_image"), ("d2v2-tiny_audio-99", "tiny_audio")):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "latest").write_text("step_00000030\n")
        (runs / name / "config.yaml").write_text(f"preset: {preset}\n")
    code, out, err = _main("--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image", "--run_dir",
                           str(runs / "d2v2-tiny_image"), "--resume", "auto", "--dry_run")
    assert code == 0, err
    assert f"starting at step 0: no checkpoint under {runs / 'd2v2-tiny_image' / 'checkpoints'}" in out
    warned = [line for line in out.splitlines() if "holds a tiny_image run" in line]
    assert len(warned) == 1 and "d2v2-tiny_image-1234" in warned[0] and "step_00000030" in warned[0]
    assert "d2v2-tiny_audio-99" not in out
