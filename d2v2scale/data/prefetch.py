"""Prepare the next steps' batches on a background thread while the current step computes.

A step's batches are a pure function of the step (see :mod:`d2v2scale.data.schedule`), so reading
ahead changes when the work happens, never what it produces: a run with ``data.prefetch_steps=2``
sees bit-identical batches to one with 0, and a resumed run needs no loader state. One worker
thread is enough: file reads, DALI's ``run`` and host-to-device copies release the GIL, and the
decode itself runs on DALI's threads (or on the GPU with ``device="mixed"``). Every call into the
data source happens on that one thread, so sources need not be thread-safe.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class StepPrefetcher(Generic[T]):
    """``get(n)`` returns ``produce(n)``, computed ahead for ``n+1 .. n+depth`` (below ``limit``).

    Steps are expected in ascending order; any other request is still answered correctly, after
    the read-ahead that no longer applies is dropped. ``depth=0`` produces synchronously on the
    caller's thread.
    """

    def __init__(self, produce: Callable[[int], T], depth: int, limit: int,
                 thread_init: Callable[[], None] | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.produce, self.depth, self.limit = produce, depth, limit
        self._pending: dict[int, Future] = {}
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="d2v2scale-prefetch", initializer=thread_init)
                      if depth else None)

    def get(self, step: int) -> T:
        if self._pool is None:
            return self.produce(step)
        wanted = range(step, min(step + 1 + self.depth, self.limit))
        for ahead in [s for s in self._pending if s not in wanted]:
            self._pending.pop(ahead).cancel()
        future = self._pending.pop(step, None) or self._pool.submit(self.produce, step)
        for ahead in wanted[1:]:
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self.produce, ahead)
        return future.result()

    def close(self) -> None:
        """Drop the read-ahead and stop the thread (waits for a batch in progress)."""
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
