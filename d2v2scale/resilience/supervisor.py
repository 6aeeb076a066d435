"""The job supervisor: runs the training step (``srun ... pretrain.py``) inside a Slurm job and
decides, when it ends, whether the job is done, restarts it, requeues or stops — with no person.

    python -m d2v2scale.resilience.supervisor --run_dir RUN [--max_restarts 3] [--backoff_s 30]
        [--signal_lead_s 600] -- srun --kill-on-bad-exit=1 ... launchers/pretrain.py ... --resume auto

The sbatch scripts ``exec`` it, so it is the batch shell: Slurm's signals reach it.

- SIGUSR1 (the time limit is near, from its own timer, or ``scancel --signal=USR1 --batch``): the
  ranks are asked to checkpoint (they exit 3), then the job requeues itself.
- SIGTERM (``scancel``, or Slurm ending the job): the ranks are asked to checkpoint, and the job
  is **not** requeued: a user's cancel stops the run; pre-emption with ``PreemptMode=REQUEUE``
  is requeued by Slurm itself. Submitting the same command again continues the run.
- The time-limit warning is its own timer, not ``--signal``: the lead (``--signal_lead_s``) is
  scaled down to a fifth of a short limit, so a short test job is not signalled before it starts.
- A failed step (a crash, a killed rank, a hang) is decided by :mod:`.policy`: restart in the
  allocation after a backoff, requeue without unhealthy nodes, or stop (bad input, a
  deterministic failure, the restart budget spent), always with one line that says which and why.

Everything it sees and does goes to ``RUN/events.jsonl`` (:mod:`.events`); a finished run's
goodput is printed from it (:mod:`.goodput`). Exit codes: 0 finished, requeued or cancelled;
2 bad input (the training step's, or a run directory another running job holds); 1 stopped on a
failure.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..atomic import write_text
from ..cli import OneLineParser
from ..exit_codes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED
from ..runfiles import JOB as JOB_FILE
from ..runfiles import PREEMPTED as PREEMPTED_MARKER
from . import policy, slurm
from .events import read_events, write_event
from .goodput import account
from .watchdog import read_heartbeat


def say(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [supervisor] {line}", flush=True)


def effective_rc(srun_rc: int, lines: list[str]) -> int:
    """The exit code of the task that failed first: srun's own code is that of the tasks it ended
    (143) once ``--kill-on-bad-exit`` stops the step."""
    for _node, _task, what in policy.task_reports(lines):
        if what.startswith("Exited with exit code "):
            return int(what.rsplit(" ", 1)[1])
        sig = policy.signal_name(what)
        if sig:
            return 128 + signal.Signals[sig].value
    return srun_rc


class Supervisor:
    """One Slurm job's loop: launch the training step, read how it ended, act (see the module's doc)."""

    def __init__(self, run_dir: Path, command: list[str], max_restarts: int, backoff_s: float, signal_lead_s: float):
        self.run_dir, self.command = run_dir, command
        self.max_restarts, self.backoff_s, self.signal_lead_s = max_restarts, backoff_s, signal_lead_s
        self.job, self.restart_count, self.nodelist = slurm.this_job()
        self.job = self.job or "local"
        self.proc: subprocess.Popen | None = None
        self.stop_requested: str | None = None  # "USR1" (checkpoint and requeue) or "TERM" (cancel)
        self.lines: list[str] = []
        self.leaving = False

    # signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        if self.leaving:  # Slurm ending the job this supervisor has just requeued
            return
        name = "USR1" if signum == signal.SIGUSR1 else "TERM"
        if self.stop_requested != "TERM":  # a cancel is not downgraded by a later USR1
            self.stop_requested = name
        say(f"received SIG{signal.Signals(signum).name[3:]}: asking the ranks to checkpoint"
            + ("" if name == "USR1" else " (the job will not requeue itself: a cancel stops the run; a pre-emption "
                                         "is requeued by Slurm)"))
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1 if name == "USR1" else signal.SIGTERM)

    def _lead_timer(self) -> None:
        """SIGUSR1 to this process ``lead`` seconds before the time limit (re-read before firing,
        so an extended limit moves it)."""
        left = slurm.time_left_s(self.job)
        if left is None:
            return
        lead = min(self.signal_lead_s, left / 5)
        say(f"time limit in {left:.0f} s: the ranks will be asked to checkpoint {lead:.0f} s before it "
            f"(SIGNAL_LEAD_S={self.signal_lead_s:.0f}{', scaled to a fifth of the limit' if lead < self.signal_lead_s else ''})")
        while True:
            time.sleep(max(1.0, left - lead))
            now = slurm.time_left_s(self.job)
            if now is not None and now > lead + 5:
                left = now
                continue
            os.kill(os.getpid(), signal.SIGUSR1)
            return

    # one training step -------------------------------------------------------------------------
    def _launch(self, attempt: int) -> tuple[int, float]:
        started = time.time()
        write_event(self.run_dir, "launch", job=self.job, attempt=attempt)
        env = dict(os.environ, D2V2SCALE_ATTEMPT=f"{self.job}-{self.restart_count}-{attempt}")
        self.lines = []
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, env=env, text=True, bufsize=1)
        reader = threading.Thread(target=self._echo, args=(self.proc.stderr,), daemon=True)
        reader.start()
        rc = self.proc.wait()
        reader.join(timeout=10)
        self.proc = None
        return effective_rc(rc, self.lines), started

    def _echo(self, stream) -> None:
        for line in stream:
            sys.stderr.write(line)
            if line.startswith("srun: "):
                self.lines.append(line)
        sys.stderr.flush()

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        refusal = self._claim_run_dir()
        if refusal:
            say(refusal)
            return EXIT_BAD_INPUT
        info = slurm.job_info(self.job) if self.job != "local" else {}
        write_event(self.run_dir, "job_start", job=self.job, restart=self.restart_count, nodes=self.nodelist,
                    queued_s=slurm.queued_s(info))
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._lead_timer, daemon=True).start()
        attempt = 0
        while True:
            attempt += 1
            rc, started = self._launch(attempt)
            marker = self.run_dir / PREEMPTED_MARKER
            if marker.exists():  # under srun a task's code can be lost to a second signal
                marker.unlink()
                rc = EXIT_PREEMPTED if rc != EXIT_OK else rc
            decision = self._decide(rc, started, attempt)
            say(f"training step exited with {rc}: {decision.why}")
            if decision.action == "restart":
                if self._wait(decision.backoff_s):
                    continue
                decision = policy.Decision("cancelled" if self.stop_requested == "TERM" else "requeue",
                                           f"stop signal during the backoff ({self.stop_requested})")
                say(decision.why)
            return self._finish(decision)

    def _decide(self, rc: int, started: float, attempt: int) -> policy.Decision:
        events = read_events(self.run_dir)
        failure = None
        if rc not in (EXIT_OK, EXIT_BAD_INPUT, EXIT_PREEMPTED):
            heartbeat = read_heartbeat(self.run_dir)
            errors = [e for e in events if e["event"] == "error" and e["time"] >= started]
            failure = policy.classify(rc, self.lines, heartbeat[0] if heartbeat else None, errors)
        failures = [e for e in events if e["event"] == "failure"]
        restarts = sum(1 for e in failures if e.get("job") == self.job and e.get("action") in ("restart", "requeue"))
        unhealthy = slurm.unhealthy_nodes(slurm.hostnames(self.nodelist)) if failure and self.nodelist else []
        decision = policy.decide(rc, cancelled=self.stop_requested == "TERM", failure=failure,
                                 previous=failures[-1] if failures else None, restarts_so_far=restarts,
                                 max_restarts=self.max_restarts, backoff_s=self.backoff_s, unhealthy=unhealthy)
        if failure is not None:
            heartbeat = read_heartbeat(self.run_dir)
            write_event(self.run_dir, "failure", job=self.job, attempt=attempt, rc=rc, kind=failure.kind,
                        rank=failure.rank, node=failure.node, signal=failure.signal, step=failure.step,
                        cause=failure.cause, action=decision.action, why=decision.why,
                        last_progress=list(heartbeat) if heartbeat else None)
        elif decision.action != "finish":
            write_event(self.run_dir, decision.action, job=self.job, rc=rc, why=decision.why)
        return decision

    def _wait(self, seconds: float) -> bool:
        """Sleep the backoff; False when a stop signal arrived meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.stop_requested is None:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.stop_requested is None

    def _finish(self, decision: policy.Decision) -> int:
        if decision.action == "finish":
            g = account(read_events(self.run_dir))
            if g is not None and g.goodput is not None:
                say(f"goodput {g.goodput:.1%} over {g.attempts} attempt(s) (python -m d2v2scale.report "
                    f"{self.run_dir} for the breakdown)")
        if decision.action == "requeue":
            self.leaving = True
            if slurm.requeue(self.job, decision.exclude):
                say(f"requeued job {self.job}" + (f" without {', '.join(decision.exclude)}" if decision.exclude else ""))
            else:
                say(f"could not requeue job {self.job}: resubmit the same command to continue")
                return EXIT_ERROR
        return decision.exit_code

    def _claim_run_dir(self) -> str | None:
        """One job trains a run directory at a time: refuse one held by another running job."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        holder_file = self.run_dir / JOB_FILE
        holder = holder_file.read_text().strip() if holder_file.is_file() else ""
        if holder and holder != self.job and self.job != "local" and slurm.job_state(holder) in ("RUNNING", "COMPLETING"):
            return (f"error: {self.run_dir} is being trained by running job {holder}; cancel it (scancel {holder}) "
                    "or give this job another RUN_DIR")
        write_text(holder_file, f"{self.job}\n")
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        print("supervisor: error: give the training command after --; see --help", file=sys.stderr)
        return EXIT_BAD_INPUT
    split = argv.index("--") if "--" in argv else len(argv)
    p = OneLineParser(prog="supervisor", description=__doc__.splitlines()[0],
                      epilog="example (what slurm/common.sh runs): python -m d2v2scale.resilience.supervisor "
                             "--run_dir runs/d2v2-vit_h -- srun --kill-on-bad-exit=1 ... launchers/pretrain.py ...")
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--max_restarts", type=int, default=int(os.environ.get("MAX_RESTARTS", 3)),
                   help="restarts of a failed step per job (MAX_RESTARTS, default 3)")
    p.add_argument("--backoff_s", type=float, default=float(os.environ.get("RESTART_BACKOFF_S", 30)),
                   help="wait before the first restart, doubled for each next one (RESTART_BACKOFF_S, default 30)")
    p.add_argument("--signal_lead_s", type=float, default=float(os.environ.get("SIGNAL_LEAD_S", 600)),
                   help="ask for a checkpoint this long before the time limit (SIGNAL_LEAD_S, default 600)")
    args: argparse.Namespace = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        print("supervisor: error: the training command after -- is empty", file=sys.stderr)
        return EXIT_BAD_INPUT
    return Supervisor(args.run_dir, command, args.max_restarts, args.backoff_s, args.signal_lead_s).run()


if __name__ == "__main__":
    sys.exit(main())
