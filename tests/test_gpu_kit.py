"""The GPU acceptance kit is present and honest on a machine without CUDA: the check says so in
one line and exits 0, and every ``gpu`` test is collected and reported as skipped, never absent."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_tests_are_collected():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/gpu"],
                         cwd=ROOT, capture_output=True, text=True)
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(collected) >= 13, out.stdout  # bf16 ×3, DALI mixed, timers, NVML, RNG, NCCL, launcher, sync ×2, graphs ×2
    names = {line.split("::")[1].split("[")[0] for line in collected}
    assert {"test_a_step_that_neither_logs_nor_saves_makes_no_cuda_sync",  # tests/gpu/test_sync_debug.py
            "test_graph_steps_equal_eager_steps_recorded_once_replayed_after",  # tests/gpu/test_cuda_graphs.py
            "test_without_the_step_mark_the_graphs_run_fails"} <= names, out.stdout


def test_without_cuda_the_kit_says_so_and_skips():
    if torch.cuda.is_available():  # on a GPU machine, bench/gpu_check.py itself is the test
        return
    check = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().splitlines() == [
        "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to check"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/gpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0 and " skipped" in run.stdout and "passed" not in run.stdout
    assert "needs a CUDA GPU" in run.stdout


def test_bad_kit_arguments_are_one_line_and_exit_2():
    """Checked before the CUDA check, so a typo fails here, not minutes into a GPU lease."""
    for args, needle in ((["--speed", "vit_b"], "expected preset:micro-batch"),
                         (["--speed", "vitb:16"], "unknown preset 'vitb'"),
                         (["--presets", "vit_l,nope"], "unknown preset 'nope'")):
        out = subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout, out.stderr)
        assert out.stderr.startswith("gpu_check: error: ") and needle in out.stderr and len(out.stderr.splitlines()) == 1
