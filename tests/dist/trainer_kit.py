"""How a test worker builds a trainer from a preset and a DeepSpeed JSON: the one place that knows
``build_trainer``'s signature, so a change of it is one edit here, not one per worker.

Importable from ``tests/dist`` workers (their own folder is on ``sys.path``) and from anything that
puts this folder there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2v2scale.config import Config  # noqa: E402
from d2v2scale.distributed.dims import ParallelDims  # noqa: E402
from d2v2scale.run_spec import run_spec  # noqa: E402
from d2v2scale.train.engine import Trainer, build_trainer  # noqa: E402


def cpu_tiny(**top: object) -> dict:
    """ds_configs/cpu_tiny.json (the step users run on CPU) with top-level keys replaced."""
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    ds.update(top)
    return ds


def make_trainer(cfg: Config, ds: dict, dims: ParallelDims, device: torch.device) -> Trainer:
    """``build_trainer`` on ``ds`` split over ``dims.dp`` ranks (d2v2scale/run_spec.py types it)."""
    return build_trainer(cfg, run_spec(ds, cfg, dims.dp), dims, device)
