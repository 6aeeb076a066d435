"""Measure the model-state bytes of a real DeepSpeed engine + sharded teacher (one process) and print
them next to the planner's model, as JSON: python model_state_bytes.py PRESET DS_CONFIG OUT.json"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed, shutdown  # noqa: E402
from d2v2scale.plan import Layout, model_state_bytes, param_counts  # noqa: E402
from d2v2scale.train.ds_config import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    preset, ds_path, out = sys.argv[1:4]
    cfg = load_config(preset)
    dims, device = init_distributed(1)
    ds = load_ds_config(ds_path)
    plan = plan_batch(ds, cfg, dims.dp)
    tr = build_trainer(cfg, resolve_ds_config(ds, cfg, plan), plan, dims, device)
    train_step(tr, 0)  # Adam's moments exist only after the first optimizer step
    opt = tr.engine.optimizer
    state = [t for s in opt.optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.numel() > 1]
    measured = {
        "weights": nbytes(p for p in tr.model.parameters() if p.requires_grad),
        "optimizer_states": nbytes(opt.single_partition_of_fp32_groups) + nbytes(state),
        "teacher_fp32_masters": nbytes(tr.teacher.masters),
        "teacher_compute_copy": nbytes(tr.teacher.flats),
    }
    counts = param_counts(cfg, 1)
    psi, psi_t = counts.total, counts.teacher
    lay = Layout(1, dims.dp, ds["zero_optimization"]["stage"], ds.get("bf16", {}).get("enabled", False), 1, 1, 0)
    model = {k: v for k, v in model_state_bytes(psi, psi_t, lay).items() if k in measured}
    Path(out).write_text(json.dumps({"measured": measured, "model": model}))
    shutdown()


if __name__ == "__main__":
    main()
