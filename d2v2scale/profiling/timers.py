"""Per-step phase timing: CUDA events on GPU (read back only when reported), perf_counter on CPU.

With profiling off, :meth:`StepTimer.phase` hands back one shared no-op context manager: no
events, no clocks, no host syncs.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

PHASES = ("data", "local_encoder", "teacher", "student", "decoder_loss", "backward", "optimizer", "ema")
_NOOP = nullcontext()


class StepTimer:
    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.steps: list[dict[str, float]] = []
        self._pending: list[tuple[str, object, object]] = []

    def phase(self, name: str):
        if not self.enabled:
            return _NOOP
        return self._timed(name)

    @contextmanager
    def _timed(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._pending.append((name, t0, time.perf_counter()))

    def end_step(self) -> None:
        """Close the step's record (CUDA events are resolved later, in :meth:`resolve`)."""
        if self.enabled:
            self.steps.append(self._pending)
            self._pending = []

    def resolve(self) -> list[dict[str, float]]:
        """Seconds per phase for every recorded step (one device sync on GPU, at report time)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for record in self.steps:
            row: dict[str, float] = {}
            for name, a, b in record:
                seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
                row[name] = row.get(name, 0.0) + seconds
            out.append(row)
        return out
