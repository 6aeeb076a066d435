"""Pretrain data2vec 2.0 with DeepSpeed.

    deepspeed [--num_gpus N] launchers/pretrain.py --ds_config ds_configs/X.json --preset NAME|path.yaml \\
              [--run_dir DIR] [--resume auto|PATH] [--profile] [section.key=value ...]

Also runs under ``torchrun --nproc_per_node N``, ``srun`` and as a plain ``python`` process.
Exit codes: 0 done, 2 bad configuration or arguments (one line, no traceback), 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2v2scale.config import ConfigError  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_BAD_CONFIG = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other configuration error
        raise ConfigError(f"{message}; usage: pretrain.py --ds_config JSON --preset NAME [section.key=value ...]")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--preset", required=True, help="preset name (d2v2scale/presets) or YAML path")
    p.add_argument("--run_dir", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", default=None, help="auto | checkpoint tag or path")
    p.add_argument("--profile", action="store_true", help="write a profiling report")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run_dir that holds a run: the old one is moved aside, never deleted")
    p.add_argument("--dry_run", action="store_true", help="validate and print the batch math, then exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # appended by deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    from d2v2scale.train.run import AlreadyComplete, prepare, run

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        setup = prepare(args)  # everything that can be wrong with the input fails here, before any process group
    except ConfigError as e:
        if rank == 0:
            print(f"pretrain.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except AlreadyComplete as e:
        if rank == 0:
            print(f"[d2v2scale] {e}")
        return EXIT_OK
    if args.dry_run:
        from d2v2scale.train.ds_config import describe_optimization

        for note in setup.notes:
            print(f"[d2v2scale] {note}")
        print(f"[d2v2scale] {setup.cfg.preset}: {describe_optimization(setup.ds_config, setup.cfg, setup.plan)}")
        return EXIT_OK
    return run(setup)


if __name__ == "__main__":
    sys.exit(main())
