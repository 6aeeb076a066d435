"""What every command-line tool shares: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from .errors import UsageError
from .exit_codes import EXIT_BAD_INPUT


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``prog: error: ...; see prog --help``), not a usage
    block; descriptions and examples keep their line breaks. ``raise_errors``: raise it as a
    :class:`~d2v2scale.errors.UsageError` for the caller to print (the launcher, where only rank 0
    speaks) instead of printing it and exiting 2."""

    def __init__(self, *args, raise_errors: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message: str) -> NoReturn:
        line = f"{message}; see {self.prog} --help"
        if self.raise_errors:
            raise UsageError(line)
        print(f"{self.prog}: error: {line}", file=sys.stderr)
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
