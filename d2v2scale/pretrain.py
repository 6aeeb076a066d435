"""Pretrain data2vec 2.0: the command line behind ``launchers/pretrain.py`` and ``d2v2scale-pretrain``.

    deepspeed [--num_gpus N] launchers/pretrain.py --ds_config ds_configs/X.json --preset NAME|path.yaml \\
              [--run_dir DIR] [--resume auto|PATH] [--profile] [section.key=value ...]

Also runs under ``torchrun --nproc_per_node N``, ``srun`` and as a plain ``python`` process.
Exit codes: 0 done, 2 bad configuration or arguments (one line, no traceback), 3 pre-empted
(checkpoint written; requeue with ``--resume auto``), 4 hung (the watchdog wrote every rank's
stacks to ``RUN/incidents/``), 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from .cli import OneLineParser
from .config import ConfigError
from .exit_codes import EXIT_BAD_INPUT, EXIT_OK
from .logs import setup_logging

EXAMPLES = """examples:
  deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/cpu_tiny.json --preset tiny_image
  torchrun --nproc_per_node 8 launchers/pretrain.py --ds_config ds_configs/vit_h.json --preset vit_h parallel.backend=fsdp2
  python launchers/pretrain.py --ds_config ds_configs/vit_b.json --preset vit_b --print-config model.depth=6
  python launchers/pretrain.py --list-presets"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's command line; a mistake raises :class:`~d2v2scale.errors.UsageError` (rank 0 prints it)."""
    p = OneLineParser(prog="pretrain.py", description=__doc__.splitlines()[0], epilog=EXAMPLES, raise_errors=True)
    p.add_argument("--ds_config", help="DeepSpeed JSON (ds_configs/*.json): optimizer, schedule, precision, ZeRO stage, "
                                       "batch split, metric sinks")
    p.add_argument("--preset", help="preset name (see --list-presets) or a YAML file")
    p.add_argument("--run_dir", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", default=None, help="auto | checkpoint tag or path")
    p.add_argument("--profile", action="store_true", help="write a profiling report (= profiling.enabled=true)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run_dir that holds a run: the old one is moved aside, never deleted")
    p.add_argument("--dry_run", action="store_true", help="validate and print the batch math, then exit")
    p.add_argument("--print-config", dest="print_config", action="store_true",
                   help="print the fully resolved config and DeepSpeed JSON, then exit")
    p.add_argument("--list-presets", dest="list_presets", action="store_true",
                   help="list the shipped presets (modality, size, global batch, updates), then exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. train.max_updates=1000 parallel.tp=2)")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if not args.list_presets and not (args.ds_config and args.preset):
        p.error("the following arguments are required: " + ", ".join(
            name for name, value in (("--ds_config", args.ds_config), ("--preset", args.preset)) if not value))
    return args


def list_presets() -> str:
    from .config import load_config, preset_names

    rows = []
    for name in preset_names():
        cfg = load_config(name)
        m = cfg.model
        rows.append(f"  {name:<12} {m.modality:<6} {m.depth + m.prenet_depth:>3} blocks × {m.embed_dim:<5} "
                    f"global batch {cfg.train.global_batch:>5}, {cfg.train.max_updates:>9,} updates")
    return "presets (d2v2scale/presets/*.yaml):\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    setup_logging(rank)
    from .train.run import AlreadyComplete, prepare, run

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.list_presets:
            print(list_presets())
            return EXIT_OK
        if args.print_config:
            args.dry_run = True  # validate everything, start nothing
        setup = prepare(args)  # everything that can be wrong with the input fails here, before any process group
    except ConfigError as e:
        if rank == 0:
            print(f"pretrain.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AlreadyComplete as e:
        if rank == 0:
            print(f"[d2v2scale] {e}")
        return EXIT_OK
    if args.print_config:
        print(yaml.safe_dump({"config": setup.cfg.run_dict(), "ds_config": setup.spec.json_copy()}, sort_keys=False),
              end="")
        return EXIT_OK
    if args.dry_run:
        for note in setup.notes:
            print(f"[d2v2scale] {note}")
        print(f"[d2v2scale] {setup.cfg.preset}: {setup.spec.describe(setup.cfg)}")
        return EXIT_OK
    return run(setup)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
