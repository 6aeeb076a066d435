"""GPU acceptance and planner calibration, in one command on any CUDA machine (≤ 10 min, one GPU).

    python bench/gpu_check.py [--out calibration.json] [--presets vit_l,vit_h,audio_large] [--micro 1,2,4,8]
    make gpu-check

1. Runs the tests marked ``gpu`` (tests/gpu): bf16 CUDA step vs the fp32 CPU step, DALI ``mixed``
   decode vs CPU decode, CUDA-event timers, NVML sampling, bit-exact CUDA RNG resume, NCCL
   collectives over every visible GPU, and the launcher path (deepspeed bf16 ZeRO-1 compiled, then
   torchrun FSDP2 resuming its checkpoint).
2. Times the step eager and with ``model.compile=true`` (``--speed preset:micro,...``).
3. Times the single-GPU training step (bf16 autocast, fused AdamW, EMA update) of each preset at
   micro-batches 1–8. Full-depth models may not fit one GPU, so each is timed at two cut depths
   and scaled back analytically: per-block time = (t(8) − t(4)) / 4, full = t(4) + per-block ×
   (all blocks − 4). (At depths 2 and 4 an H200 step was launch-bound and the difference noise.)
   Efficiency = the full model's FLOPs / (full time × peak).
4. Writes ``calibration.json`` for ``python -m d2v2scale.plan --calibration`` and prints the table.

``--efficiency`` instead runs ``bench/efficiency.py`` (its flags follow): the full-depth step of
``vit_h`` (micro-batch 1, 2, 4, 8), ``vit_l`` (8) and ``audio_large`` on the DeepSpeed path with the
preset's JSON, bf16, compiled, compiled and replayed as CUDA graphs, compiled on FSDP2, and eager: step
time, MFU, phase split, kernels, the fixed cost per micro-batch, and ``calibration.json`` from those runs.

Without CUDA it prints one line and exits 0. Exit 1 when a ``gpu`` test fails.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2v2scale.cli import fail  # noqa: E402
from d2v2scale.config import ConfigError, load_config  # noqa: E402
from d2v2scale.data.synthetic import synthetic_batch  # noqa: E402
from d2v2scale.model import Data2Vec2, normalize_loss  # noqa: E402
from d2v2scale.planning.planner import positions_per_item  # noqa: E402
from d2v2scale.profiling.flops import PEAK_FLOPS, StepShape, step_flops  # noqa: E402
from d2v2scale.train.teacher import build_teacher  # noqa: E402
from d2v2scale.train.compile import apply_compile  # noqa: E402

import efficiency  # noqa: E402  (bench/, this script's folder)

CUT_DEPTHS = (4, 8)
DEVICE = "cuda"


def time_step(preset: str, micro: int, depth: int, steps: int = 5, compile_: bool = False) -> float:
    """Seconds of one forward + backward + AdamW + EMA step at a cut depth (CUDA events); with
    ``compile_``, regional compile of student and teacher (the warm-up steps compile)."""
    full = load_config(preset)
    cfg = load_config(preset, [f"model.depth={depth}", "model.prenet_depth=0",
                               f"model.average_top_k_layers={min(depth, full.model.average_top_k_layers)}"])
    device = torch.device(DEVICE)
    model = Data2Vec2(cfg.model_spec()).to(device).train()
    teacher = build_teacher(model, cfg)
    if compile_:
        apply_compile(model)
        apply_compile(teacher.module)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    source = synthetic_batch(cfg, micro, torch.Generator().manual_seed(0)).to(device)
    mask = model.make_mask(0, 0, torch.arange(micro), source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(2 + steps):
        if i == 2:
            start.record()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = normalize_loss(model(source, model.teacher_fn(teacher.module), mask))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(i + 1, model)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def calibrate(presets: list[str], micros: list[int], peak: float) -> list[dict]:
    points = []
    for preset in presets:
        full = load_config(preset)
        blocks = full.model.depth + full.model.prenet_depth
        for micro in micros:
            try:
                t_lo, t_hi = (time_step(preset, micro, d, steps=10) for d in CUT_DEPTHS)
            except torch.OutOfMemoryError:
                print(f"  {preset} micro {micro}: out of memory at depth {CUT_DEPTHS[-1]}, skipped", flush=True)
                torch.cuda.empty_cache()
                continue
            per_block = (t_hi - t_lo) / (CUT_DEPTHS[1] - CUT_DEPTHS[0])
            step_s = t_lo + per_block * (blocks - CUT_DEPTHS[0])
            source = synthetic_batch(full, micro, torch.Generator().manual_seed(0))
            t = positions_per_item(full, source.shape[-1])  # the raw length (audio samples); others ignore it
            kept = int(t * (1 - full.masking.mask_prob))
            flops = step_flops(full, StepShape(micro, t, kept), source.shape[-1])
            points.append({"preset": preset, "micro_batch": micro, "flops_per_micro_batch": flops,
                           "step_s": step_s, "efficiency": flops / (step_s * peak)})
            print(f"  {preset:<12} micro {micro}: {step_s:.3f} s/step (blocks {t_lo:.3f}/{t_hi:.3f} s at depth "
                  f"{CUT_DEPTHS}), {flops:.2e} FLOPs, efficiency {points[-1]['efficiency']:.1%}", flush=True)
    return points


def speed_specs(text: str) -> list[tuple[str, int]]:
    """``--speed`` as (preset, micro-batch) pairs: ``vit_b:16,audio_base:4``; '' for none."""
    pairs = []
    for spec in filter(None, text.split(",")):
        preset, _, micro = spec.partition(":")
        if not micro.isdigit() or int(micro) < 1:
            raise ValueError(f"--speed {spec!r}: expected preset:micro-batch, e.g. vit_b:16")
        load_config(preset)  # an unknown preset is a ConfigError naming the shipped ones
        pairs.append((preset, int(micro)))
    return pairs


def compile_speedup(specs: list[tuple[str, int]]) -> None:
    """``model.compile=true`` against eager, same step, one process: ``preset:micro`` at depth 4."""
    print("compiled vs eager (one GPU, bf16, depth 4, mean of 20 steps after 2 warm-up steps):", flush=True)
    for preset, micro in specs:
        eager, compiled = (time_step(preset, micro, 4, steps=20, compile_=c) for c in (False, True))
        print(f"  {preset:<12} micro {micro}: eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms, "
              f"compiled/eager {compiled / eager:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--efficiency" in argv:  # the full-depth DeepSpeed-path measurement (bench/efficiency.py), its flags after
        return efficiency.main([a for a in argv if a != "--efficiency"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="calibration.json")
    p.add_argument("--presets", default="vit_l,vit_h,audio_large")
    p.add_argument("--micro", default="1,2,4,8")
    p.add_argument("--speed", default="vit_b:16,audio_base:4,text_base:16",
                   help="preset:micro pairs timed eager vs compiled ('' to skip)")
    p.add_argument("--skip_tests", action="store_true")
    args = p.parse_args(argv)
    try:
        speed = speed_specs(args.speed)
        presets = args.presets.split(",")
        for preset in presets:
            load_config(preset)
    except (ValueError, ConfigError) as e:
        return fail("gpu_check", e)
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing to check")
        return 0
    key = efficiency.gpu_name()
    print(f"gpu_check: {torch.cuda.get_device_name(0)} ({key}), {torch.cuda.device_count()} GPU(s), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    tests_ok = True
    if not args.skip_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-m", "gpu", "tests/gpu"], cwd=ROOT)
        tests_ok = proc.returncode == 0
    if speed:
        compile_speedup(speed)
    print("calibration (one GPU, bf16):", flush=True)
    points = calibrate(presets, [int(m) for m in args.micro.split(",")], PEAK_FLOPS[key])
    Path(args.out).write_text(json.dumps({"gpu": key, "device_name": torch.cuda.get_device_name(0),
                                          "points": points}, indent=1))
    print(f"wrote {args.out} ({len(points)} points): python -m d2v2scale.plan --calibration {args.out} ...")
    print("| preset | micro-batch | s/step (full depth) | model TFLOP/step | efficiency |\n|---|---|---|---|---|")
    for q in points:
        print(f"| {q['preset']} | {q['micro_batch']} | {q['step_s']:.3f} | {q['flops_per_micro_batch'] / 1e12:.1f} "
              f"| {q['efficiency']:.1%} |")
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
