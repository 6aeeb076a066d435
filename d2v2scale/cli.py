"""What every command-line tool shares: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .exit_codes import EXIT_BAD_INPUT


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (``prog: error: ...; see --help``), not a usage block;
    descriptions and examples keep their line breaks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a wrong one is the parser's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed values: integers >= 1")
    return value


def fail(prog: str, error: BaseException) -> int:
    """Print ``error`` as the tool's one-line message and return the bad-input exit code."""
    text = " ".join(str(error).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return EXIT_BAD_INPUT
