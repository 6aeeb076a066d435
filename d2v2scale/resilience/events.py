"""``RUN/events.jsonl``: what happened to a run, across attempts and jobs, one JSON object a line.

Written by the job supervisor (job starts, launches, failures and what was done about them), by
rank 0 (attempts, the first step, checkpoints, the end) and by a failing rank (its error line).
Every writer appends one line with one ``write`` on a file opened ``O_APPEND``, so lines from
several processes never interleave on a local or POSIX file system; a line cut short by a kill
is skipped by the reader. Times are Unix seconds (``time.time()``): the writers are different
processes, possibly on different nodes.

Kinds and their fields (besides ``event`` and ``time``):

- ``job_start``: job, restart (Slurm's requeue count), nodes, queued_s
- ``launch``: job, attempt (1, 2, ... within the job)
- ``attempt``: job, attempt, world_size, started (process start), start_step
- ``resume``: from_step, reached_step (the furthest step of the attempt before), recomputed
- ``train_start``: step (the first step this attempt runs)
- ``first_step``: step (that step finished: start-up ends here)
- ``checkpoint``: step, seconds, bytes
- ``error``: rank, step, cause (one line)
- ``hang``: rank, step, waited_s, bound_s, incident (folder of the stack files)
- ``failure``: job, attempt, rc, rank, node, signal, step, cause, action, why, last_progress
- ``finished``: step
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..runfiles import EVENTS


def write_event(run_dir: Path, event: str, **fields: object) -> dict:
    """Append one event to ``run_dir/events.jsonl`` (created with the folder if needed)."""
    record = {"event": event, "time": fields.pop("time", None) or time.time(), **fields}
    line = (json.dumps(record, default=str) + "\n").encode()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: Path) -> list[dict]:
    """Every complete event, in the order written; [] when the run has none."""
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a kill
        if isinstance(record, dict) and "event" in record and "time" in record:
            out.append(record)
    return out
