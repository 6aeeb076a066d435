"""Build a real DeepSpeed engine per ZeRO stage (1 process) and check every internal d2v2scale reads
is where it expects it: ``python ds_internals.py OUT.json``."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from d2v2scale.config import load_config  # noqa: E402
from d2v2scale.distributed.runtime import init_distributed, shutdown  # noqa: E402
from d2v2scale.train.backend.deepspeed import DEEPSPEED_INTERNALS, require_internals  # noqa: E402
from d2v2scale.run_spec import load_ds_config, plan_batch, resolve_ds_config  # noqa: E402
from d2v2scale.run_spec import read_spec  # noqa: E402
from d2v2scale.train.engine import build_trainer, train_step  # noqa: E402


def _compare_grad_norms(opt) -> list:
    """Run DeepSpeed's own ``get_grad_norm_direct`` next to the backend's replacement on the same
    gradients; returns [(deepspeed, ours), ...] per call."""
    ours, pairs = opt.get_grad_norm_direct, []
    assert ours.__name__ == "grad_norm_direct", ours  # the backend installed its replacement

    def both(gradients, params, norm_type=2):
        theirs = type(opt).get_grad_norm_direct(opt, gradients, params, norm_type)
        mine = ours(gradients, params, norm_type)
        pairs.append((float(theirs), float(mine)))
        return mine

    opt.get_grad_norm_direct = both
    return pairs


def main():
    cfg = load_config("tiny_image")
    dims, device = init_distributed(1)
    checked = {}
    for stage, bf16, holders in ((0, True, ("bf16 optimizer (ZeRO-0)", "engine")),
                                 (1, False, ("ZeRO-1/2 optimizer", "ZeRO-1/2 parameter")),
                                 (2, True, ("ZeRO-1/2 optimizer", "ZeRO-1/2 parameter")),
                                 (3, False, ("ZeRO-3 optimizer", "ZeRO-3 parameter"))):
        ds = load_ds_config(str(Path(__file__).resolve().parents[2] / "ds_configs" / "cpu_tiny.json"))
        ds["zero_optimization"], ds["bf16"] = {"stage": stage}, {"enabled": bf16}
        plan = plan_batch(ds, cfg, dims.dp)
        tr = build_trainer(cfg, read_spec(resolve_ds_config(ds, cfg, plan), plan), dims, device)
        engine = tr.backend.engine
        for holder in holders:
            obj = (next(p for p in engine.module.parameters() if p.requires_grad) if "parameter" in holder
                   else engine if holder == "engine" else engine.optimizer)
            require_internals(obj, holder)
        norms = _compare_grad_norms(engine.optimizer) if stage in (1, 2) else []
        train_step(tr, 0)
        checked[f"{stage}/{'bf16' if bf16 else 'fp32'}"] = {"holders": list(holders),
                                                            "names": [list(DEEPSPEED_INTERNALS[h]) for h in holders],
                                                            "step_applied": engine.was_step_applied(),
                                                            "grad_norms": norms}
    Path(sys.argv[1]).write_text(json.dumps(checked))
    shutdown()


if __name__ == "__main__":
    main()
