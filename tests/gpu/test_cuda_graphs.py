"""``model.compile=true model.cuda_graphs=true`` on a real GPU: the step computes what the eager
step does, its CUDA graphs are recorded once and replayed after, and the engine's
``torch.compiler.cudagraph_mark_step_begin()`` before each micro-batch is what makes that work.

tests/gpu/cuda_graph_run.py trains tiny_image 5 steps of 2 micro-batches, fp32, through the real
trainer (DeepSpeed ZeRO-1), eager and with graphs in one process, and with graphs but the mark
made a no-op in another (CUDA graph trees are per process).

Why the mark. CUDA graph trees keep the outputs of every recorded graph in one memory pool and
hand it over to the next "generation" of calls. Without a mark, a generation begins at every
compiled call made while no compiled forward awaits its backward: so at each of the teacher's
blocks, which run without grad, one compiled region after another. Each such call frees the
outputs of the blocks before it — the hidden state the next block reads and the FFN outputs the
targets are averaged from — and reading one raises "accessing tensor output of CUDAGraphs that
has been overwritten by a subsequent run" (unchecked, it would read another block's numbers).
Marked once per micro-batch, the whole micro-batch (teacher, student, decoder, losses, backward)
is one generation: one path of the tree, recorded once and replayed.

Tolerance (fp32): compiled and eager differ in how inductor fuses and orders element-wise work and
reductions; matmuls and convolutions are the same cuBLAS/cuDNN calls. Measured on the CPU (same
regions, no graphs) over these 5 steps: ≤ 1e-7 relative on the loss and gradient norm; 1e-4
allows the GPU's other reduction orders and is far under what a stale replay moves: with the
warm-up cut to one step the loss moves 0.2-1.3 % a step, so a graph replayed with last step's
weights or another block's outputs is off by > 1e-3. Marked ``gpu``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
REPLAY_FROM = 2  # step index: step 1 warms every region up, then records; steps 3+ only replay


def _run(out: Path, variants: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "DS_ACCELERATOR")}
    proc = subprocess.run([sys.executable, "tests/gpu/cuda_graph_run.py", str(out), variants], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_graphs")
    return {**_run(out / "marked.json", "eager,graphs"), **_run(out / "unmarked.json", "graphs-unmarked")}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def problems(run: dict, eager: dict) -> list[str]:
    """What is wrong with a graphs run: an error, a step off the eager one, a graph recorded after
    the first steps, replays that are not the same every step."""
    if run["error"]:
        return [f"stopped: {run['error']}"]
    found = []
    for step, (got, want) in enumerate(zip(run["rows"], eager["rows"], strict=True), start=1):
        for key in ("loss", "loss_reg", "loss_cls", "grad_norm"):
            if _rel(got[key], want[key]) >= TOL:
                found.append(f"step {step} {key}: {got[key]} vs eager {want[key]}")
    if sum(run["recorded"][:REPLAY_FROM]) == 0:
        found.append(f"no graph recorded in the first steps: {run['recorded']}")
    if any(run["recorded"][REPLAY_FROM:]):
        found.append(f"graphs recorded again after step {REPLAY_FROM}: {run['recorded']}")
    later = run["replayed"][REPLAY_FROM:]
    if not later or min(later) == 0 or len(set(later)) != 1:
        found.append(f"replays per step not constant and > 0 after step {REPLAY_FROM}: {run['replayed']}")
    return found


def test_graph_steps_equal_eager_steps_recorded_once_replayed_after(runs):
    eager = runs["eager"]
    assert eager["error"] is None and sum(eager["recorded"]) == 0, eager
    assert not problems(runs["graphs"], eager), problems(runs["graphs"], eager)


def test_without_the_step_mark_the_graphs_run_fails(runs):
    """The same checks fail when ``cudagraph_mark_step_begin`` does nothing (module docstring)."""
    found = problems(runs["graphs-unmarked"], runs["eager"])
    assert found, "graphs without the step mark passed every check: the engine's mark would be unneeded"
    print("without the mark:", *found, sep="\n  ")
