"""On a real GPU, a training step that neither logs nor saves makes no synchronisation torch
itself detects (``torch.cuda.set_sync_debug_mode``), on either backend: the GPU's check of what
tests/test_sync_free.py finds on the CPU with its dispatch-level detector.

One process, tiny_image on synthetic images, bf16 (tests/gpu/sync_debug_run.py): DeepSpeed ZeRO-1
and FSDP2 with fused AdamW, 8 steps logging at 4 and 8. Every sync in steps 1-3 and 5-7 must be
one of test_sync_free.KNOWN (matched on the call site; the GPU's warnings name no op), else the
test fails listing each with its stack. The KNOWN entries not seen here are printed, not failed:
torch's detection is documented as incomplete, the CPU detector is the one that keeps the list
short. Marked ``gpu``."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sync_detector import Sync
from test_sync_free import KNOWN

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("deepspeed", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_debug")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "DS_ACCELERATOR")}
    proc = subprocess.run([sys.executable, "tests/gpu/sync_debug_run.py", str(out / "out.json"), str(out / "run"),
                           ",".join(BACKENDS)], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "4"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads((out / "out.json").read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_that_neither_logs_nor_saves_makes_no_cuda_sync(runs, backend):
    data = runs[backend]
    syncs = [Sync(s["op"], s["stack"], s["step"]) for s in data["syncs"]]
    quiet = [s for s in syncs if s.tag not in data["log_steps"]]
    known = [dataclasses.replace(k, op="") for k in KNOWN["both"] + KNOWN[backend]]
    unexpected = [s for s in quiet if not any(k.matches(s) for k in known)]
    assert not unexpected, f"{backend}: CUDA syncs in steps that neither log nor save:\n" + "\n".join(
        f"[step {s.tag}] {s.describe()}" for s in unexpected)
    assert {s.tag for s in syncs} >= set(data["log_steps"]), "the log steps read back: the warnings were heard"
    print(f"{backend}: known syncs seen on the GPU: {[k.code for k in known if any(k.matches(s) for s in quiet)]}")
