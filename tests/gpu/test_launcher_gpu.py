"""The path users run, on one GPU: the ``deepspeed`` launcher with a GPU ds_config (bf16, ZeRO-1,
fused AdamW) and ``model.compile=true``, then ``torchrun`` resuming that checkpoint on the FSDP2
backend. A cut-down ViT-B on synthetic images keeps it to about a minute. Marked ``gpu``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2v2scale.runfiles import read_metrics
from test_deepspeed_training import _port, _torchrun

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.kind=synthetic", "model.depth=4", "model.prenet_depth=0", "model.average_top_k_layers=4",
         "train.global_batch=16", "train.log_every=5", "train.save_every=10", "train.allow_long_warmup=true"]


def _launch(prefix: list[str], run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*prefix, "launchers/pretrain.py", "--ds_config", "ds_configs/vit_b.json", "--preset", "vit_b",
           "--run_dir", str(run_dir), "--profile", *SMALL, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_deepspeed_bf16_compiled_run_then_fsdp2_resume(tmp_path):
    run = tmp_path / "run"
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(_port())]
    _launch(deepspeed, run, "train.max_updates=10", "model.compile=true")
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10]
    for r in rows:
        assert all(isinstance(v, float) and abs(v) < 1e4 for v in (r["loss"], r["grad_norm"])), r  # "nan" is a str
        assert r["mfu"] is not None and r["mfu"] > 0 and r["mem_peak_gb"] > 0.1, r
    assert (run / "checkpoints" / "step_00000010").is_dir() and (run / "report" / "report.md").is_file()
    print(f"deepspeed bf16 ZeRO-1 compiled, steps 6-10 (profiler trace on 5-7): "
          f"{rows[-1]['step_time_s'] * 1e3:.0f} ms/step, peak {rows[-1]['mem_peak_gb']:.1f} GB")

    proc = _launch(_torchrun(1), run, "train.max_updates=20", "parallel.backend=fsdp2", "--resume", "auto")
    out = proc.stdout + proc.stderr
    assert "backend deepspeed → fsdp2" in out and "resumed from" in out and "step_00000010" in out
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # continued at 10, nothing repeated
    assert all(isinstance(r["loss"], float) for r in rows)  # finite: non-finite values are written as strings
    assert (run / "checkpoints" / "step_00000020").is_dir()
    print(f"fsdp2 bf16 eager after resume, steps 16-20: {rows[-1]['step_time_s'] * 1e3:.0f} ms/step")
