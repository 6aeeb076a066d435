"""Training steps on one GPU under ``torch.cuda.set_sync_debug_mode`` (for tests/gpu/test_sync_debug.py).

    python sync_debug_run.py OUT.json RUN_DIR BACKENDS

BACKENDS: comma-separated ``deepspeed`` and/or ``fsdp2``; each trains tiny_image on synthetic
images for 8 steps, logging at steps 4 and 8 and saving only at the end, with the GPU's
ds_config settings on ds_configs/cpu_tiny.json's optimizer (bf16; ZeRO-1 for DeepSpeed; fused
AdamW, FSDP2's sync-free path). tests/sync_detector.py's :class:`CudaSyncWarnings` keeps every
synchronisation torch detects, with its call site, stamped with the step in progress. Writes
``{backend: {"log_steps": [...], "syncs": [{"step", "op", "stack"}]}}``.
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "dist"), str(Path(__file__).resolve().parents[1])]

from sync_detector import CudaSyncWarnings, StepTags  # noqa: E402
from trainer_kit import cpu_tiny, make_trainer  # noqa: E402

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed, shutdown  # noqa: E402
from d2v2scale.train.engine import train  # noqa: E402

STEPS, LOG_EVERY = 8, 4


def main() -> None:
    out, run_dir, backends = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    dims, device = init_distributed(1)
    assert device.type == "cuda", device
    report = {}
    for backend in backends:
        cfg = load_config("tiny_image", [f"parallel.backend={backend}", "data.kind=synthetic",
                                         f"train.max_updates={STEPS}", f"train.log_every={LOG_EVERY}",
                                         "train.save_every=1000", "train.allow_long_warmup=true"])
        tr = make_trainer(cfg, cpu_tiny(bf16={"enabled": True}), dims, device)
        (run_dir / backend).mkdir(parents=True, exist_ok=True)
        watch = CudaSyncWarnings()
        watch.tag = None
        with watch:
            train(tr, run_dir / backend, 0, {"layout": {}}, StepTags(device, watch))
        torch.cuda.synchronize()
        report[backend] = {"log_steps": list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)),
                           "syncs": [{"step": s.tag, "op": s.op, "stack": s.stack} for s in watch.syncs]}
    Path(out).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
