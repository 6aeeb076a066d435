"""Rebuild a run's profiling report from its files: ``python -m d2v2scale.report RUN_DIR``."""
from __future__ import annotations

import sys

from .profiling.report import build_report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m d2v2scale.report RUN_DIR", file=sys.stderr)
        return 2
    report = build_report(args[0])
    print(f"wrote {report['run_dir']}/report/report.md, report.json and {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
