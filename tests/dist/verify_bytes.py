"""What each rank reads, and decides, when a resume verifies checkpoints (for tests/test_verify_once.py).

    RANK=R WORLD_SIZE=N MASTER_ADDR=... MASTER_PORT=... python verify_bytes.py OUT_DIR MODE:CKPT_DIR [...]

MODE ``verified``: :func:`~d2v2scale.train.checkpoint.newest_verified` (collective, each file read
once over all ranks); ``intact``: the per-rank :func:`~d2v2scale.train.checkpoint.newest_intact`.
Each rank writes ``OUT_DIR/rank<R>.json``: per argument, ``{"read": bytes, "tag": name or null,
"warnings": [...], "error": message or null}``. ``read`` is the kernel's own count of bytes this
process read (``rchar`` in ``/proc/self/io``) around the call, after imports, the process group's
start and a warm-up load (the safe unpickler's allow-list imports DeepSpeed on first use).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from d2v2scale.distributed.runtime import gather_objects, init_distributed  # noqa: E402
from d2v2scale.train import checkpoint  # noqa: E402
from d2v2scale.train.verify import CheckpointError, save_checked, scan  # noqa: E402


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def main() -> None:
    out_dir, runs = Path(sys.argv[1]), [arg.split(":", 1) for arg in sys.argv[2:]]
    dims, _ = init_distributed(1)
    warm = out_dir / f"warm{dims.rank}.pt"
    save_checked({"x": torch.zeros(4)}, warm)
    scan([warm])
    gather_objects(None)
    results = []
    for mode, ckpt_dir in runs:
        dist.barrier()
        tag, warnings, error = None, [], None
        before = rchar()
        try:
            if mode == "verified":
                tag, warnings = checkpoint.newest_verified(Path(ckpt_dir), dims.rank, dims.world_size)
            else:
                tag, warnings = checkpoint.newest_intact(Path(ckpt_dir))
        except CheckpointError as e:
            error = str(e)
        read = rchar() - before
        results.append({"read": read, "tag": tag and tag.name, "warnings": warnings, "error": error})
    (out_dir / f"rank{dims.rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
