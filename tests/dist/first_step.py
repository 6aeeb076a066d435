"""Step 1 of a preset through the real trainer and backend in one process, with everything a
reference needs to recompute its gradient elsewhere (for tests/test_cls_weight.py).

    python first_step.py OUT.pt MICRO ACCUM PRESET [overrides...]

The trainer is DeepSpeed ZeRO-1 with ds_configs/cpu_tiny.json, gradient clipping off, so that
AdamW's first moment after one step is (1 − β1) × the gradient of the objective. ``OUT.pt`` holds
the micro-batches step 0 trained on (source, sample ids, masks), every trainable weight before
the step and AdamW's ``exp_avg`` after it (by parameter name, whole: one process holds every
element), β1, and the step's metrics row.
"""
import sys

import torch

from trainer_kit import cpu_tiny, make_trainer

from d2v2scale.config import load_config
from d2v2scale.distributed.runtime import init_distributed, shutdown
from d2v2scale.train.engine import train_step
from d2v2scale.train.reporting import Interval, log_record


def by_name(tr, kind: str) -> dict[str, torch.Tensor]:
    """``kind`` ("model", "exp_avg") of every trainable weight, through the backend's state ranges."""
    out = {}
    for name, start, stop, values in tr.backend.state_ranges():
        assert start == 0 and stop == values[kind].numel(), (name, start, stop)  # one process: whole tensors
        out[name] = values[kind].detach().clone()
    return out


def main() -> None:
    out, micro, accum, preset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = load_config(preset, sys.argv[5:])
    dims, device = init_distributed(1)
    ds = cpu_tiny(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, gradient_clipping=0.0)
    tr = make_trainer(cfg, ds, dims, device)
    seen = []
    step_batches = tr.loader.step

    def recording(step: int):
        batches = step_batches(step)
        seen.extend(batches)
        return batches

    tr.loader.step = recording
    init = by_name(tr, "model")
    row = log_record(tr, 0, Interval([train_step(tr, 0)]), 1.0)
    tr.loader.close()
    torch.save({
        "batches": [{"source": mb.source, "sample_ids": mb.sample_ids, "mask": mb.mask.mask,
                     "keep_idx": mb.mask.keep_idx} for mb in seen],
        "init": init, "exp_avg": by_name(tr, "exp_avg"), "beta1": ds["optimizer"]["params"]["betas"][0],
        "row": {k: row[k] for k in ("loss", "loss_reg", "loss_cls")}, "cls_weight": tr.cls_weight,
    }, out)
    shutdown()


if __name__ == "__main__":
    main()
