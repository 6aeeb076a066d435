"""The exit codes of every entry point, in one place: the launcher, the tools and the job
supervisor (:mod:`d2v2scale.resilience.supervisor`, which restarts on :data:`EXIT_ERROR` and
:data:`EXIT_HUNG`, requeues on :data:`EXIT_PREEMPTED` and never retries :data:`EXIT_BAD_INPUT`)
agree on these numbers; ``docs/failures.md`` lists them with what a person does for each."""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # training failed after it started (a crashed rank, too many non-finite steps)
EXIT_BAD_INPUT = 2  # configuration, data or checkpoint refused: one line, before any process group where possible
EXIT_PREEMPTED = 3  # stopped by a signal after writing a checkpoint: requeue, then --resume auto
EXIT_HUNG = 4  # the hang watchdog found no step finishing in time: stacks written to RUN/incidents/, restart
