"""The few Slurm facts and actions the job supervisor needs, each one ``scontrol``/``squeue``/``sinfo``
call; outside a job (or without the commands) they answer "unknown" rather than fail."""
from __future__ import annotations

import datetime
import os
import subprocess

UNHEALTHY = ("down", "drain", "drng", "fail", "maint", "no_respond", "not_responding", "unk")


def _run(*args: str) -> str | None:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_duration(text: str) -> float | None:
    """Slurm's ``[days-]hours:minutes:seconds`` / ``minutes:seconds`` in seconds; None for
    UNLIMITED, NOT_SET or anything else."""
    text = text.strip()
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return days * 86400 + seconds


def time_left_s(job: str) -> float | None:
    out = _run("squeue", "-h", "-j", job, "-o", "%L")
    return parse_duration(out) if out else None


def job_info(job: str) -> dict[str, str]:
    out = _run("scontrol", "show", "job", job) or ""
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def queued_s(info: dict[str, str]) -> float | None:
    """Seconds between the job's eligibility (its submission or requeue) and its start."""
    try:
        start = datetime.datetime.fromisoformat(info["StartTime"])
        eligible = datetime.datetime.fromisoformat(info.get("EligibleTime") or info["SubmitTime"])
    except (KeyError, ValueError):
        return None
    return max(0.0, (start - eligible).total_seconds())


def hostnames(nodelist: str) -> list[str]:
    out = _run("scontrol", "show", "hostnames", nodelist)
    return out.split() if out else ([nodelist] if nodelist else [])


def unhealthy_nodes(nodes: list[str]) -> list[str]:
    """The nodes among ``nodes`` that Slurm reports down, drained, failing or not responding."""
    if not nodes:
        return []
    out = _run("sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %T")
    bad = []
    for line in (out or "").splitlines():
        name, _, state = line.partition(" ")
        state = state.strip().lower()
        if state.endswith("*") or any(word in state for word in UNHEALTHY):
            bad.append(name)
    return sorted(set(bad))


def requeue(job: str, exclude: list[str]) -> bool:
    """Put the job back in the queue; with ``exclude``, held first so the excluded nodes can be set
    while it is pending (Slurm takes ExcNodeList only then), then released."""
    if not exclude:
        return _run("scontrol", "requeue", job) is not None
    if _run("scontrol", "requeuehold", job) is None:
        return False
    previous = job_info(job).get("ExcNodeList", "(null)")
    nodes = sorted(set(exclude) | (set(hostnames(previous)) if previous not in ("(null)", "") else set()))
    _run("scontrol", "update", f"JobId={job}", f"ExcNodeList={','.join(nodes)}")
    return _run("scontrol", "release", job) is not None


def job_state(job: str) -> str | None:
    out = _run("squeue", "-h", "-j", job, "-o", "%T")
    return out.strip() if out else None


def this_job() -> tuple[str | None, int, str]:
    """(job id, Slurm's restart count, node list) of the job this process runs in."""
    env = os.environ
    return env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT", 0) or 0), env.get("SLURM_JOB_NODELIST", "")
