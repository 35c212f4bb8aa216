"""``equivision data download NAME`` (fetch a real dataset's official files, verified)
and ``equivision data list`` (every named dataset and, for real ones, where its files
are)."""

from __future__ import annotations

import argparse
from typing import Any

from ..data import REAL_DATASETS, DatasetNotFoundError, describe_datasets, find_real_dataset
from ..data.download import MIRROR_ENV, download_dataset
from ..data.real import DATA_ENV

__all__ = ["add_parsers", "cmd_download", "cmd_list"]


def cmd_download(args: argparse.Namespace) -> None:
    """Run ``equivision data download NAME``: prints one line per file, then the folder."""
    folder = download_dataset(args.name, root=args.root, mirror=args.mirror,
                              log=None if args.quiet else print)
    print(f"{args.name}: {folder}")


def cmd_list(args: argparse.Namespace) -> None:
    """Run ``equivision data list``: one line per named dataset."""
    del args
    for name, description in describe_datasets().items():
        where = ""
        if name in REAL_DATASETS:
            try:
                where = f" [found in {find_real_dataset(name)}]"
            except DatasetNotFoundError:
                where = f" [not found; `equivision data download {name}`]"
        print(f"{name:<15} {description}{where}")


def add_parsers(sub: Any) -> None:
    """Add the ``data`` command group to the ``equivision`` subcommand parsers ``sub``."""
    d = sub.add_parser("data", help="list datasets, download Fashion-MNIST or MNIST",
                       description="Datasets: list the named ones, download real ones.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    g = dsub.add_parser(
        "download", help="fetch a real dataset's official files (SHA-256 checked)",
        description="Fetch the official IDX files into ROOT/NAME/, verify each file's "
        "SHA-256, and move it into place only when it matches. Files already there with "
        "the right checksum are kept.")
    g.add_argument("name", choices=sorted(REAL_DATASETS), metavar="NAME",
                   help=f"one of {', '.join(sorted(REAL_DATASETS))}")
    g.add_argument("--root", default=None,
                   help=f"folder that holds dataset folders (default ${DATA_ENV}, else "
                   "~/.cache/equivision)")
    g.add_argument("--mirror", default=None,
                   help=f"base URL to fetch MIRROR/<file> from (default ${MIRROR_ENV}, else "
                   "the official URL); {name} in it becomes NAME")
    g.add_argument("--quiet", action="store_true", help="print only the folder")
    g.set_defaults(func=cmd_download)
    ls = dsub.add_parser("list", help="named datasets, and where real ones were found")
    ls.set_defaults(func=cmd_list)
