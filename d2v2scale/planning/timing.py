"""Predicted step time = compute at an efficiency that depends on the per-GPU work + exposed communication.

**Compute.** A GPU does not reach the same fraction of its peak on one image × M views as on
eight: kernels are small, launch and framework overheads fixed. The default efficiency curve is

    e(F) = E_MAX · F / (F + F_HALF),   F = model FLOPs of one micro-batch on one GPU

with ``E_MAX = 0.5`` (the ceiling well-tuned Transformer training reaches on A100) and ``F_HALF``
fitted to one public point: the paper's ViT-H/14 run (500k updates of 256 images on 64 A100s in
66.1 h, i.e. 12 % MFU at F = 1.8e13). A calibration file (``bench/gpu_check.py`` writes one from
measured steps) replaces the curve by interpolation between its points.

**Communication.** Each collective of :mod:`.comm` is timed on the cluster profile. DeepSpeed's
``overlap_comm`` lets the gradient reduction (and ZeRO-3's prefetched gathers) run under the
backward (about half the step's compute: backward is 2 of the 3 forward-equivalents of the
student, the teacher runs forward only); whatever does not fit is exposed. TP all-reduces, the
post-step weight gather and the teacher refresh sit on the critical path.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from .cluster import ClusterProfile
from .comm import Collective

E_MAX = 0.5
F_HALF = 5.6e13
BACKWARD_SHARE = 0.5  # of the step's compute time, the part gradient reduction can hide behind


@dataclass(frozen=True)
class Efficiency:
    """Model FLOPs utilisation as a function of one micro-batch's FLOPs on one GPU."""

    points: tuple[tuple[float, float], ...] = ()  # measured (F, efficiency), sorted by F
    source: str = f"default curve e(F) = {E_MAX}·F/(F + {F_HALF:.1e})"

    def __call__(self, flops: float) -> float:
        if not self.points:
            return E_MAX * flops / (flops + F_HALF)
        xs = [math.log(f) for f, _ in self.points]
        x = math.log(max(flops, 1.0))
        if x <= xs[0]:
            return self.points[0][1] * flops / self.points[0][0]  # below the smallest measured work: linear
        if x >= xs[-1]:
            return self.points[-1][1]
        i = next(k for k in range(1, len(xs)) if x <= xs[k])
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return self.points[i - 1][1] * (1 - w) + self.points[i][1] * w


def load_calibration(path: str | None, gpu: str) -> Efficiency:
    """The curve from ``calibration.json`` (``{"gpu", "points": [{"flops_per_micro_batch", "efficiency"}, ...]}``)."""
    if not path:
        return Efficiency()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calibration {path} does not exist (bench/gpu_check.py writes calibration.json)")
    try:
        data = json.loads(p.read_text())
        points = tuple(sorted((float(q["flops_per_micro_batch"]), float(q["efficiency"])) for q in data["points"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--calibration {path}: expected {{'gpu', 'points': [{{'flops_per_micro_batch', "
                          f"'efficiency'}}, ...]}} ({type(e).__name__}: {e})") from None
    if not points:
        raise ConfigError(f"--calibration {path} has no points")
    if data.get("gpu") not in (None, gpu):
        raise ConfigError(f"--calibration {path} was measured on {data.get('gpu')}, the plan is for {gpu}")
    return Efficiency(points, f"calibration {path} ({len(points)} points)")


@dataclass
class StepTime:
    compute_s: float
    comm_s: float  # all collectives, as if nothing overlapped
    exposed_comm_s: float
    efficiency: float
    collectives: list[tuple[Collective, float]] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_comm_s

    @property
    def dominant(self) -> str:
        return "compute" if self.compute_s >= self.exposed_comm_s else "communication"


def step_time(flops_per_micro_batch: float, grad_accum: int, peak: float, efficiency: Efficiency,
              collectives: list[Collective], profile: ClusterProfile, tp: int, dp: int) -> StepTime:
    eff = efficiency(flops_per_micro_batch)
    compute = grad_accum * flops_per_micro_batch / (peak * eff)
    world = tp * dp
    spans = {"tp": tp > profile.gpus_per_node, "dp": world > profile.gpus_per_node,
             "world": world > profile.gpus_per_node}
    ranks = {"tp": tp, "dp": dp, "world": world}
    timed = [(c, c.calls * profile.collective_s(c.kind, c.nbytes, ranks[c.group], spans[c.group])) for c in collectives]
    hideable = sum(t for c, t in timed if c.hidden_by)
    exposed = sum(t for c, t in timed if not c.hidden_by) + max(0.0, hideable - BACKWARD_SHARE * compute)
    return StepTime(compute, sum(t for _, t in timed), exposed, eff, timed)
