"""The exit codes of every entry point, in one place: the launcher, the tools and the Slurm scripts
(which requeue on :data:`EXIT_PREEMPTED`) agree on these numbers, and README's table lists them."""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # training failed after it started (a crashed rank, too many non-finite steps)
EXIT_BAD_INPUT = 2  # configuration, data or checkpoint refused: one line, before any process group where possible
EXIT_PREEMPTED = 3  # stopped by a signal after writing a checkpoint: requeue, then --resume auto
