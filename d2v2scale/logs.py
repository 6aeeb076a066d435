"""Log lines a person can follow in a Slurm log or a terminal.

Every line carries a timestamp (``2026-11-29 14:03:11``). Rank 0 logs everything at INFO on
stdout; the other ranks log only warnings and errors (stderr), prefixed ``[rank N]``, so a
64-node log is one run's story, not 512 copies of it. Python warnings from libraries go through
the same logger, once per run: rank 0 shows each once, the others keep them to themselves (they
run the same code). Lines are written with ``tqdm.write`` so an interactive progress bar is never
torn by a message.
"""
from __future__ import annotations

import logging
import sys
import warnings

from tqdm import tqdm

LOG = logging.getLogger("d2v2scale")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class _TqdmHandler(logging.Handler):
    """INFO to stdout, WARNING and above to stderr, both through ``tqdm.write``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup_logging(rank: int = 0) -> None:
    """Configure the ``d2v2scale`` logger (and Python warnings) for this process; idempotent."""
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt=TIME_FORMAT))
    for old in list(LOG.handlers):
        LOG.removeHandler(old)
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    LOG.propagate = False
    warnings_log = logging.getLogger("py.warnings")
    for old in list(warnings_log.handlers):
        warnings_log.removeHandler(old)
    warnings_log.addHandler(handler)
    warnings_log.propagate = False
    logging.captureWarnings(True)
    if rank != 0:
        warnings.simplefilter("ignore")  # the same warnings rank 0 shows, once
    # DeepSpeed 0.19 calls the collective torch 2.13 renamed; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def adopt(logger: logging.Logger, floor: int = logging.WARNING) -> None:
    """Route a library's own logger through ours: our format and streams, our rank rule, and at
    least ``floor`` (a library's INFO lines are rarely what a person following a run needs)."""
    logger.handlers = list(LOG.handlers)
    # a library says the same on every rank: rank 0 (which logs INFO) speaks for all, the others only on errors
    logger.setLevel(floor if LOG.level <= logging.INFO else logging.ERROR)
    logger.propagate = False


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, loss: float, lr: float, samples_per_s: float, elapsed_s: float,
                  eta_s: float) -> str:
    """``step 10/200 (5 %) loss 5.1400 lr 4.50e-04 21.3 samples/s elapsed 0:00:12 eta 0:03:12``."""
    return (f"step {step}/{total} ({100 * step / total:.0f} %) loss {loss:.4f} lr {lr:.2e} "
            f"{samples_per_s:.1f} samples/s elapsed {duration(elapsed_s)} eta {duration(eta_s)}")
