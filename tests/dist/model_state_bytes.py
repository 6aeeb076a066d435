"""Measure the model-state bytes one rank of a real DeepSpeed engine + sharded teacher holds and
print them next to the planner's model, as JSON (rank 0 writes; ZeRO-2/3 need 2+ processes to
partition anything):

    python|torchrun model_state_bytes.py PRESET DS_CONFIG OUT.json [STAGES]
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed, shutdown  # noqa: E402
from d2v2scale.planning.memory import Layout, model_state_bytes, param_counts  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(tr, stage: int) -> dict:
    opt = tr.backend.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values() if hasattr(t, "numel") and t.numel() > 1]
    params = [p for p in tr.model.parameters() if p.requires_grad]
    if stage == 3:  # this rank's partitions
        return {"weights": nbytes(p.ds_tensor for p in params),
                "optimizer_states": nbytes(opt.fp32_partitioned_groups_flat) + nbytes(state),
                "teacher_fp32_masters": nbytes(tr.teacher.masters), "teacher_compute_copy": nbytes(tr.teacher.flats)}
    return {"weights": nbytes(params),
            "optimizer_states": nbytes(opt.single_partition_of_fp32_groups) + nbytes(state),
            "teacher_fp32_masters": nbytes(tr.teacher.masters), "teacher_compute_copy": nbytes(tr.teacher.flats)}


def main():
    preset, ds_path, out = sys.argv[1:4]
    cfg = load_config(preset)
    dims, device = init_distributed(1)
    results = {}
    base = load_ds_config(ds_path)
    stages = [int(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else [base["zero_optimization"]["stage"]]
    for stage in stages:
        ds = load_ds_config(ds_path)
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": stage}
        plan = plan_batch(ds, cfg, dims.dp)
        tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
        train_step(tr, 0)  # Adam's moments exist only after the first optimizer step
        counts = param_counts(cfg, 1)
        lay = Layout(1, dims.dp, stage, ds.get("bf16", {}).get("enabled", False), 1, 1, 0)
        measured = measure(tr, stage)
        per_rank = [None] * dims.world_size
        if dist.is_initialized() and dims.world_size > 1:
            dist.all_gather_object(per_rank, measured)
        else:
            per_rank = [measured]
        model = {k: v for k, v in model_state_bytes(counts, lay).items() if k in measured}
        results[stage] = {"measured": measured, "per_rank": per_rank, "model": model}
        tr.loader.close()
    if dims.rank == 0:
        Path(out).write_text(json.dumps(results if len(sys.argv) > 4 else results[stages[0]]))
    shutdown()


if __name__ == "__main__":
    main()
