"""Every DeepSpeed internal d2v2scale touches, checked on real engines of the installed version;
a DeepSpeed without one fails at start-up with its version named, never a silent fallback."""
import json
import sys

import pytest

from d2v2scale.train.backend.deepspeed import DEEPSPEED_INTERNALS, require_internals

from test_deepspeed_training import _launch


def test_installed_deepspeed_has_every_internal_we_read(tmp_path):
    _launch([sys.executable], "tests/dist/ds_internals.py", str(tmp_path / "out.json"))
    checked = json.loads((tmp_path / "out.json").read_text())
    assert {h for v in checked.values() for h in v["holders"]} == set(DEEPSPEED_INTERNALS)
    assert all(v["step_applied"] for v in checked.values())
    for run in ("1/fp32", "2/bf16"):  # ZeRO-1/2: the backend's foreach norm equals DeepSpeed's per group
        pairs = checked[run]["grad_norms"]
        assert len(pairs) >= 2 and all(theirs > 0 for theirs, _ in pairs), pairs
        for theirs, ours in pairs:  # fp32 sums of the same ~1e5 squares in another order: ≤ 4e-7 seen
            assert abs(ours - theirs) <= 1e-5 * theirs, (run, theirs, ours)


def test_a_missing_internal_names_the_deepspeed_version():
    import deepspeed

    class Optimizer:  # a future DeepSpeed that renamed single_partition_of_fp32_groups
        bit16_groups = bit16_groups_flat = []

    with pytest.raises(RuntimeError, match=f"DeepSpeed {deepspeed.__version__}.*single_partition_of_fp32_groups"):
        require_internals(Optimizer(), "ZeRO-1/2 optimizer")
