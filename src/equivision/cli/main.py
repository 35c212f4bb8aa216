"""The ``equivision`` command: assembles the subcommands of every command group and runs
one; a user error prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import data, demo, gcnn, measure, robust, ssl, train
from .common import CLIError

__all__ = ["main", "make_parser"]

#: command groups, in the order ``equivision --help`` lists their subcommands
GROUPS = (measure, train, demo, gcnn, robust, ssl, data)


def make_parser() -> argparse.ArgumentParser:
    """The ``equivision`` parser with every group's subcommands."""
    p = argparse.ArgumentParser(
        prog="equivision", description="Equivariance in vision models: measure, train, demo.")
    p.add_argument("--version", action="version", version=f"equivision {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``equivision ARGV``; returns the exit status (0, or 2 on a user error)."""
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if os.environ.get("EQUIVISION_DEBUG"):
            raise
        print(f"equivision {args.command}: error: {err} (set EQUIVISION_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 2
    return 0
