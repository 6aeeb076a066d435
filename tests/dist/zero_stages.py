"""Train a tiny preset for a few steps under each requested layout in one process group; write
per-step losses, the teacher checksum and the sharded-teacher check (rank 0) to a JSON file.

    python|torchrun zero_stages.py OUT.json PRESET MICRO GAS RUNS TP [overrides...] [--bf16]

RUNS: comma-separated DeepSpeed ZeRO stages (0-3) and/or ``fsdp2`` (the FSDP2 backend, resharding
after forward), each optionally with ``+fused`` (fused AdamW), ``+compile`` (model.compile) and/or ``+graphs``
(model.cuda_graphs, with compile).
MICRO/GAS may be ``auto`` (audio presets size micro-batches by max_tokens). The ZeRO options
other than the stage are cpu_tiny.json's (the step users run on CPU; reshard.py and
ds_internals.py run DeepSpeed's defaults).
Alongside the sharded teacher, every rank keeps an unsharded fp32 EMA of the full fp32 student
weights (gathered each step: DeepSpeed's public helpers, or DTensor.full_tensor) as the reference
it must equal.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.model import Data2Vec2  # noqa: E402
from d2v2scale.model.blocks import Block  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, log_record, train_step  # noqa: E402
from d2v2scale.train.reporting import Interval  # noqa: E402


def _full(p) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def full_fp32(tr) -> dict:
    """name → full (DP-gathered, TP-local) fp32 master of every tracked student parameter."""
    tracked = {n for n, _ in tr.teacher.module.named_parameters()} & {n for n, p in tr.model.named_parameters()
                                                                       if p.requires_grad}
    if tr.backend.name == "fsdp2" or tr.backend.stage == 0:
        return {n: _full(p).detach().float().clone() for n, p in tr.model.named_parameters() if n in tracked}
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in tr.model.named_parameters() if n in tracked}


COMPILE_MODES: list = []  # the ``mode`` of every torch.compile call (model.cuda_graphs: "reduce-overhead")
_compile = torch.compile


def _recording_compile(*args, **kwargs):
    COMPILE_MODES.append(kwargs.get("mode"))
    return _compile(*args, **kwargs)


torch.compile = _recording_compile  # nn.Module.compile calls it too


def compiled_functions(model) -> list[str]:
    """Which of the regions ``model.compile`` compiles have dynamo cache entries, i.e. ran compiled
    (cumulative over the runs of this process). ``layer_spread`` is left out: its ``no_grad``
    wrapper makes dynamo enter through a shared frame of its own."""
    functions = (Block.forward, type(model.decoder).forward, Data2Vec2.targets_from, Data2Vec2.losses)
    return sorted(f.__qualname__ for f in functions if _debug_get_cache_entry_list(f.__code__))


def resident_teacher_bytes(tr) -> int:
    """Teacher bytes this rank holds between forwards: its masters plus what the module computes with."""
    if tr.backend.name == "fsdp2":
        return sum(p.to_local().numel() * p.to_local().element_size() for p in tr.teacher.module.parameters())
    return tr.teacher.master_bytes() + sum(f.numel() * f.element_size() for f in tr.teacher.flats)


def main():
    out, preset, micro, gas, stages, tp = sys.argv[1:7]
    bf16 = "--bf16" in sys.argv[7:]
    cfg = load_config(preset, [f"parallel.tp={tp}"] + [a for a in sys.argv[7:] if a != "--bf16"])
    dims, device = init_distributed(cfg.parallel.tp)
    results = {}
    for run in stages.split(","):
        layout, *options = run.split("+")
        cfg.parallel.backend = "fsdp2" if layout == "fsdp2" else "deepspeed"
        cfg.model.compile = "compile" in options
        cfg.model.cuda_graphs = "graphs" in options
        stage = 3 if layout == "fsdp2" else int(layout)
        ds = load_ds_config(str(Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"))
        ds["optimizer"]["params"]["fused"] = "fused" in options
        ds["train_micro_batch_size_per_gpu"] = "auto" if micro == "auto" else int(micro)
        ds["gradient_accumulation_steps"] = "auto" if gas == "auto" else int(gas)
        ds["zero_optimization"], ds["bf16"] = {**ds["zero_optimization"], "stage": stage}, {"enabled": bf16}
        plan = plan_batch(ds, cfg, dims.dp)
        COMPILE_MODES.clear()
        tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
        reference = full_fp32(tr)
        losses, dtypes = [], {}
        for step in range(cfg.train.max_updates):
            stats = train_step(tr, step)
            dtypes = {"loss": str(stats.loss_reg.dtype), "spreads": str(stats.spreads.dtype),
                      "teacher_masters": sorted({str(t.dtype) for t in tr.teacher.masters}),
                      "teacher_compute": sorted({str(p.dtype) for n, p in tr.teacher.module.named_parameters()
                                                 if n in reference})}
            decay = tr.teacher.decay(step + 1)
            for name, value in full_fp32(tr).items():
                reference[name].lerp_(value, 1.0 - decay)
            row = log_record(tr, step, Interval([stats]), 1.0)
            losses.append([row["loss"], row["loss_reg"], row["loss_cls"], row["grad_norm"]])
        params = {n: _full(p) for n, p in tr.teacher.module.named_parameters()}
        ema_diff = max((params[n].float() - v).abs().max().item() for n, v in reference.items())
        diffs = [None] * dims.world_size
        dist.all_gather_object(diffs, ema_diff)
        bytes_, resident = [None] * dims.world_size, [None] * dims.world_size
        dist.all_gather_object(bytes_, tr.teacher.master_bytes())
        dist.all_gather_object(resident, resident_teacher_bytes(tr))
        checksum = torch.tensor(sum(p.double().sum().item() for p in params.values()))
        if stage < 3:  # the module's parameters are whole only below ZeRO-3
            from d2v2scale.data.synthetic import synthetic_batch

            source = synthetic_batch(cfg, 2, torch.Generator().manual_seed(5)).to(device)
            source = source.to(tr.dtype) if source.is_floating_point() else source  # text: token ids
            local, valid = tr.model.encoder.local_features(source, None)
            dtypes["targets"] = str(tr.model.teacher_targets(tr.teacher.module, source, local, valid, None).dtype)
        results[run] = {"losses": losses, "teacher_sum": checksum.item(), "ema_vs_unsharded": max(diffs),
                        "teacher_bytes_per_rank": bytes_, "teacher_resident_bytes": resident, "dtypes": dtypes,
                        "teacher_norms": {n: p.double().norm().item() for n, p in params.items()},
                        "compiled": compiled_functions(tr.model), "compile_modes": sorted(set(COMPILE_MODES), key=str),
                        "teacher_full_bytes": sum(p.numel() * p.element_size() for p in params.values())}
    if dims.rank == 0:
        Path(out).write_text(json.dumps(results))
    # Leave together: rank 0 hosts the rendezvous store, and a peer still using it when rank 0
    # exits can abort.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
