"""NVML sampler: GPU utilisation, memory, power and clocks in a background thread.

Without NVML (no NVIDIA driver, e.g. CI) :attr:`GpuSampler.available` is False and the report
says "not available"; nothing fails.
"""
from __future__ import annotations

import threading
import time


class GpuSampler:
    def __init__(self, device_index: int, interval_s: float = 1.0):
        self.samples: list[dict] = []
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.interval_s = interval_s
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, ImportError, ...
            self._nvml = None
            self.name = None
            self.reason = f"{type(e).__name__}: {e}"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def start(self) -> None:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            self.samples.append({
                "t": time.time(),
                "gpu_util_pct": util.gpu,
                "mem_used_gb": mem.used / 1e9,
                "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            })
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        if not self.samples:
            return {"available": True, "name": self.name, "samples": 0}
        keys = ("gpu_util_pct", "mem_used_gb", "power_w", "sm_clock_mhz")
        return {"available": True, "name": self.name, "samples": len(self.samples),
                **{f"mean_{k}": sum(s[k] for s in self.samples) / len(self.samples) for k in keys},
                **{f"max_{k}": max(s[k] for s in self.samples) for k in keys}}
