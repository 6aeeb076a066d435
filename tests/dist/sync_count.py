"""Every operation that would make the host wait for a GPU, per step of a real training run, on
each backend (for tests/test_sync_free.py).

    torchrun --nproc_per_node 2 sync_count.py OUT.json RUN_DIR BACKENDS [overrides...]

BACKENDS: comma-separated ``deepspeed`` and/or ``fsdp2``; each runs tiny_image for 8 steps with
ds_configs/cpu_tiny.json (ZeRO-1 for DeepSpeed, fused AdamW: FSDP2's sync-free path), logging at
steps 4 and 8 and saving only at the end. tests/sync_detector.py's :class:`Detector` watches the
training thread from the first step to the last, each record stamped with the step in progress
(through the loop's profiler hooks). Step 5 carries the planted syncs of :data:`PLANTS`, made
inside ``backend.step``, to show the detector sees them there; steps 1-3, 6 and 7 are clean.

Every rank's records go to rank 0, which writes ``{backend: {"log_steps": [...], "planted_step": 5,
"plants": [function names], "syncs": [{"rank", "step", "op", "stack"}]}}``.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer_kit import ROOT, cpu_tiny, make_trainer

sys.path.insert(0, str(ROOT / "tests"))

from sync_detector import Detector, StepTags  # noqa: E402

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.train.engine import train  # noqa: E402

STEPS, LOG_EVERY, PLANTED = 8, 4, 5


def plant_equal(device):
    flag, zero = torch.ones((), device=device), torch.zeros((), device=device)
    return torch.equal(flag, zero)


def plant_to_cpu(device):
    return torch.arange(4.0, device=device).to("cpu")


def plant_nonzero(device):
    return torch.arange(4.0, device=device).nonzero()


def plant_masked_select(device):
    x = torch.arange(4.0, device=device)
    return x.masked_select(x > 1)


def plant_bool_index(device):
    x = torch.arange(4.0, device=device)
    return x[x > 1]


PLANTS = (plant_equal, plant_to_cpu, plant_nonzero, plant_masked_select, plant_bool_index)


def with_plants(tr, detector: Detector) -> None:
    """``backend.step`` makes the planted syncs in step :data:`PLANTED` (once, at its first call)."""
    step, planted = tr.backend.step, []

    def planted_step():
        if detector.tag == PLANTED and not planted:
            planted.extend(plant(tr.device) for plant in PLANTS)
        return step()

    tr.backend.step = planted_step


def run(backend: str, run_dir: Path, overrides: list[str], dims, device) -> list[dict]:
    cfg = load_config("tiny_image", [f"parallel.backend={backend}", f"train.max_updates={STEPS}",
                                     f"train.log_every={LOG_EVERY}", "train.save_every=1000",
                                     "train.allow_long_warmup=true", *overrides])
    tr = make_trainer(cfg, cpu_tiny(), dims, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    detector = Detector(device)
    detector.tag = None
    with_plants(tr, detector)
    with detector:
        train(tr, run_dir, 0, {"layout": {}}, StepTags(device, detector))
    return [{"rank": dims.rank, "step": s.tag, "op": s.op, "stack": s.stack} for s in detector.syncs]


def main():
    out, run_dir, backends = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    dims, device = init_distributed(1)
    report = {}
    for backend in backends:
        syncs = run(backend, run_dir / backend, sys.argv[4:], dims, device)
        gathered = [None] * dims.world_size
        dist.all_gather_object(gathered, syncs)
        report[backend] = {"log_steps": list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)),
                           "planted_step": PLANTED, "plants": [fn.__name__ for fn in PLANTS],
                           "syncs": [s for rank in gathered for s in rank]}
    if dims.rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
