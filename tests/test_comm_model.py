"""The planner's communication model against the bytes real training steps move.

``tests/dist/comm_bytes.py`` wraps torch.distributed's collectives before DeepSpeed is imported
and records one step (not the first, not a log or checkpoint step) of real CPU/gloo training.
The planner predicts the same payloads from the config alone (:mod:`d2v2scale.planning.comm`).
5 %: the model leaves out only DeepSpeed's few-kilobyte ZeRO-3 control broadcasts, FSDP2's
padding of each weight's dim 0 to a multiple of dp, and rounds the scalar all-reduces; every
large term is an exact count. ``fsdp2``: the FSDP2 backend, resharding after forward.
"""
import json

import pytest

from d2v2scale.config import load_config
from d2v2scale.planning.memory import param_counts
from d2v2scale.planning.comm import bytes_by_kind, step_collectives
from d2v2scale.profiling.flops import StepShape
from d2v2scale.run_spec import ZeroSpec

from test_deepspeed_training import _launch, _torchrun

PRESETS = "tiny_image,tiny_audio"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comm")
    # 2 micro-batches per step at dp=2 tell ZeRO-2's per-micro-batch reduction from ZeRO-1's
    _launch(_torchrun(2), "tests/dist/comm_bytes.py", str(tmp / "dp2.json"), PRESETS, "1", "1,2,3,fsdp2", "2")
    _launch(_torchrun(4), "tests/dist/comm_bytes.py", str(tmp / "tp2dp2.json"), PRESETS, "2", "1,2,fsdp2", "1")
    return {(1, 2): json.loads((tmp / "dp2.json").read_text()), (2, 2): json.loads((tmp / "tp2dp2.json").read_text())}


CASES = [(1, 2, p, s) for p in PRESETS.split(",") for s in ("1", "2", "3", "fsdp2")] + \
        [(2, 2, p, s) for p in PRESETS.split(",") for s in ("1", "2", "fsdp2")]


@pytest.mark.slow
@pytest.mark.parametrize("tp,dp,preset,stage", CASES)
def test_predicted_bytes_match_a_real_step(measured, tp, dp, preset, stage):
    run = measured[(tp, dp)][preset][stage]
    backend = "fsdp2" if stage == "fsdp2" else "deepspeed"
    cfg = load_config(preset, [f"parallel.tp={tp}", f"parallel.backend={backend}"])
    zero = ZeroSpec(stage=3 if stage == "fsdp2" else int(stage))  # cpu_tiny.json's other ZeRO keys are defaults
    shape = StepShape(run["micro_batch"], run["positions"], run["kept"])
    predicted = bytes_by_kind(step_collectives(cfg, zero, False, shape, run["grad_accum"], param_counts(cfg, tp), tp, dp),
                              tp, dp)
    got = run["totals"]
    total = sum(got.values())
    assert sum(predicted.values()) == pytest.approx(total, rel=0.05)
    for key, value in got.items():
        if value >= 0.01 * total:
            assert predicted.get(key, 0.0) == pytest.approx(value, rel=0.05), (key, predicted, got)
    if tp > 1:  # the activation all-reduces are there, and they dominate
        assert got["all_reduce@tp"] > 0.5 * total
