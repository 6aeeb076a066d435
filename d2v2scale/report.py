"""Rebuild a run's profiling report from its files: ``python -m d2v2scale.report RUN_DIR``.

Reads ``metrics.jsonl``, ``config.yaml``, ``ds_config.json`` (and ``report/profile.json`` when the
run was profiled) and writes ``RUN_DIR/report/``: report.md, report.json and the PNG plots.
Exit codes: 0 written, 2 a run directory it cannot report on (one line, no traceback).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from . import runfiles
from .cli import OneLineParser, fail
from .config import ConfigError

NEEDED = (runfiles.METRICS, runfiles.CONFIG, runfiles.DS_CONFIG)


def check_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run directory (e.g. runs/demo)")
    missing = [name for name in NEEDED if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{path} is not a run directory: no {', '.join(missing)} (written by launchers/pretrain.py)")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="report", description=__doc__.splitlines()[0],
                      epilog="example: python -m d2v2scale.report runs/demo  (then open runs/demo/report/report.md)")
    p.add_argument("run_dir", help="a run directory written by launchers/pretrain.py (holds metrics.jsonl)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from .profiling.report import build_report

    try:
        report = build_report(check_run_dir(args.run_dir))
    except (ConfigError, ValueError, OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        return fail("report", e)
    print(f"wrote {report['run_dir']}/report/report.md, report.json and {', '.join(report['plots'])}")
    return 0



def entry() -> None:
    """The ``d2v2scale-report`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
