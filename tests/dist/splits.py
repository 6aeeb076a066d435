"""Step 1 of each preset under several splits of one global batch, in one process group (for
tests/test_objective.py).

    python|torchrun splits.py OUT_DIR PRESETS SPLITS [overrides...]

SPLITS: comma-separated ``TPxDPxMICROxACCUM`` (e.g. ``1x1x32x1,1x1x8x4``), TP × DP = the world size.
For every preset × split: build the trainer (DeepSpeed ZeRO-1 with cpu_tiny.json, gradient
clipping off, so that AdamW's first moment after one step is (1 − β1) × the gradient itself), run
step 0 and write its metrics row, then save a layout-free checkpoint in OUT_DIR/PRESET/SPLIT: its
``exp_avg`` shards assemble into whole gradients whatever the layout. On one process the script also
evaluates fairseq's objective on the same micro-batches and weights, from the model's own sums:
``Σ_m (reg_m + cls_loss · Σ_views err_m · s_m) / S`` (fairseq's ``d2v_loss · cls_loss · sample_size``).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.data.loader import StepLoader  # noqa: E402
from d2v2scale.data.schedule import RankSchedule  # noqa: E402
from d2v2scale.distributed.dims import ParallelDims  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.train import checkpoint  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, log_record, train_step  # noqa: E402
from d2v2scale.train.reporting import Interval  # noqa: E402


def fairseq_objective(tr) -> dict:
    """fairseq's normalised loss of step 0 at this trainer's split (one process), before it steps."""
    cfg, plan = tr.cfg, tr.spec.batch
    loader = StepLoader(cfg, RankSchedule(plan.global_batch, plan.micro_batch, plan.grad_accum, 0, 1), tr.device,
                        tr.dtype, verbose=False,
                        masker=lambda step, mb: tr.model.make_mask(cfg.seed, step, mb.sample_ids, mb.source, mb.lengths))
    total, masked = 0.0, []
    with torch.no_grad():
        for mb in loader.step(0):
            out = tr.model(mb.source, tr.teacher_fn, mb.mask, lengths=mb.lengths)
            total += (out.loss_reg + out.loss_cls * out.sample_size).item()
            masked.append(out.sample_size.item())
    loader.close()
    return {"fairseq_loss": total / sum(masked), "masked_per_micro": masked}


def main():
    out_dir, presets, splits = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
    overrides = sys.argv[4:]
    _, device = init_distributed(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    dims_by_tp, results = {}, {}
    for preset in presets:
        for split in splits:
            tp, dp, micro, accum = (int(v) for v in split.split("x"))
            assert tp * dp == world, (split, world)
            cfg = load_config(preset, [*overrides, f"parallel.tp={tp}"])
            if tp not in dims_by_tp:
                dims_by_tp[tp] = ParallelDims(tp=tp, world_size=world, rank=rank)
                dims_by_tp[tp].build_groups()
            dims = dims_by_tp[tp]
            ds = load_ds_config(str(ROOT / "ds_configs" / "cpu_tiny.json"))
            ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, gradient_clipping=0.0)
            plan = plan_batch(ds, cfg, dims.dp)
            tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
            extra = fairseq_objective(tr) if world == 1 else {}
            row = log_record(tr, 0, Interval([train_step(tr, 0)]), 1.0)
            checkpoint.save_checkpoint(tr, out_dir / preset / split, 1, 1, {})
            tr.loader.close()
            results.setdefault(preset, {})[split] = {**row, **extra, "cls_weight": tr.cls_weight}
    if rank == 0:
        (out_dir / f"rows_{world}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
