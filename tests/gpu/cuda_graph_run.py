"""A few training steps on one GPU, eager or compiled and replayed as CUDA graphs (for
tests/gpu/test_cuda_graphs.py).

    python cuda_graph_run.py OUT.json VARIANTS

VARIANTS: comma-separated ``eager`` (model.compile=false), ``graphs`` (model.compile=true,
model.cuda_graphs=true) and ``graphs-unmarked`` (the same with
``torch.compiler.cudagraph_mark_step_begin`` made a no-op, as if the engine did not call it).
Each trains tiny_image on synthetic images (no mask noise) for :data:`STEPS` steps of 2
micro-batches of 16, fp32, DeepSpeed ZeRO-1 with ds_configs/cpu_tiny.json (warm-up of one step),
through the real trainer. With graphs, inductor raises instead of silently running a region without them
(``cudagraph_or_error``), and every CUDA graph recorded and every replay of one is counted per
step (the graph-tree manager's ``record_function`` and ``execute_node``). Writes ``{variant:
{"rows": [{"loss", "loss_reg", "loss_cls", "grad_norm"} per step], "recorded": [per step],
"replayed": [per step], "error": null or the exception that stopped it}}``.
"""
import json
import sys
import traceback
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))

from trainer_kit import cpu_tiny, make_trainer  # noqa: E402

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed, shutdown  # noqa: E402
from d2v2scale.train.engine import train_step  # noqa: E402
from d2v2scale.train.reporting import Interval, log_record  # noqa: E402

STEPS, MICRO, ACCUM = 5, 16, 2
COUNTS = {"recorded": 0, "replayed": 0}


def count_graphs() -> None:
    """Count recordings and replays on the CUDA graph trees (every region's graphs live in one tree manager)."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    record, execute = CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.execute_node

    def recording(self, *args, **kwargs):
        COUNTS["recorded"] += 1
        return record(self, *args, **kwargs)

    def replaying(self, *args, **kwargs):
        COUNTS["replayed"] += 1
        return execute(self, *args, **kwargs)

    CUDAGraphTreeManager.record_function, CUDAGraphTreeManager.execute_node = recording, replaying


def run(variant: str, dims, device) -> dict:
    graphs = variant.startswith("graphs")
    cfg = load_config("tiny_image", ["data.kind=synthetic", "model.mask_noise_std=0", "train.global_batch=32",
                                     f"train.max_updates={STEPS}", "train.allow_long_warmup=true",
                                     f"model.compile={str(graphs).lower()}", f"model.cuda_graphs={str(graphs).lower()}"])
    mark = torch.compiler.cudagraph_mark_step_begin
    if variant == "graphs-unmarked":
        torch.compiler.cudagraph_mark_step_begin = lambda: None
    out: dict = {"rows": [], "recorded": [], "replayed": [], "error": None}
    try:
        ds = cpu_tiny(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=ACCUM)
        ds["scheduler"]["params"]["warmup_num_steps"] = 1  # real updates from the start: stale weights would show
        tr = make_trainer(cfg, ds, dims, device)
        for step in range(STEPS):
            before = dict(COUNTS)
            row = log_record(tr, step, Interval([train_step(tr, step)]), 1.0)
            out["rows"].append({k: row[k] for k in ("loss", "loss_reg", "loss_cls", "grad_norm")})
            out["recorded"].append(COUNTS["recorded"] - before["recorded"])
            out["replayed"].append(COUNTS["replayed"] - before["replayed"])
        tr.loader.close()
    except Exception:  # noqa: BLE001 - the unmarked variant is expected to fail; the test reads why
        out["error"] = traceback.format_exc()[-4000:]
    finally:
        torch.compiler.cudagraph_mark_step_begin = mark
    return out


def main() -> None:
    out, variants = sys.argv[1], sys.argv[2].split(",")
    dims, device = init_distributed(1)
    assert device.type == "cuda", device
    torch._inductor.config.triton.cudagraph_or_error = True
    count_graphs()
    Path(out).write_text(json.dumps({variant: run(variant, dims, device) for variant in variants}))
    shutdown()


if __name__ == "__main__":
    main()
