"""What the job supervisor does when a training step ends: a pure function of what happened, so
every branch is tested without a cluster.

- 0: the run is done. 2: bad input: never retried.
- 3 (the ranks checkpointed on a signal): requeue, unless the job itself was cancelled (a user's
  ``scancel``: stop; resubmitting the same command continues the run).
- anything else is a failure (a crash, a killed rank, :data:`~d2v2scale.exit_codes.EXIT_HUNG`):
  restarted within ``max_restarts`` per job, in the allocation when its nodes are healthy, by a
  requeue that leaves out the unhealthy ones otherwise; but the same failure at the same step as
  the one before is deterministic and stops the job.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from ..exit_codes import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED

# "srun: error: node07: task 5: Killed" / "...: task 3: Exited with exit code 1"
_SRUN_TASK = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$")
MAX_BACKOFF_S = 600.0


@dataclass
class Failure:
    rc: int
    kind: str  # crash | killed | hang
    step: int | None  # the step in progress when it failed
    rank: int | None = None
    node: str | None = None
    signal: str | None = None
    cause: str = ""


@dataclass
class Decision:
    action: str  # finish | stop | restart | requeue | cancelled
    why: str
    exit_code: int = EXIT_OK
    backoff_s: float = 0.0
    exclude: list[str] = field(default_factory=list)


def task_reports(lines: list[str]) -> list[tuple[str, int, str]]:
    """(node, first task, what) of each srun task report, in the order srun printed them."""
    out = []
    for line in lines:
        m = _SRUN_TASK.search(line.strip())
        if m:
            out.append((m["node"], int(re.split(r"[,\-]", m["tasks"])[0]), m["what"].strip()))
    return out


def signal_name(text: str) -> str | None:
    """``Killed`` → SIGKILL, ``Segmentation fault`` → SIGSEGV, as srun words them."""
    words = {"killed": signal.SIGKILL, "terminated": signal.SIGTERM, "segmentation fault": signal.SIGSEGV,
             "aborted": signal.SIGABRT, "bus error": signal.SIGBUS}
    sig = words.get(text.lower().split(" (core dumped)")[0])
    return sig.name if sig else None


def classify(rc: int, srun_lines: list[str], last_step: int | None, errors: list[dict]) -> Failure:
    """What a failed training step was: the first task srun reports names the rank, node and
    signal (the others were ended because of it); the ranks' own ``error`` events give the cause."""
    step = None if last_step is None else last_step + 1
    reports = task_reports(srun_lines)
    culprit = reports[0] if reports else None  # srun reports the task that failed first, then those it ended
    rank = node = sig = None
    if culprit:
        node, rank, what = culprit
        sig = signal_name(what)
    own = sorted(errors, key=lambda e: e["time"])
    if rc == EXIT_HUNG:
        kind, cause = "hang", f"hang: no step finished in time after step {last_step} (stacks in RUN/incidents/)"
    elif sig:
        kind, cause = "killed", f"rank {rank} on {node} killed by {sig}"
    else:
        kind = "crash"
        first = own[0] if own else None
        if first is not None:
            rank = first.get("rank", rank)
            cause = f"rank {rank}: {first.get('cause')}"
        else:
            cause = f"exit code {rc}" + (f" (rank {rank} on {node}: {culprit[2]})" if culprit else "")
    return Failure(rc, kind, step, rank, node, sig, cause)


def backoff(base_s: float, restarts_so_far: int) -> float:
    """Wait before restart number ``restarts_so_far + 1`` of a job: doubling, capped."""
    return min(MAX_BACKOFF_S, base_s * 2 ** restarts_so_far)


def decide(rc: int, *, cancelled: bool, failure: Failure | None, previous: dict | None, restarts_so_far: int,
           max_restarts: int, backoff_s: float, unhealthy: list[str]) -> Decision:
    """The action for a training step that ended with ``rc``. ``previous`` is the run's last
    ``failure`` event (for the deterministic check); ``restarts_so_far`` the restarts this job
    has made; ``unhealthy`` the job's nodes Slurm reports down, drained or not responding."""
    if rc == EXIT_OK:
        return Decision("finish", "training finished")
    if rc == EXIT_BAD_INPUT:
        return Decision("stop", "bad input (exit 2) is never retried: fix what the line above names", EXIT_BAD_INPUT)
    if rc == EXIT_PREEMPTED or failure is None:
        if cancelled:
            return Decision("cancelled", "stopped by SIGTERM (a scancel, or Slurm ending the job): not requeued by "
                                         "this job; submit the same command again to continue from the checkpoint")
        return Decision("requeue", "checkpointed on a stop signal (time limit or pre-emption): requeued")
    if cancelled:
        return Decision("cancelled", f"the job was cancelled while failing ({failure.cause}): not restarted")
    if previous is not None and failure.step is not None and previous.get("step") == failure.step \
            and previous.get("kind") == failure.kind:
        return Decision("stop", f"deterministic failure: {failure.kind} at step {failure.step} again "
                                f"({failure.cause}); not restarting a failure that repeats", EXIT_ERROR)
    if restarts_so_far >= max_restarts:
        return Decision("stop", f"restart budget exhausted: {restarts_so_far} restarts in this job "
                                f"(MAX_RESTARTS={max_restarts}); last failure at step {failure.step}: {failure.cause}",
                        EXIT_ERROR)
    wait = backoff(backoff_s, restarts_so_far)
    if unhealthy:
        return Decision("requeue", f"node(s) {', '.join(unhealthy)} unhealthy after {failure.cause}: requeued without "
                                   "them", backoff_s=0.0, exclude=unhealthy)
    return Decision("restart", f"{failure.cause}; nodes healthy: restart {restarts_so_far + 1} of {max_restarts} in "
                               f"the allocation after {wait:.0f} s", backoff_s=wait)
