"""What every command-line tool shares: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (``prog: error: ...; see --help``), not a usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def fail(prog: str, error: BaseException) -> int:
    """Print ``error`` as the tool's one-line message and return the bad-input exit code."""
    text = " ".join(str(error).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return EXIT_BAD_INPUT
