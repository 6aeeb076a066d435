"""A per-rank hang watchdog: a step that never ends is found, every thread's stack written, and the
process ended with :data:`~d2v2scale.exit_codes.EXIT_HUNG` so the job supervisor restarts it.

A hung collective or a stuck GPU leaves every rank blocked (each waits for the others), so each
rank's watchdog fires on its own, within one poll of the others, and writes its own stacks to
``RUN/incidents/<attempt>/rank_<r>.txt``: no coordination, nothing that can itself hang. The
bound depends on what the rank is doing (NVRx's section timeouts):

- start-up, the first step (compilation, allocator warm-up) and checkpoint writes:
  ``train.setup_timeout_s``;
- any later step: ``train.hang_timeout_s``, or by default ``AUTO_FACTOR`` × the slowest step this
  attempt has measured, never under ``AUTO_FLOOR_S``.

The process-group timeout is :func:`collective_timeout_s` of the same keys, a little longer than
every bound, so a blocked collective never ends the run before the watchdog has written its stacks.

A rank that cannot run its own watchdog because it is *stopped* (SIGSTOP, a job-control stop, a
debugger) is handled by its siblings on the node (the processes with the same parent: srun's
tasks, a launcher's workers): a firing watchdog sends each stopped sibling SIGUSR2, which
``faulthandler`` has registered to dump that process's stacks at once, and SIGCONT, and copies
the dump into the incident folder. A rank stuck in the kernel (uninterruptible I/O) cannot be
dumped by anyone; its absence from the folder says so.

Rank 0 also keeps ``RUN/heartbeat`` (``<step> <unix time>``, rewritten in place after each step):
how far an attempt got, for the supervisor's failure record and the resume's recomputed steps.
On a GPU the NCCL flight recorder's buffer is dumped beside the stacks when torch has one.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from ..exit_codes import EXIT_HUNG
from ..logs import LOG
from ..runfiles import HEARTBEAT, INCIDENTS
from .events import write_event

AUTO_FACTOR = 10.0
AUTO_FLOOR_S = 300.0
COLLECTIVE_MARGIN_S = 60.0  # the process group outwaits every watchdog bound by this much
SIBLING_WAIT_S = 10.0  # how long a firing watchdog waits for a stopped sibling's dump


def collective_timeout_s(hang_timeout_s: float | None, setup_timeout_s: float) -> float:
    """The process-group timeout for these watchdog settings: longer than any bound it can apply
    (an automatic step bound is capped at the setup bound, see :meth:`Watchdog.bound`)."""
    return max(setup_timeout_s, hang_timeout_s or 0.0) + COLLECTIVE_MARGIN_S


def read_heartbeat(run_dir: Path) -> tuple[int, float] | None:
    """(last finished step, when) from rank 0's heartbeat, or None when there is none."""
    try:
        step, when = (run_dir / HEARTBEAT).read_text().split()[:2]
        return int(step), float(when)
    except (OSError, ValueError):
        return None


def stopped_siblings() -> list[int]:
    """Processes with this one's parent that are stopped (Linux /proc; [] elsewhere)."""
    me, parent, out = os.getpid(), os.getppid(), []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] in ("T", "t"):
            out.append(pid)
    return out


class Watchdog:
    """Call :meth:`beat` after every step and wrap slow work in :meth:`section`; :meth:`start`
    runs the checking thread. ``rank`` names the stack file; ``heartbeat`` (rank 0) keeps
    ``RUN/heartbeat``."""

    def __init__(self, run_dir: Path, rank: int, attempt: str, hang_timeout_s: float | None,
                 setup_timeout_s: float, heartbeat: bool, poll_s: float = 1.0):
        self.run_dir, self.rank, self.attempt = Path(run_dir), rank, attempt
        self.hang_timeout_s, self.setup_timeout_s = hang_timeout_s, setup_timeout_s
        self.poll_s = min(poll_s, setup_timeout_s / 10, hang_timeout_s / 10 if hang_timeout_s else poll_s)
        self.step = 0
        self.slowest = 0.0
        self._section = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._firing = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat_fd = os.open(self.run_dir / HEARTBEAT, os.O_WRONLY | os.O_CREAT, 0o644) if heartbeat else None
        self._own_dump = self._register_signal_dump()

    @property
    def incident_dir(self) -> Path:
        return self.run_dir / INCIDENTS / self.attempt

    def _register_signal_dump(self) -> Path | None:
        """Let a sibling ask for this process's stacks with SIGUSR2 (also while it is stopped: the
        signal is delivered, and the stacks dumped, the moment it continues)."""
        folder = Path(tempfile.gettempdir()) / f"d2v2scale-stacks-{os.getuid()}"
        try:
            folder.mkdir(exist_ok=True)
            path = folder / f"{os.getpid()}.txt"
            self._dump_file = open(path, "w")  # noqa: SIM115 - faulthandler keeps writing to it
            self._dump_file.write(f"rank {self.rank}\n")
            self._dump_file.flush()
            faulthandler.register(signal.SIGUSR2, file=self._dump_file, all_threads=True, chain=False)
            return path
        except (OSError, RuntimeError, ValueError):
            return None

    def bound(self) -> float:
        """Seconds the current section may run without a step finishing."""
        if self._section != "steps":
            return self.setup_timeout_s
        if self.hang_timeout_s:
            return self.hang_timeout_s
        return min(self.setup_timeout_s, max(AUTO_FLOOR_S, AUTO_FACTOR * self.slowest))

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2v2scale-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the checking thread (:meth:`start` may start it again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop, and give back the signal dump and the heartbeat file."""
        self.stop()
        if self._own_dump is not None:
            faulthandler.unregister(signal.SIGUSR2)
            self._dump_file.close()
            self._own_dump.unlink(missing_ok=True)
            self._own_dump = None
        if self._heartbeat_fd is not None:
            os.close(self._heartbeat_fd)
            self._heartbeat_fd = None

    def beat(self, step: int) -> None:
        """Step ``step`` finished (no I/O but rank 0's in-place heartbeat write). Once the watchdog
        has declared a hang the rank makes no more progress (a continued sibling could otherwise
        let the step finish while the stacks are written): it waits here for the exit."""
        if self._firing.is_set():
            threading.Event().wait()
        now = time.monotonic()
        if self._section == "steps":
            self.slowest = max(self.slowest, now - self._last)
        self._section, self._last, self.step = "steps", now, step
        if self._heartbeat_fd is not None:
            os.pwrite(self._heartbeat_fd, f"{step} {time.time():.3f}\n".ljust(40).encode(), 0)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Slow work that is not a step (a checkpoint write): bounded by the setup timeout."""
        before = self._section
        self._section, self._last = name, time.monotonic()
        try:
            yield
        finally:
            self._section, self._last = before, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited = time.monotonic() - self._last
            if waited > self.bound():
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        """Write this rank's stacks (and stopped siblings'), record the hang, end the process —
        whatever goes wrong on the way (a full disk), the process ends."""
        self._firing.set()
        step, bound, section = self.step, self.bound(), self._section
        what = f"no step finished for {waited:.0f} s (bound {bound:.0f} s, in {section}; last finished step {step})"
        folder = self.incident_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank_{self.rank}.txt", "a") as f:
                f.write(f"rank {self.rank} on {socket.gethostname()} pid {os.getpid()}: {what}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            self._dump_nccl_trace(folder)
            for pid in stopped_siblings():
                self._dump_sibling(pid, folder)
            LOG.error(f"[rank {self.rank}] hang: {what}; stacks in {folder}; exiting with {EXIT_HUNG}")
            if self._heartbeat_fd is not None:  # rank 0 speaks for the others, as in every other event
                write_event(self.run_dir, "hang", rank=self.rank, step=step, waited_s=round(waited, 1),
                            bound_s=bound, incident=str(folder))
        finally:
            os._exit(EXIT_HUNG)

    def _dump_sibling(self, pid: int, folder: Path) -> None:
        """SIGUSR2 then SIGCONT a stopped sibling; copy the stacks its faulthandler writes."""
        source = Path(tempfile.gettempdir()) / f"d2v2scale-stacks-{os.getuid()}" / f"{pid}.txt"
        if not source.is_file():
            return
        try:
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + SIBLING_WAIT_S
        text = ""
        while time.monotonic() < deadline:
            text = source.read_text(errors="replace")
            if "File " in text:  # faulthandler has written at least one frame
                time.sleep(0.2)  # let it finish the other threads
                text = source.read_text(errors="replace")
                break
            time.sleep(0.1)
        header, _, stacks = text.partition("\n")
        rank = header.split()[-1] if header.startswith("rank ") else f"pid{pid}"
        with open(folder / f"rank_{rank}.txt", "a") as f:
            f.write(f"rank {rank} pid {pid}: stopped (state T); stacks as it was continued by rank {self.rank}\n")
            f.write(stacks or "(no stacks: it did not answer SIGUSR2)\n")

    def _dump_nccl_trace(self, folder: Path) -> None:
        """The NCCL flight recorder's last collectives, when this torch build keeps them."""
        import torch

        dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if not torch.cuda.is_available() or dump is None:
            return
        try:
            (folder / f"nccl_trace_rank_{self.rank}.pkl").write_bytes(dump())
        except Exception as e:  # noqa: BLE001 - the stacks are written; the trace is a bonus
            LOG.error(f"[rank {self.rank}] NCCL flight recorder not dumped: {e}")
