"""Count host synchronisations (a value read back from a tensor) in every step of a real run.

    torchrun --nproc_per_node 2 sync_count.py OUT.json RUN_DIR [overrides...]

``Tensor.item``, ``__bool__``, ``__int__``, ``__float__``, ``tolist``, ``cpu`` and ``numpy`` are
wrapped to count their calls on the training thread (the data loader's read-ahead thread works on
host tensors by design), attributed to the step in progress through the loop's profiler hooks.
A dispatch mode on the training thread also counts ``aten::_local_scalar_dense`` called outside any
other op: the reads no Python method shows, such as a device tensor passed where an op takes a host
number (a CPU kernel's own reads, inside its op, are not a GPU's and are not seen).
The run: tiny_image on the FSDP2 backend with the fused AdamW of ds_configs/cpu_tiny.json.
Rank 0 writes ``{"log_every": k, "steps": n, "per_step": {step: calls}, "dispatched": {step: reads}}``.
"""
import json
import sys
import threading
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed  # noqa: E402
from d2v2scale.profiling.timers import StepTimer  # noqa: E402
from d2v2scale.ds_config import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.train.engine import build_trainer, train  # noqa: E402

MAIN = threading.main_thread()
CALLS: Counter = Counter()
CURRENT = [None]  # the step in progress (None outside the loop)
READS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy")


def _counting(name, fn):
    def wrapped(self, *args, **kwargs):
        if CURRENT[0] is not None and threading.current_thread() is MAIN:
            CALLS[CURRENT[0]] += 1
        return fn(self, *args, **kwargs)

    return wrapped


class ScalarReads(TorchDispatchMode):
    """Counts device-to-host scalar reads dispatched on this thread (modes are per thread), per step.
    Inside a mode's handler the mode is off, so reads made inside another op are not seen."""

    reads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and CURRENT[0] is not None:
            self.reads[CURRENT[0]] += 1
        return func(*args, **(kwargs or {}))


class StepHooks:
    """The loop's profiler hooks, used only to know which step is in progress."""

    def __init__(self, device):
        self.timer, self.shape = StepTimer(device, enabled=False), None

    def start(self):
        pass

    def step_begin(self, step):
        CURRENT[0] = step + 1

    def step_end(self, step):
        pass

    def finish(self, tr):
        CURRENT[0] = None


def main():
    out, run_dir = sys.argv[1:3]
    cfg = load_config("tiny_image", ["parallel.backend=fsdp2", "train.max_updates=6", "train.log_every=3",
                                     "train.save_every=1000", "train.allow_long_warmup=true", *sys.argv[3:]])
    dims, device = init_distributed(1)
    ds = load_ds_config(str(Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"))
    plan = plan_batch(ds, cfg, dims.dp)
    tr = build_trainer(cfg, resolve_ds_config(ds, cfg, plan), plan, dims, device)
    for name in READS:
        setattr(torch.Tensor, name, _counting(name, getattr(torch.Tensor, name)))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with ScalarReads():
        train(tr, Path(run_dir), 0, {"layout": {}}, StepHooks(device))
    if dims.rank == 0:
        Path(out).write_text(json.dumps({"log_every": 3, "steps": 6, "per_step": dict(CALLS),
                                         "dispatched": dict(ScalarReads.reads)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
