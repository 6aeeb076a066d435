"""``--profile`` during the run: phase timers, NVML sampling and a torch.profiler window; at the end
every rank's raw measurements go to ``RUN/report/profile.json`` and :mod:`.report` builds the
report from it.
"""
from __future__ import annotations

import json
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import runfiles
from ..atomic import write_text
from .gpu import GpuSampler
from .report import build_report
from .timers import StepTimer


class Profiler:
    """What ``--profile`` adds to a run."""

    def __init__(self, run_dir: Path, cfg, device: torch.device, rank: int):
        self.dir = run_dir / runfiles.REPORT_DIR
        self.cfg, self.device, self.rank = cfg, device, rank
        self.timer = StepTimer(device, enabled=True)
        self.gpu = GpuSampler(device.index or 0)
        self.trace = None
        self.trace_start = cfg.profiling.trace_start
        self.trace_stop = cfg.profiling.trace_start + cfg.profiling.trace_steps
        self.shape: dict | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gpu.start()

    def step_begin(self, step: int) -> None:
        if step == self.trace_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace = torch.profiler.profile(activities=activities)
            self.trace.__enter__()

    def step_end(self, step: int) -> None:
        if self.trace is not None and step + 1 == self.trace_stop:
            self.trace.__exit__(None, None, None)
            (self.dir / "traces").mkdir(exist_ok=True)
            self.trace.export_chrome_trace(str(self.dir / "traces" / f"rank{self.rank:05d}.json"))
            self.trace = None

    def finish(self, tr) -> None:
        """Gather every rank's phase times, write profile.json (rank 0) and build the report."""
        if self.trace is not None:
            self.step_end(self.trace_stop - 1)
        self.gpu.stop()
        phases = self.timer.resolve()
        gpu = self.gpu.summary()
        gathered = [(phases, gpu)]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (phases, gpu))
        if self.rank != 0:
            return
        raw = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(tr),
            "phases_per_rank": [p for p, _ in gathered],
            "gpu_per_rank": [g for _, g in gathered],
            "memory": memory_stats(self.device),
            "peak_flops_per_device": tr.peak_flops,
            "step_shape": self.shape,
        }
        write_text(self.dir / "profile.json", json.dumps(raw, indent=1))
        build_report(self.dir.parent)


def environment(tr) -> dict:
    import numpy

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    device = tr.device
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": tr.dims.world_size,
        "tp": tr.dims.tp,
        "dp": tr.dims.dp,
        **tr.backend.describe(),  # backend name, its version, its sharding (ZeRO stage / reshard)
        "dtype": str(tr.dtype).replace("torch.", ""),
        "micro_batch": tr.spec.batch.micro_batch,
        "grad_accum": tr.spec.batch.grad_accum,
        "global_batch": tr.spec.batch.global_batch,
        "batch_unit": tr.spec.batch.unit,
    }


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        s = torch.cuda.memory_stats(device)
        return {"kind": "cuda", "max_allocated_gb": s.get("allocated_bytes.all.peak", 0) / 1e9,
                "max_reserved_gb": s.get("reserved_bytes.all.peak", 0) / 1e9,
                "alloc_retries": s.get("num_alloc_retries", 0), "ooms": s.get("num_ooms", 0)}
    import resource

    return {"kind": "host", "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
