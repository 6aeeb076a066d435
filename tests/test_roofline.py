"""The roofline counter (d2v2scale.profiling.roofline) and bench/roofline.py in CI-sized form:
FLOPs per phase against the analytic model (profiling/flops), kernels of an unfused variant, the
prediction rule on hand-computed kernels, the trace count that also sees compiled code; and
bench/efficiency.py, the GPU measurement's command, run on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from d2v2scale.config import load_config
from d2v2scale.data.synthetic import synthetic_batch
from d2v2scale.model import Data2Vec2, normalize_loss
from d2v2scale.planning.timing import load_calibration
from d2v2scale.profiling.flops import StepShape, forward_flops, step_flops
from d2v2scale.profiling.kernel_trace import HostWork, PhaseMarks, host_work
from d2v2scale.profiling.roofline import Device, OpCounter, by_phase, predict
from d2v2scale.profiling.timers import PHASES
from d2v2scale.train.teacher import build_teacher

ROOT = Path(__file__).resolve().parents[1]


def _count(model, cfg, source):
    teacher = build_teacher(model, cfg)
    mask = model.make_mask(0, 0, torch.arange(len(source)), source)
    counter = OpCounter()
    model.phase = counter.phase
    with counter:
        out = model(source, model.teacher_fn(teacher.module), mask)
        with counter.phase("backward"):
            normalize_loss(out).backward()
    return counter, StepShape(len(source), mask.mask.shape[1], mask.num_kept)


@pytest.mark.parametrize("preset", ["tiny_image", "tiny_audio", "tiny_text"])
def test_forward_flops_per_phase_equal_the_analytic_ones(preset):
    """The fused CPU attention and grouped convolutions included: exact per phase."""
    cfg = load_config(preset)
    torch.manual_seed(0)
    source = synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    counter, shape = _count(Data2Vec2(cfg.model_spec()).train(), cfg, source)
    phases = by_phase(counter, Device("test", 1e12, 1e12))
    want = forward_flops(cfg, shape, source.shape[-1])
    got = {k: phases[k].flops for k in ("teacher", "student", "local_encoder", "decoder_loss") if k in phases}
    assert got.get("local_encoder", 0.0) == pytest.approx(want["local_encoder"], rel=1e-9)
    assert (got["teacher"], got["student"], got["decoder_loss"]) == pytest.approx(
        (want["teacher"], want["student"], want["decoder"]), rel=1e-9)
    trained = want["local_encoder"] + want["student"] + want["decoder"]
    # backward = 2 × forward of what trains, less the input-gradient of the first layer nothing needs
    assert phases["backward"].flops == pytest.approx(2 * trained, rel=0.05)


class _UnfusedLayerNorm(nn.LayerNorm):
    """LayerNorm written out in elementwise steps: what a missing fused kernel costs."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def test_an_unfused_variant_shows_more_kernels_for_the_same_flops():
    cfg = load_config("tiny_image")
    source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fused = Data2Vec2(cfg.model_spec()).train()
    torch.manual_seed(0)
    unfused = Data2Vec2(cfg.model_spec()).train()
    norms = 0
    for module in unfused.modules():
        for name, child in module.named_children():
            if type(child) is nn.LayerNorm and child.elementwise_affine:
                setattr(module, name, _UnfusedLayerNorm(child.normalized_shape, child.eps))
                getattr(module, name).load_state_dict(child.state_dict())
                norms += 1
    assert norms
    a = by_phase(_count(fused, cfg, source)[0], Device("test", 1e12, 1e12))
    b = by_phase(_count(unfused, cfg, source)[0], Device("test", 1e12, 1e12))
    assert b["student"].kernels >= a["student"].kernels + 5 * cfg.model.depth  # ≥ 6 kernels for 1, per block norm
    assert b["student"].flops == a["student"].flops


def test_a_kernel_takes_its_bound_plus_the_launch():
    """A 4096² bf16 matmul (137 GFLOP, 100 MB) is compute-bound; a 1 GB add is memory-bound; a tiny
    add is launch-bound: times by hand on a 1 PFLOP/s, 1 TB/s, 5 µs device."""
    dev = Device("test", 1e15, 1e12, 5e-6)
    a = torch.zeros(4096, 4096, dtype=torch.bfloat16, device="meta")  # shapes only: nothing is computed
    big = torch.zeros(2**27, dtype=torch.float32, device="meta")  # 512 MB: read once (the same tensor), write once
    counter = OpCounter()
    with counter:
        a @ a
        big + big
        torch.ones(4, device="meta") + torch.ones(4, device="meta")
    mm, add = counter.groups[("other", "mm")], counter.groups[("other", "add")]
    p = predict(mm, dev)
    assert (p.kernels, p.bound) == (1, "compute")
    assert p.time_s == pytest.approx(2 * 4096**3 / 1e15 + 5e-6)
    q = predict(add, dev)
    assert q.kernels == 2 and q.memory_s == pytest.approx(2 * 2**29 / 1e12)
    assert q.launch_s == pytest.approx(2 * 5e-6 + 48 / 1e12)  # the tiny add: 3 × 16 bytes within its launch
    assert counter.syncs == 0
    with counter:
        a.t()  # a view: the host dispatches it, no kernel runs
    assert counter.host_ops["other"] == sum(g.calls for g in counter.groups.values()) + 1


def test_the_host_work_of_a_step_leaves_the_loader_out():
    """kernel_trace.host_work on a hand-made trace: each top-level aten call of the step is one host
    op (linear once, not its transpose and matmul), inside a phase or not; the loader's phase is the
    read-ahead thread's work in a GPU run, off the step's path, and is not counted."""
    a, w = torch.ones(4), torch.ones(3, 4)
    marks = PhaseMarks()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with marks.phase(PHASES[0]):
            (a + 1) * 2
        with marks.phase("optimizer"):
            a.add_(1)
            torch.nn.functional.linear(a, w)
        a.mul(3)
    assert host_work(prof.events()) == HostWork(eager_ops=3, region_calls=0, region_kernels=0)


@pytest.mark.slow
def test_the_bench_counts_the_real_step_and_extrapolates_the_depth(tmp_path):
    """bench/roofline.py on tiny_audio (depth 3, counted at 1 and 2), FSDP2 backend: per-phase FLOPs
    of the extrapolated step within 5 % of the analytic model at depth 3; every phase of the step
    present; the optimizer step and the EMA update dispatch as many host ops at depth 2 as at depth 1
    (foreach and fused kernels over every parameter, no per-parameter views or casts)."""
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, "bench/roofline.py", "--preset", "tiny_audio", "--micro", "4",
                           "--ds_config", "ds_configs/cpu_tiny.json", "--json", str(out), "parallel.backend=fsdp2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["depths"] == [1, 2] and "the ten most expensive op groups" in proc.stdout
    phases, shape = report["phases"], report["shape"]
    cfg = load_config("tiny_audio")
    want = forward_flops(cfg, StepShape(shape["samples"], shape["positions"], shape["kept"]), shape["input_len"])
    for ours, theirs in (("teacher", "teacher"), ("student", "student"), ("decoder_loss", "decoder"),
                         ("local_encoder", "local_encoder")):
        assert phases[ours]["flops"] == pytest.approx(want[theirs], rel=0.05), ours
    trained = want["local_encoder"] + want["student"] + want["decoder"]
    assert phases["backward"]["flops"] == pytest.approx(2 * trained, rel=0.05)
    assert all(phases[p]["kernels"] > 0 for p in ("optimizer", "ema", "backward"))
    assert report["host_ops"] > sum(row["kernels"] for row in phases.values())  # views cost the host too
    shallow, deep = report["host_ops_counted"]
    assert deep["backward"] > shallow["backward"]  # a block's backward is the host's work
    assert (deep["optimizer"], deep["ema"]) == (shallow["optimizer"], shallow["ema"]) != (0, 0)


def test_the_efficiency_bench_times_the_deepspeed_step_and_fits_the_fixed_cost(tmp_path):
    """bench/efficiency.py (gpu_check.py --efficiency) on the CPU: the step of tiny_image at three
    micro-batch sizes. Its FLOPs are the analytic step's for the shapes it ran, its fixed cost the
    least-squares intercept of its own times (by the normal equations here), its calibration file is
    one the planner reads, and its kernel count does not grow with the micro-batch."""
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--efficiency", "--device", "cpu", "--runs",
                           "tiny_image:1/2/4", "--modes", "eager", "--calibrate_with", "eager", "--steps", "2",
                           "--ds_config", "ds_configs/cpu_tiny.json", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["micro_batch"] for r in runs] == [1, 2, 4]
    assert all(r["mode"] == "eager" and r["backend"] == "deepspeed" for r in runs)
    cfg = load_config("tiny_image")
    for r in runs:
        s = r["shape"]
        assert r["flops_per_micro_batch"] == pytest.approx(
            step_flops(cfg, StepShape(r["micro_batch"], s["positions"], s["kept"]), s["input_len"]), rel=1e-9)
        assert r["efficiency"] == pytest.approx(r["flops_per_micro_batch"] / (r["step_s"] * r["peak_flops"]))
        assert 0.5 * r["step_s"] < sum(r["phases_s"].values()) <= 1.05 * r["step_s"]  # the phases are the step
        assert set(r["phases_s"]) <= set(PHASES) and {"teacher", "student", "optimizer", "ema"} <= set(r["phases_s"])
    assert runs[1]["kernels"] == runs[2]["kernels"] > 0  # the same kernels whatever the batch
    x = [r["micro_batch"] for r in runs]
    y = [r["step_s"] for r in runs]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    fit = report["fixed_cost"]["tiny_image/eager"]
    assert fit["fixed_s_per_micro_batch"] == pytest.approx(my - slope * mx, rel=1e-6)
    assert fit["s_per_item"] == pytest.approx(slope, rel=1e-6)
    curve = load_calibration(str(out), "cpu")
    assert [f for f, _ in curve.points] == sorted(r["flops_per_micro_batch"] for r in runs)
    assert "fixed cost per micro-batch" in proc.stdout
    bad = subprocess.run([sys.executable, "bench/gpu_check.py", "--efficiency", "--runs", "vit_h:eight"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--runs" in bad.stderr
    measured = tmp_path / "measured.json"  # the roofline refuses to mix predicted points into a measured file
    measured.write_text(json.dumps({"gpu": "a100-40gb", "points": []}))
    bad = subprocess.run([sys.executable, "bench/roofline.py", "--ds_config", "ds_configs/cpu_tiny.json", "--device",
                          "a100-40gb", "--calibration", str(measured)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "measured" in bad.stderr


@pytest.mark.slow
def test_the_trace_counts_what_the_dispatch_counter_does_and_fewer_kernels_compiled(tmp_path):
    """bench/roofline.py --compiled on tiny_image: the profiler-trace count (kernel_trace) equals the
    dispatch-mode count phase by phase on the eager step - two counters that share no code - and the
    compiled step leaves fewer kernels where inductor compiles (blocks, decoder, tensor math), the
    same where it does not (optimizer, EMA update)."""
    out = tmp_path / "roofline.json"
    proc = subprocess.run([sys.executable, "bench/roofline.py", "--preset", "tiny_image", "--micro", "4", "--depths",
                           "0", "--compiled", "--ds_config", "ds_configs/cpu_tiny.json", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(out.read_text())["phases"]
    for name, row in phases.items():
        assert row["traced_kernels"] == row["kernels"], name
    for name in ("teacher", "student", "decoder_loss", "backward"):
        assert phases[name]["compiled_kernels"] < phases[name]["kernels"], name
    for name in ("optimizer", "ema"):
        assert phases[name]["compiled_kernels"] == phases[name]["kernels"], name
    assert "compiled (model.compile=true" in proc.stdout
    # The host's work in the compiled step, counted by hand: forward, the teacher's and the student's
    # blocks, the decoder and the three tensor-math methods; backward, the student's blocks, the
    # decoder and the losses (the targets need no gradient).
    report = json.loads(out.read_text())
    host, cfg = report["host_compiled"], load_config("tiny_image")
    blocks = cfg.model.depth + cfg.model.prenet_depth
    assert host["region_calls"] == (2 * blocks + 1 + 3) + (blocks + 2)
    assert 0 < host["outside_ops"] < report["host_ops"]  # the regions took some of the dispatching
    assert host["region_kernels"] < sum(row["compiled_kernels"] for row in phases.values())  # the optimizer's are not
    assert host["graphs"] == pytest.approx((host["outside_ops"] * 20 + host["region_calls"] * 40) * 1e-6)
    assert host["compiled"] == pytest.approx(host["graphs"] + host["region_kernels"] * 5e-6)
