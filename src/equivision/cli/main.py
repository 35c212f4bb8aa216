"""The ``equivision`` command: assembles the subcommands of every command group and runs
one; a user error or an OS error (read-only folder, disk full, a file where a folder
belongs) prints one line naming the path and exits with status 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import data, demo, gcnn, lie, measure, robust, ssl, train
from .common import CLIError
from .config import apply_config, config_path, finish_parser

__all__ = ["main", "make_parser", "os_error_message"]

#: command groups, in the order ``equivision --help`` lists their subcommands
GROUPS = (measure, lie, train, demo, gcnn, robust, ssl, data)

#: the fix to suggest for an OS error, by errno
_FIXES = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EPERM: "check the permissions or choose another folder",
    errno.EEXIST: "choose another path, or add --resume to continue a run",
    errno.ENOTDIR: "give a folder path",
    errno.EISDIR: "give a file path",
}


def make_parser() -> argparse.ArgumentParser:
    """The ``equivision`` parser with every group's subcommands (each with ``--config``,
    ``--quiet`` and its defaults in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="equivision", description="Equivariance in vision models: measure, train, demo.")
    p.add_argument("--version", action="version", version=f"equivision {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    for parser in sub.choices.values():
        finish_parser(parser)
    return p


def os_error_message(err: OSError) -> str:
    """One line for an OS error: what failed, on which path, and the fix."""
    text = err.strerror or str(err)
    if err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {str(err.filename)!r}"
    fix = _FIXES.get(err.errno or 0)
    return f"{text}; {fix}" if fix and fix.split()[0] not in text else text


def _fail(command: str, message: str) -> int:
    print(f"equivision {command}: error: {message} (set EQUIVISION_DEBUG=1 for the "
          "traceback)", file=sys.stderr)
    return 2


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Apply ``--config`` of the subcommand in ``argv``; returns the subcommand's name."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if a in sub.choices), None)
    path = config_path(argv[argv.index(command) + 1:]) if command else None
    if command and path:
        apply_config(sub.choices[command], path)
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``equivision ARGV``; returns the exit status (0, or 2 on a user or OS error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    try:
        _apply_config(parser, argv)
    except CLIError as err:
        return _fail(next((a for a in argv if not a.startswith("-")), ""), str(err))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except OSError as err:
        if os.environ.get("EQUIVISION_DEBUG"):
            raise
        return _fail(args.command, os_error_message(err))
    except (CLIError, ValueError, TypeError, RuntimeError) as err:
        if os.environ.get("EQUIVISION_DEBUG"):
            raise
        return _fail(args.command, str(err))
    return 0
