"""``equivision demo`` (train or reuse a small CNN on digits and write a report) and
``equivision list`` (the registered names)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import list_datasets
from ..demo import run_demo
from ..models import list_models
from ..robust.registry import ATTACKS, DEFENSES
from ..ssl.methods import SSL_METHODS
from ..transforms.spec import NAMES as TRANSFORM_NAMES
from .common import positive_int, show_progress

__all__ = ["add_parsers", "cmd_demo", "cmd_list"]


def cmd_demo(args: argparse.Namespace) -> None:
    """Run ``equivision demo``: writes OUT/report.md."""
    path = run_demo(Path(args.out), epochs=args.epochs, device=args.device,
                    progress=show_progress(args))
    print(f"wrote {path}")


def _catalog() -> dict[str, list[str]]:
    """``{what: names}`` for ``equivision list``."""
    return {"models": list_models(), "datasets": list_datasets(),
            "transforms": list(TRANSFORM_NAMES), "attacks": ATTACKS.list(),
            "defenses": DEFENSES.list(), "methods": SSL_METHODS.list()}


def cmd_list(args: argparse.Namespace) -> None:
    """Run ``equivision list [WHAT]``: one line per kind of name."""
    for what, found in _catalog().items():
        if args.what in (what, "all"):
            print(f"{what + ':':<11} " + ", ".join(found))


def add_parsers(sub: Any) -> None:
    """Add ``demo`` and ``list`` to the ``equivision`` subcommand parsers ``sub``."""
    d = sub.add_parser("demo", help="train (or reuse) a small CNN on digits and report on it",
                       description="The main job: writes OUT/report.md with plots.")
    d.add_argument("--out", default="runs/demo", help="folder of report.md and its figures")
    d.add_argument("--epochs", type=positive_int, default=15, help="training epochs")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("list", help="list models, datasets, transformations, attacks, "
                       "defenses and SSL methods")
    s.add_argument("what", nargs="?", default="all", choices=["all", *_catalog()])
    s.set_defaults(func=cmd_list)
