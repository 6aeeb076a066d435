"""Cluster profiles and the time of one collective on them.

A profile is a few numbers per link level, in the units NCCL's own benchmarks report:
*bus bandwidth* (nccl-tests ``busbw``: the per-rank rate on the bottleneck link, independent of
the rank count) and a latency per collective. The time of a collective of ``S`` bytes over ``p``
ranks is then the textbook ring model

    t = latency + S · f(p) / busbw,   f = 2(p−1)/p (all-reduce), (p−1)/p (all-gather,
                                       reduce-scatter; S the gathered/scattered size), 1 (broadcast)

with the intra-node numbers when the group sits inside one node and the inter-node ones when it
spans nodes (latency grows with log2 of the nodes spanned: NCCL's tree for small messages).

Profiles are JSON with the fields of :class:`ClusterProfile`; pass a file path to ``--cluster``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ConfigError

GB = 1e9


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    gpu: str  # key of profiling.flops.PEAK_FLOPS / plan.GPU_MEMORY_GB
    gpus_per_node: int
    intra_busbw_gbs: float  # NCCL bus bandwidth inside a node (GB/s)
    inter_busbw_gbs: float  # NCCL bus bandwidth of a group spanning nodes (GB/s, per rank)
    intra_latency_us: float
    inter_latency_us: float
    sources: tuple[str, ...] = ()

    def collective_s(self, kind: str, nbytes: float, ranks: int, spans_nodes: bool) -> float:
        """Seconds for one collective of ``nbytes`` (the payload as :mod:`.comm` counts it)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        factor = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks,
                  "reduce_scatter": (ranks - 1) / ranks, "broadcast": 1.0}[kind]
        if spans_nodes:
            nodes = max(2, math.ceil(ranks / self.gpus_per_node))
            latency = self.intra_latency_us + self.inter_latency_us * math.ceil(math.log2(nodes))
            busbw = self.inter_busbw_gbs
        else:
            latency, busbw = self.intra_latency_us, self.intra_busbw_gbs
        return latency * 1e-6 + nbytes * factor / (busbw * GB)


# DGX A100 40GB class: 8 GPUs on NVSwitch (NVLink 3: 600 GB/s bidirectional, 300 GB/s each way
# per GPU) and 8 HDR InfiniBand ports per node (200 Gb/s = 25 GB/s each way, one per GPU).
# Achievable NCCL bus bandwidth is taken as ~77 % of the NVLink per-direction peak in a node and
# ~92 % of the node's aggregate NIC rate (8 × 25 GB/s) across nodes, the usual large-message
# efficiencies of nccl-tests on these systems; calibrate with your own nccl-tests run.
DGX_A100_40GB = ClusterProfile(
    name="dgx-a100-40gb-8xhdr200",
    gpu="a100-40gb",
    gpus_per_node=8,
    intra_busbw_gbs=230.0,
    inter_busbw_gbs=185.0,
    intra_latency_us=10.0,
    inter_latency_us=12.0,
    sources=(
        "NVIDIA DGX A100 System Architecture (technical white paper WP-10083-001): NVSwitch, "
        "600 GB/s GPU-to-GPU bidirectional, 8x single-port 200 Gb/s HDR InfiniBand for compute",
        "NVIDIA nccl-tests doc/PERFORMANCE.md: definition of bus bandwidth and the 2(n-1)/n, (n-1)/n factors",
    ),
)
PROFILES = {DGX_A100_40GB.name: DGX_A100_40GB, "default": DGX_A100_40GB}


def load_profile(name_or_path: str | None) -> ClusterProfile:
    """A built-in profile by name, or a JSON file with :class:`ClusterProfile`'s fields."""
    if not name_or_path:
        return DGX_A100_40GB
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"--cluster {name_or_path}: neither a built-in profile ({', '.join(PROFILES)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--cluster {name_or_path}: not valid JSON ({e})") from None
    names = [f.name for f in fields(ClusterProfile)]
    missing = [n for n in names if n not in data and n != "sources"]
    unknown = sorted(set(data) - set(names))
    if missing or unknown:
        raise ConfigError(f"--cluster {name_or_path}: missing fields {missing}, unknown fields {unknown}; "
                          f"allowed: {', '.join(names)}")
    data["sources"] = tuple(data.get("sources", ()))
    from ..profiling.flops import PEAK_FLOPS
    from .memory import GPU_MEMORY_GB

    known = sorted(set(PEAK_FLOPS) & set(GPU_MEMORY_GB))
    if data["gpu"] not in known:
        raise ConfigError(f"--cluster {name_or_path}: gpu {data['gpu']!r} is not one of {', '.join(known)}")
    return ClusterProfile(**data)
