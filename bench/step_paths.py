"""The step users run against the plain step, side by side in one process (1 CPU thread, or one GPU).

- ``plain``: the data2vec 2.0 step written directly — the same data loader, masks, teacher,
  student, decoder, backward, clipping, AdamW, EMA — on one model, no engine;
- ``deepspeed ZeRO-k``: the same step through ``d2v2scale.train.engine.train_step`` and the
  DeepSpeed backend built from ``ds_configs/cpu_tiny.json`` at stage k (one process);
- ``fsdp2``: the same through the FSDP2 backend;
- ``+compile``: with ``model.compile=true`` (regional torch.compile of every block, the decoder and
  the model's tensor math).

Variants run round-robin so machine noise hits them alike; the median after warm-up (which
includes compilation) is reported with the ratio to the plain eager step (the median of the
per-round ratios: each round's steps ran back to back, so a slow spell of the machine cancels),
model FLOPs utilisation against this CPU's measured fp32 matmul rate, and the phase split of the
DeepSpeed ZeRO-1 step.

    python bench/step_paths.py [--preset tiny_image] [--batch 8] [--clones 8] [--steps 10] [overrides]
    python bench/step_paths.py --preset vit_b --ds_config ds_configs/vit_b.json --batch 16 --clones 16 \
        model.depth=4 model.prenet_depth=0 model.average_top_k_layers=4      # on a GPU (bf16 from the JSON)
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from d2v2scale.cli import fail  # noqa: E402
from d2v2scale.config import ConfigError, load_config  # noqa: E402
from d2v2scale.data.loader import StepLoader  # noqa: E402
from d2v2scale.data.schedule import RankSchedule  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.modality_registry import batch_budget  # noqa: E402
from d2v2scale.model import Data2Vec2, normalize_loss  # noqa: E402
from d2v2scale.profiling.flops import StepShape, device_peak_flops, step_flops  # noqa: E402
from d2v2scale.profiling.timers import PHASES, StepTimer  # noqa: E402
from d2v2scale.train.teacher import build_teacher  # noqa: E402
from d2v2scale.train.compile import apply_compile  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402
from d2v2scale.train.optim import param_groups  # noqa: E402


def plain(cfg, ds: dict, compile_: bool, device: torch.device):
    """The step without an engine: the reference's structure, the ds_config's optimizer, clipping and
    precision (bf16 autocast), the data from the same :class:`~d2v2scale.data.loader.StepLoader` the
    engine path reads."""
    torch.manual_seed(cfg.seed)
    model = Data2Vec2(cfg.model_spec()).to(device).train()
    teacher = build_teacher(model, cfg)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled", False) else torch.float32
    if compile_:
        apply_compile(model)
        apply_compile(teacher.module)
    opt_params = ds["optimizer"]["params"]
    wd = opt_params["weight_decay"]
    opt = torch.optim.AdamW(param_groups(model, wd, {n for n, _ in teacher.module.named_parameters()}),
                            lr=opt_params["lr"], betas=opt_params["betas"], eps=opt_params["eps"], weight_decay=wd,
                            fused=opt_params.get("fused"))
    bp = plan_batch(ds, cfg, 1)
    schedule = RankSchedule(bp.global_batch, bp.micro_batch, bp.grad_accum, 0, 1)
    loader = StepLoader(cfg, schedule, device, dtype, verbose=False,
                        prefetch_steps=cfg.data.prefetch_steps)
    clip = ds.get("gradient_clipping", 0.0)

    def step(k: int) -> None:
        (mb,) = loader.step(k)
        mask = model.make_mask(cfg.seed, k, mb.sample_ids, mb.source, mb.lengths)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = normalize_loss(model(mb.source, model.teacher_fn(teacher.module), mask, lengths=mb.lengths))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        teacher.update(k + 1)

    return step


def engine_path(cfg, ds: dict, dims, device, backend: str, stage: int, compile_: bool):
    cfg = copy.deepcopy(cfg)
    cfg.parallel.backend, cfg.model.compile = backend, compile_
    ds = copy.deepcopy(ds)
    ds["zero_optimization"] = {**ds["zero_optimization"], "stage": stage}
    plan = plan_batch(ds, cfg, 1)
    tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
    tr.model.train()
    return tr, lambda k: train_step(tr, k)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_image")
    p.add_argument("--batch", type=int, default=8, help="samples per step (images, text blocks)")
    p.add_argument("--clones", type=int, default=8, help="masks per sample M")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "cpu_tiny.json"))
    p.add_argument("overrides", nargs="*", help="section.key=value, applied after the bench's own")
    args = p.parse_args()
    try:  # bad input is one line, before any process group
        cfg = load_config(args.preset, ["data.kind=synthetic", f"model.clone_batch={args.clones}",
                                        "model.mask_noise_std=0", f"train.global_batch={args.batch}",
                                        "train.allow_long_warmup=true", *args.overrides])
        ds = load_ds_config(args.ds_config)
    except ConfigError as e:
        return fail("step_paths", e)
    dims, device = init_distributed(1)
    if device.type == "cpu":
        torch.set_num_threads(1)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = args.batch, 1
    if batch_budget(cfg) is not None:  # the modality counts its micro-batch in input units (audio samples)
        ds["train_micro_batch_size_per_gpu"] = "auto"
    variants, trainers = {}, {}
    for compile_ in (False, True):
        tag = "+compile" if compile_ else ""
        variants[f"plain{tag}"] = plain(cfg, ds, compile_, device)
        for backend, stages in (("deepspeed", (0, 1, 2) if not compile_ else (1,)), ("fsdp2", (0,))):
            for stage in stages:
                name = f"{backend} ZeRO-{stage}{tag}" if backend == "deepspeed" else f"fsdp2{tag}"
                trainers[name], variants[name] = engine_path(cfg, ds, dims, device, backend, stage, compile_)
    for name in ("deepspeed ZeRO-1", "deepspeed ZeRO-1+compile"):
        tr = trainers[name]
        tr.timer = StepTimer(device, enabled=True)
        tr.model.phase = tr.timer.phase
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in variants}
    for k in range(args.warmup + args.steps):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn(k)
            sync()
            if k >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    tr = trainers["deepspeed ZeRO-1"]
    shape = StepShape(tr.last_shape["samples"], tr.last_shape["positions"], tr.last_shape["kept"])
    flops = step_flops(cfg, shape, tr.last_shape["input_len"])
    dtype = tr.dtype
    peak = device_peak_flops(device, dtype) or float("nan")  # an unknown GPU has no table entry
    where = "1 CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    peak_name = "measured fp32 matmul peak" if device.type == "cpu" else "bf16 dense peak"

    def ratio(name: str, base: str = "plain") -> float:
        return statistics.median(t / b for t, b in zip(times[name], times[base], strict=True))

    print(f"{args.preset}: {shape.samples} samples × M={args.clones}, T={shape.positions} (kept {shape.kept}); "
          f"median of {args.steps} steps after {args.warmup} warm-up, {where}; model FLOPs/step {flops:.3g}, "
          f"{peak_name} {peak / 1e9:.1f} GFLOP/s")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<26} {med * 1e3:8.1f} ms   ×{ratio(name):6.3f} vs plain   MFU {flops / med / peak:6.1%}")
    pairs = [(n[: -len("+compile")], n) for n in times if n.endswith("+compile")]
    print("  compiled / eager, same path: " + ", ".join(
        f"{eager} {ratio(comp, eager):.3f}" for eager, comp in pairs))
    for name in ("deepspeed ZeRO-1", "deepspeed ZeRO-1+compile"):
        rows = trainers[name].timer.resolve()[args.warmup:]
        split = {ph: statistics.median(r.get(ph, 0.0) for r in rows) for ph in PHASES}
        print(f"  phases of {name}: " + ", ".join(f"{ph} {v * 1e3:.1f}" for ph, v in split.items() if v) + " ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
