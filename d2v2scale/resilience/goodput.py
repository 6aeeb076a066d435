"""Goodput: productive step time ÷ wall time over every attempt of a run, and where the rest went.

Built from ``RUN/events.jsonl`` alone (:mod:`.events`), after the fact. Over the wall time — from
the first job's start (or the first attempt's, without the supervisor) to the last event — every
second lands in exactly one bucket:

- ``productive``: steps whose results the run kept;
- ``startup``: launch to the end of the first step of each attempt (imports, process group,
  model, resume, and the first step's warm-up);
- ``checkpoint``: checkpoint writes;
- ``recomputed``: steps done again after a failure (from the last checkpoint to where it failed);
- ``restart``: from the last progress before a failure to the next launch (teardown, backoff);
- ``hang``: from the last progress to the watchdog's decision, for a hang;
- ``between_jobs``: from the end of one job to the start of the next (the queue after a
  requeue, a person resubmitting; ``queued_s`` says what Slurm counted as queue);
- ``other``: the rest (logging, the supervisor's own work), shown so that the sum is the wall.

An attempt's step time is its training loop's time less its checkpoint writes; its recomputed
share is the steps redone × its mean step time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CAUSES = ("startup", "checkpoint", "recomputed", "restart", "hang", "between_jobs", "other")


@dataclass
class Attempt:
    begin: float  # launch (supervisor) or process start
    train_start: float | None = None  # the first step finished (or, in older runs, the loop started)
    start_step: int = 0  # the step finished at ``train_start``
    end: float | None = None  # last progress: the run finished, or the heartbeat before a failure
    end_step: int | None = None
    checkpoint_s: float = 0.0
    failure: dict | None = None
    recomputed_steps: int = 0

    @property
    def step_s(self) -> float:
        if self.train_start is None or self.end is None:
            return 0.0
        return max(0.0, self.end - self.train_start - self.checkpoint_s)

    @property
    def steps(self) -> int:
        return max(0, (self.end_step or self.start_step) - self.start_step)


@dataclass
class Goodput:
    wall_s: float
    productive_s: float
    lost_s: dict[str, float]
    incidents: list[dict] = field(default_factory=list)
    attempts: int = 0

    @property
    def goodput(self) -> float | None:
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    def as_dict(self) -> dict:
        return {"goodput": self.goodput, "wall_s": self.wall_s, "productive_s": self.productive_s,
                "lost_s": self.lost_s, "attempts": self.attempts, "incidents": self.incidents}


def _attempts(events: list[dict]) -> tuple[list[Attempt], list[tuple[float, float]]]:
    """The attempts in order, and (end of a job, start of the next) gaps."""
    attempts: list[Attempt] = []
    gaps: list[tuple[float, float]] = []
    last_time = None
    launched: float | None = None
    for e in events:
        kind, t = e["event"], float(e["time"])
        if kind == "job_start" and last_time is not None:
            gaps.append((last_time, t))
        if kind == "launch":
            launched = t
        elif kind == "attempt":
            attempts.append(Attempt(begin=launched if launched is not None else float(e.get("started") or t),
                                    start_step=int(e.get("start_step", 0))))
            launched = None
        elif attempts:
            a = attempts[-1]
            if kind == "train_start" and a.train_start is None:
                a.train_start, a.start_step = t, int(e["step"])
            elif kind == "first_step":
                a.train_start, a.start_step = t, int(e["step"])
            elif kind == "checkpoint":
                a.checkpoint_s += float(e.get("seconds", 0.0))
                a.end, a.end_step = t, int(e["step"])
            elif kind == "finished":
                a.end, a.end_step = t, int(e["step"])
            elif kind == "failure" and a.failure is None:
                a.failure = e
                progress = e.get("last_progress")
                if progress and a.train_start is not None and float(progress[1]) >= a.train_start:
                    a.end_step = max(int(progress[0]), a.end_step or 0)
                    a.end = max(float(progress[1]), a.end or 0.0)
            elif kind == "resume" and len(attempts) >= 2:
                attempts[-2].recomputed_steps = int(e.get("recomputed", 0))
        if kind in ("failure", "finished", "cancelled", "requeue", "stop", "checkpoint"):
            last_time = t
    return attempts, gaps


def account(events: list[dict]) -> Goodput | None:
    """The run's goodput from its events, or None when no attempt was recorded."""
    attempts, gaps = _attempts(events)
    if not attempts:
        return None
    first = min(float(e["time"]) for e in events if e["event"] in ("job_start", "launch", "attempt"))
    first = min(first, attempts[0].begin)
    wall = max(float(e["time"]) for e in events) - first
    lost = dict.fromkeys(CAUSES, 0.0)
    productive = 0.0
    incidents = []
    for i, a in enumerate(attempts):
        if a.train_start is not None:
            lost["startup"] += a.train_start - a.begin
        lost["checkpoint"] += a.checkpoint_s
        mean_step = a.step_s / a.steps if a.steps else 0.0
        redone = min(a.recomputed_steps, a.steps) * mean_step
        lost["recomputed"] += redone
        productive += a.step_s - redone
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        if a.failure is None or nxt is None or a.end is None:
            continue
        detected = float(a.failure["time"]) if a.failure.get("kind") == "hang" else a.end
        hang = max(0.0, detected - a.end)
        restart = max(0.0, nxt.begin - a.end - hang)
        lost["hang"] += hang
        lost["restart"] += restart
        startup = (nxt.train_start - nxt.begin) if nxt.train_start is not None else None
        incidents.append({"time": a.failure["time"], "kind": a.failure.get("kind"), "cause": a.failure.get("cause"),
                          "step": a.failure.get("step"), "action": a.failure.get("action"),
                          "recomputed_steps": a.recomputed_steps, "recomputed_s": redone, "hang_s": hang,
                          "restart_s": restart, "startup_s": startup,
                          "downtime_s": (nxt.train_start - a.end) if nxt.train_start is not None else None})
    lost["between_jobs"] = sum(b - a for a, b in gaps)
    lost["other"] = max(0.0, wall - productive - sum(v for k, v in lost.items() if k != "other"))
    return Goodput(wall, productive, lost, incidents, len(attempts))


def render(g: Goodput) -> list[str]:
    """The report's Goodput section (markdown lines)."""
    lines = ["## Goodput", "",
             f"Productive step time {g.productive_s:.1f} s of {g.wall_s:.1f} s wall time over {g.attempts} "
             f"attempt(s): **goodput {g.goodput:.1%}**." if g.goodput is not None else "No wall time recorded.",
             "", "| lost to | seconds | share of wall |", "|---|---|---|"]
    for cause in CAUSES:
        share = g.lost_s[cause] / g.wall_s if g.wall_s else 0.0
        lines.append(f"| {cause.replace('_', ' ')} | {g.lost_s[cause]:.1f} | {share:.1%} |")
    if g.incidents:
        lines += ["", "| failure | step | what was done | steps redone | down (s): hang + restart + start-up |",
                  "|---|---|---|---|---|"]
        for inc in g.incidents:
            down = "n/a" if inc["downtime_s"] is None else (
                f"{inc['downtime_s']:.1f}: {inc['hang_s']:.1f} + {inc['restart_s']:.1f} + {inc['startup_s']:.1f}")
            lines.append(f"| {inc['cause']} | {inc['step']} | {inc['action']} | {inc['recomputed_steps']} | {down} |")
    return lines
