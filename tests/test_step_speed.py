"""What makes the step fast must not change what it computes: regional torch.compile (also in the
CUDA-graph mode, ``model.cuda_graphs``: on the CPU the same regions without graphs) and the fused
AdamW against the eager, unfused step (same process, same data, masks and initialisation).

Tolerances: fp32. Inductor fuses and reorders elementwise work (different rounding, ~1e-7 relative
per step), and fused AdamW evaluates the same update formula in one kernel; over 5 steps the loss
stays within 1e-5 (compile) and 1e-6 (fused optimizer), while a real difference (a block compiled
with stale weights, a missed bias correction) moves it by > 1e-3. That the compiled run did run
compiled code is checked too: dynamo holds cache entries for the block, the decoder and the
model's tensor math (none after the eager run).
"""
import json
import sys

import pytest

from test_deepspeed_training import _launch




def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_compiled_and_fused_steps_match_eager(tmp_path, preset):
    # the graphs mode is a flag of the same compile (on a CPU it runs without graphs): one modality shows it
    runs = "1,1+compile" + (",1+compile+graphs,1+fused" if preset == "tiny_image" else "")
    _launch([sys.executable], "tests/dist/zero_stages.py", str(tmp_path / "out.json"), preset, "auto", "auto", runs, "1",
            "train.max_updates=5", "model.mask_noise_std=0", timeout=600)
    out = json.loads((tmp_path / "out.json").read_text())
    eager = out["1"]
    assert eager["compiled"] == []  # the eager run came first: nothing compiled yet
    decoder = "Decoder2d" if preset == "tiny_image" else "Decoder1d"
    assert out["1+compile"]["compiled"] == sorted(["Block.forward", f"{decoder}.forward", "Data2Vec2.targets_from",
                                                  "Data2Vec2.losses"])
    assert out["1+compile"]["compile_modes"] == [None]
    if preset == "tiny_image":
        assert out["1+compile+graphs"]["compile_modes"] == ["reduce-overhead"]
    for run, tol in (("1+compile", 1e-5), ("1+compile+graphs", 1e-5), ("1+fused", 1e-6)):
        if run not in out:
            continue
        for got, want in zip(out[run]["losses"], eager["losses"], strict=True):
            assert _rel(got[0], want[0]) < tol and _rel(got[3], want[3]) < tol, (run, got, want)
        for name, norm in eager["teacher_norms"].items():
            assert _rel(out[run]["teacher_norms"][name], norm) < tol, (run, name)


def test_schedule_and_counter_rng_give_the_same_numbers_on_host_and_device_paths():
    """The tensor form of the LR schedule equals DeepSpeed's Python formula at every iteration, and
    the Python-int counter RNG equals the tensor one (both feed steps that must not read back)."""
    import torch

    from d2v2scale import counter_rng
    from d2v2scale.train.lr_schedule import WarmupCosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for kind in ("linear", "log"):
        sched = WarmupCosine(opt, total_num_steps=50, warmup_num_steps=10, warmup_min_ratio=0.1, cos_min_ratio=0.01,
                             warmup_type=kind)
        for it in range(-1, 60):
            assert sched.ratio_tensor(torch.tensor(float(it), dtype=torch.float64)).item() == pytest.approx(
                sched.ratio(it), rel=1e-12, abs=1e-15), (kind, it)
    for parts in [(1, 5), (7, 123456789012, 3), (2**40 + 5, 9)]:
        assert counter_rng.combine(*parts) == int(counter_rng.combine(*[torch.tensor(p) for p in parts]))
    assert counter_rng.uniform_row(12345, 9, 3) == counter_rng.uniform(torch.tensor([12345]), 9, 3)[0].tolist()
