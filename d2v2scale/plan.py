"""Plan a cluster run without a GPU: per-GPU memory, communication, predicted step and run time,
and a search over layouts.

    python -m d2v2scale.plan --preset vit_h --ds_config ds_configs/vit_h.json --nodes 32 [--tp 2] [--micro_batch N]
    python -m d2v2scale.plan --search --preset vit_h --ds_config ds_configs/vit_h.json --nodes 64
    python -m d2v2scale.plan --paper
    python -m d2v2scale.plan --teacher_layouts --nodes 32

The command line only: the planner itself is :mod:`d2v2scale.planning.planner` (one layout) and
:mod:`d2v2scale.planning.search` (the search over layouts).
"""
from __future__ import annotations

import copy
import json
import sys

from .atomic import write_text
from .cli import OneLineParser, fail, positive_int
from .config import ConfigError, load_config
from .run_spec import load_ds_config
from .planning.cluster import ClusterProfile, load_profile
from .planning.planner import plan, render, set_micro_batch, teacher_layouts
from .planning.search import paper_table, report, search, ways_out
from .planning.timing import load_calibration


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="plan", description=__doc__.splitlines()[0],
                      epilog="examples:\n"
                             "  python -m d2v2scale.plan --preset vit_h --ds_config ds_configs/vit_h_a100_40gb.json --nodes 32\n"
                             "  python -m d2v2scale.plan --search --preset vit_h --ds_config ds_configs/vit_h.json --nodes 32\n"
                             "  python -m d2v2scale.plan --preset vit_h --ds_config ds_configs/vit_h.json parallel.backend=fsdp2\n"
                             "  python -m d2v2scale.plan --teacher_layouts --nodes 64\n"
                             "  python -m d2v2scale.plan --paper")
    p.add_argument("--preset", help="preset name or YAML (required unless --paper)")
    p.add_argument("--ds_config", help="DeepSpeed JSON (required unless --paper)")
    p.add_argument("--nodes", type=positive_int, default=32, help="nodes (default 32)")
    p.add_argument("--gpus_per_node", type=positive_int, default=None, help="default: the cluster profile's")
    p.add_argument("--cluster", default=None, help="cluster profile name or JSON file (default: DGX A100 40GB, 8x HDR200)")
    p.add_argument("--calibration", default=None, help="calibration.json from bench/gpu_check.py (replaces the "
                                                       "default efficiency curve)")
    p.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel degree (default: the preset's parallel.tp)")
    p.add_argument("--micro_batch", type=positive_int, default=None,
                   help="override train_micro_batch_size_per_gpu (audio: data.max_tokens, in samples)")
    p.add_argument("--search", action="store_true", help="enumerate TP, micro-batch, ZeRO stage, activation "
                                                         "checkpointing and batch scaling; print the best layouts")
    p.add_argument("--top", type=positive_int, default=5, help="with --search: how many layouts to print (default 5)")
    p.add_argument("--shell", action="store_true", help="with --search: print the choice as shell assignments "
                                                        "on stdout (the explanation goes to stderr); for slurm/")
    p.add_argument("--write_ds_config", default=None, help="with --search: write the chosen DeepSpeed JSON here")
    p.add_argument("--paper", action="store_true", help="the paper's own runs, predicted vs published wall time")
    p.add_argument("--teacher_layouts", action="store_true",
                   help="bytes per GPU of the EMA teacher under each backend (bf16) for the large presets on --nodes")
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. model.activation_checkpointing=1)")
    args = p.parse_args(argv)
    try:
        profile = load_profile(args.cluster)
        if args.gpus_per_node:
            profile = ClusterProfile(**{**profile.__dict__, "gpus_per_node": args.gpus_per_node})
        efficiency = load_calibration(args.calibration, profile.gpu)
        if args.paper:
            print(paper_table(profile, efficiency))
            return 0
        if args.teacher_layouts:
            print(teacher_layouts(args.nodes * profile.gpus_per_node))
            return 0
        if not args.preset or not args.ds_config:
            raise ConfigError("--preset and --ds_config are required (or --paper)")
        cfg = load_config(args.preset, args.overrides)
        ds = load_ds_config(args.ds_config)
        set_micro_batch(cfg, ds, args.micro_batch)
        if args.search:
            ranked, rejected = search(cfg, ds, args.nodes, profile, efficiency, pinned_tp=args.tp)
            text, shell, chosen_ds = report(ranked, rejected, args.nodes, profile, args.top)
            if args.write_ds_config:
                write_text(args.write_ds_config, json.dumps(chosen_ds, indent=2))
            print(text, file=sys.stderr if args.shell else sys.stdout)
            if args.shell:
                print(shell)
            return 0
        tp = args.tp or cfg.parallel.tp
        try:
            result = plan(copy.deepcopy(cfg), copy.deepcopy(ds), args.nodes, tp, profile, efficiency)
        except ConfigError as e:
            if "batch math" not in str(e):
                raise
            raise ConfigError(f"{e}. {ways_out(cfg, ds, args.nodes, profile.gpus_per_node, tp)}") from None
    except (ConfigError, OSError) as e:
        return fail("plan", e)
    print(render(result))
    return 0



def entry() -> None:
    """The ``d2v2scale-plan`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
