"""Checkpoint under layout A, resume under layout B, in one process group; write the losses (rank 0).

    torchrun --nproc_per_node N reshard.py OUT.json PRESET STEPS K PAIRS [overrides...] [--bf16]

PAIRS: comma-separated ``A>B``; a layout is ``z0``..``z3`` (DeepSpeed ZeRO stage, tp 1), ``tp2``
(DeepSpeed ZeRO-1, tp 2) or ``fsdp2`` (FSDP2, resharding after forward, tp 1). For every pair:
layout A runs STEPS steps uninterrupted and saves a checkpoint at step K (the same
:func:`~d2v2scale.train.checkpoint.save_checkpoint` a launch uses); layout B is built afresh, loads
that checkpoint with :func:`~d2v2scale.train.checkpoint.load_checkpoint` and runs steps K..STEPS.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.dims import ParallelDims  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.train import checkpoint  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, log_record, train_step  # noqa: E402
from d2v2scale.train.reporting import Interval  # noqa: E402

LAYOUTS = {f"z{s}": ("deepspeed", s, 1) for s in range(4)} | {"tp2": ("deepspeed", 1, 2), "fsdp2": ("fsdp2", 3, 1)}


def main():
    out, preset, steps, k, pairs = sys.argv[1:6]
    steps, k = int(steps), int(k)
    overrides = [a for a in sys.argv[6:] if a != "--bf16"]
    bf16 = "--bf16" in sys.argv[6:]
    _, device = init_distributed(1)
    dims_by_tp = {}

    def build(layout: str):
        backend, stage, tp = LAYOUTS[layout]
        cfg = load_config(preset, [*overrides, f"parallel.tp={tp}", f"parallel.backend={backend}"])
        if tp not in dims_by_tp:
            dims_by_tp[tp] = ParallelDims(tp=tp, world_size=dist.get_world_size(), rank=dist.get_rank())
            dims_by_tp[tp].build_groups()
        dims = dims_by_tp[tp]
        ds = load_ds_config(str(Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"))
        ds["zero_optimization"], ds["bf16"] = {"stage": stage}, {"enabled": bf16}
        plan = plan_batch(ds, cfg, dims.dp)
        layout_info = {"backend": backend, "tp": tp, "dp": dims.dp, "zero_stage": stage}
        return build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device), layout_info

    def run(tr, first: int, last: int, save_dir: Path | None = None, layout_info=None) -> list:
        losses = []
        for step in range(first, last):
            stats = train_step(tr, step)
            row = log_record(tr, step, Interval([stats]), 1.0)
            losses.append([row["loss"], row["grad_norm"]])
            if save_dir is not None and step + 1 == k:
                checkpoint.save_checkpoint(tr, save_dir, k, 10, {"layout": layout_info})
        return losses

    root = Path(tempfile.mkdtemp()) if dist.get_rank() == 0 else None
    objs = [root]
    dist.broadcast_object_list(objs)
    root = objs[0]
    results, uninterrupted = {}, {}
    for pair in pairs.split(","):
        a, b = pair.split(">")
        if a not in uninterrupted:
            tr, info = build(a)
            uninterrupted[a] = run(tr, 0, steps, root / a, info)
        tr, info = build(b)
        start = checkpoint.load_checkpoint(tr, root / a / checkpoint.tag_for(k), info)
        results[pair] = {"start": start, "reference": uninterrupted[a][k:], "resumed": run(tr, start, steps)}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
