"""--profile on 2 CPU processes: report.md sections filled from measurements, report.json with the
same numbers, PNGs that open; the report rebuilds from the run directory alone."""
import json
import struct

import pytest

from d2v2scale.profiling.report import build_report
from d2v2scale.profiling.timers import PHASES, StepTimer

from test_deepspeed_training import _launch, _torchrun


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


@pytest.mark.slow
def test_profile_run_writes_a_complete_report(tmp_path):
    run_dir = tmp_path / "run"
    _launch(_torchrun(2), "launchers/pretrain.py", "--ds_config", "ds_configs/cpu_tiny.json", "--preset", "tiny_image",
            "--run_dir", str(run_dir), "--profile", "train.max_updates=10", "train.allow_long_warmup=true", "train.log_every=2",
            "profiling.trace_start=4", "profiling.trace_steps=2")
    report_dir = run_dir / "report"
    report = json.loads((report_dir / "report.json").read_text())
    md = (report_dir / "report.md").read_text()
    for name in ("loss.png", "throughput.png", "memory.png", "breakdown.png"):
        w, h, size = _png_size(report_dir / name)
        assert w >= 300 and h >= 200 and size > 5000
    assert {p.name for p in (report_dir / "traces").iterdir()} == {"rank00000.json", "rank00001.json"}
    # every phase was measured on both ranks, and the markdown shows the JSON's numbers
    phases = report["phases"]
    assert all(phases[name]["mean"] > 0 for name in PHASES)
    assert f"{phases['backward']['mean'] * 1e3:.3g}" in md
    assert f"{report['throughput']['samples_per_s']['mean']:.3g}" in md
    assert report["throughput"]["tflops_per_device"]["mean"] > 0 and 0 < report["throughput"]["mfu"]["mean"] < 2
    assert report["environment"]["world_size"] == 2 and report["environment"]["deepspeed"]
    assert "not available" in md  # NVML on a machine without a GPU
    assert "n/a" not in md.split("## Step-time breakdown")[1].split("## Memory")[0]
    # rebuilt from the files alone, the numbers are the same
    rebuilt = build_report(run_dir)
    assert rebuilt["throughput"] == report["throughput"] and rebuilt["phases"] == report["phases"]


def test_disabled_timer_records_nothing():
    import torch

    timer = StepTimer(torch.device("cpu"), enabled=False)
    with timer.phase("teacher"):
        pass
    timer.end_step()
    assert timer.resolve() == [] and timer.phase("x") is timer.phase("y")
