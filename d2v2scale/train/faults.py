"""Pre-emption signals and non-finite steps.

Slurm sends SIGTERM (or the ``--signal`` of the job, e.g. SIGUSR1) some time before it kills a
job; Ctrl-C (SIGINT) asks for the same, and a second Ctrl-C aborts without a checkpoint. The
handler only raises a flag; the ranks agree (the signal reaches them at different times) through
the process group's key-value store on a step to stop after — the one after the step in progress
— then write a checkpoint and exit with :data:`~d2v2scale.exit_codes.EXIT_PREEMPTED` so the sbatch script requeues.

A step whose loss or gradient norm is not finite on any rank is skipped by the backend (a
non-finite loss gives a non-finite norm), and the teacher is not updated either. After
``train.max_consecutive_skips`` skips in a row the run stops with :class:`NonFiniteTraining` (checked
where a step logs or saves), never writing a checkpoint with non-finite weights.
"""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, Callable

import torch

from ..distributed.runtime import all_reduce
from ..logs import LOG

# Ctrl-C (SIGINT) is a stop request like Slurm's; a second Ctrl-C aborts at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# what signal.signal installs and returns: a function, SIG_DFL/SIG_IGN, or None (set outside Python)
_Handler = Callable[[int, FrameType | None], Any] | int | None


STOP_KEY = "d2v2scale/stop_after_step"


def _store():
    """The default process group's store (None in a single process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is written; the launcher exits with code 3."""


class NonFiniteTraining(RuntimeError):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


class StopFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._published = False
        self._previous: dict[signal.Signals, _Handler] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            LOG.info("Ctrl-C: finishing this step and checkpointing (press it again to abort without one)")
        self.received = signum

    def agreed(self, completed: int) -> bool:
        """After ``completed`` steps: True on every rank, at the same step, once any rank got a stop
        signal. Agreed through the process group's key-value store, not a collective: a rank that
        got the signal writes "stop after step ``completed + 1``" (the first writer wins); every rank
        checks the key after each step. Ranks are never a step apart (each step's collectives tie
        them), so all of them see the key before finishing that step. Nothing is read from the device."""
        store = _store()
        if store is None:  # one process
            return self.received is not None
        if self.received is not None and not self._published:
            store.compare_set(STOP_KEY, "", str(completed + 1))
            self._published = True
        return store.check([STOP_KEY]) and completed >= int(store.get(STOP_KEY))


def all_finite(value: torch.Tensor, group) -> bool:
    """Whether ``value`` is finite on every rank of ``group`` (collective)."""
    bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
    return not bool(all_reduce(bad, group, op="max").item())


def tensors_finite(tensors) -> bool:
    """Local check of every tensor (a backend's own shards of the weights)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())


def injected_nan_steps() -> set[tuple[int, int | None]]:
    """Test hook: ``D2V2SCALE_TEST_NAN_STEPS=3,4:1`` makes step 3's loss (every micro-batch) and step
    4's second micro-batch NaN on rank 0."""
    out = set()
    for item in os.environ.get("D2V2SCALE_TEST_NAN_STEPS", "").split(","):
        if item.strip():
            step, _, micro = item.partition(":")
            out.add((int(step), int(micro) if micro else None))
    return out


def injected_failure(rank: int, step: int, start_step: int) -> None:
    """Test hook: ``D2V2SCALE_TEST_FAIL=<rank>:<step>`` makes that rank raise when it reaches
    ``step`` (every attempt: a deterministic failure); ``<rank>:+<n>`` after ``n`` steps of each
    attempt (a failure at a new step each time)."""
    spec = os.environ.get("D2V2SCALE_TEST_FAIL", "")
    if not spec:
        return
    who, _, when = spec.partition(":")
    at = start_step + int(when[1:]) if when.startswith("+") else int(when)
    if int(who) == rank and step == at:
        raise RuntimeError(f"injected failure at step {step} (D2V2SCALE_TEST_FAIL={spec})")


def poisoned(nan_steps: set, step: int, micro: int) -> bool:
    return (step, None) in nan_steps or (step, micro) in nan_steps
