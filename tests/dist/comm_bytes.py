"""Count every collective a real training step makes (DeepSpeed's included) and its payload.

    [ZERO_OPTIONS='{...}'] torchrun --nproc_per_node N comm_bytes.py OUT.json PRESETS TP RUNS GRAD_ACCUM [overrides...]

RUNS: comma-separated ZeRO stages and/or ``fsdp2``.

``torch.distributed``'s collectives are wrapped before DeepSpeed is imported, so the engine's own
calls go through the wrappers too. For each ZeRO stage, step 0 warms up and step 1 (not a log or
checkpoint step) is recorded: per call the operation, the group size and the payload in bytes
(all-reduce/broadcast/reduce: the tensor; all-gather: the gathered output; reduce-scatter: the
input), with the group named ``tp``, ``dp`` or ``world``. Rank 0 writes
``{preset: {stage: {"totals": {"all_reduce@tp": bytes, ...}, "micro_batch", "grad_accum"}}}``.
"""
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

RECORDING = []
CALLS: list[tuple[str, str, int]] = []
GROUP_NAMES: dict[tuple[int, ...], str] = {}
KIND = {"all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "broadcast": "broadcast", "reduce": "reduce",
        "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather", "all_gather": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
        "reduce_scatter": "reduce_scatter", "all_to_all_single": "all_to_all", "all_gather_single": "all_gather",
        "reduce_scatter_single": "reduce_scatter"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


PAYLOAD = {  # which argument carries the payload, by position or name
    "all_reduce": ("tensor", 0), "broadcast": ("tensor", 0), "reduce": ("tensor", 0),
    "all_gather_into_tensor": ("output_tensor", 0), "_all_gather_base": ("output_tensor", 0),
    "all_gather": ("tensor_list", 0), "reduce_scatter_tensor": ("input", 1), "_reduce_scatter_base": ("input", 1),
    "reduce_scatter": ("input_list", 1), "all_to_all_single": ("input", 1), "all_reduce_coalesced": ("tensors", 0),
    "all_gather_single": ("output_tensor", 0), "reduce_scatter_single": ("input", 1),
}
DEPTH = [0]  # a wrapped collective that calls another (all_gather_into_tensor → all_gather_single) counts once


def _wrap(name: str, fn):
    key, pos = PAYLOAD[name]

    def wrapped(*args, **kwargs):
        if RECORDING and not DEPTH[0]:
            payload = kwargs.get(key, kwargs.get("input_tensor", args[pos] if len(args) > pos else None))
            group = kwargs.get("group")
            ranks = tuple(range(dist.get_world_size())) if group is None else tuple(dist.get_process_group_ranks(group))
            CALLS.append((KIND[name], GROUP_NAMES.get(ranks, "world"), _nbytes(payload)))
        DEPTH[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            DEPTH[0] -= 1

    return wrapped


for _name in PAYLOAD:
    if hasattr(c10d, _name):
        _w = _wrap(_name, getattr(c10d, _name))
        setattr(c10d, _name, _w)
        if hasattr(dist, _name):
            setattr(dist, _name, _w)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402


def main():
    out, presets, tp, stages, grad_accum = sys.argv[1:6]
    results = {}
    dims = device = None
    for preset in presets.split(","):
        cfg = load_config(preset, [f"parallel.tp={tp}"] + sys.argv[6:])
        if dims is None:
            dims, device = init_distributed(cfg.parallel.tp)
            GROUP_NAMES[tuple(range(dims.world_size))] = "world"
            GROUP_NAMES[tuple(dist.get_process_group_ranks(dims.dp_group))] = "dp"
            GROUP_NAMES[tuple(dist.get_process_group_ranks(dims.tp_group))] = "tp"
        results[preset] = {}
        for run in stages.split(","):  # ZeRO stages, or fsdp2 (the FSDP2 backend, resharding after forward)
            cfg.parallel.backend = "fsdp2" if run == "fsdp2" else "deepspeed"
            stage = 3 if run == "fsdp2" else int(run)
            ds = load_ds_config(str(Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"))
            ds["zero_optimization"] = {"stage": stage, **json.loads(os.environ.get("ZERO_OPTIONS", "{}"))}
            ds["gradient_accumulation_steps"] = int(grad_accum)
            plan = plan_batch(ds, cfg, dims.dp)
            tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
            train_step(tr, 0)  # step 1 is measured: neither the first step nor a log/checkpoint step
            dist.barrier()
            CALLS.clear()
            RECORDING.append(True)
            train_step(tr, 1)
            RECORDING.clear()
            totals = defaultdict(int)
            for kind, group, nbytes in CALLS:
                totals[f"{kind}@{group}"] += nbytes
            results[preset][run] = {"totals": dict(totals), "calls": len(CALLS), "micro_batch": plan.micro_batch,
                                      "grad_accum": plan.grad_accum, "input_len": tr.last_shape["input_len"],
                                      "positions": tr.last_shape["positions"], "kept": tr.last_shape["kept"]}
            tr.loader.close()
    if dims.rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
