"""``equivision exactness``: does subsampling keep a group CNN exactly equivariant at an
input size? (:func:`equivision.gcnn.analyze_exactness`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..gcnn import (
    aligned_sizes,
    analyze_exactness,
    analyze_translation,
    exact_sizes,
    nearest_aligned_size,
    nearest_exact_size,
)
from ..gcnn.exactness import CONSTRAINED, ExactnessReport, TraceError
from ..io import check_writable_file
from .common import CLIError, load_model, positive_int, write_json

__all__ = ["add_parsers", "cmd_exactness", "parse_size"]


def parse_size(text: str) -> tuple[int, int]:
    """``"32"`` -> ``(32, 32)``, ``"28x36"`` -> ``(28, 36)``."""
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise CLIError(f"--input-size takes N or HxW, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise CLIError(f"--input-size takes a positive N or HxW, got {text!r}")
    return vals[0], vals[1]


def _size_range(text: str) -> tuple[int, int]:
    """``--range A:B`` -> ``(A, B)``."""
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise CLIError(f"--range takes A:B, e.g. 20:40, got {text!r}") from None
    if a < 1 or b < a:
        raise CLIError(f"--range A:B needs 1 <= A <= B, got {text!r}; e.g. "
                       f"{min(a, b) if min(a, b) >= 1 else 1}:{max(a, b)}")
    return a, b


def cmd_exactness(args: argparse.Namespace) -> None:
    """Run ``equivision exactness``; the last line printed is the verdict."""
    size = parse_size(args.input_size)
    span = _size_range(args.range) if args.range else None  # bad input fails first
    if args.json:
        check_writable_file(args.json, "--json")  # before the analysis
    model, name = load_model(args.model, args.model_args, args.checkpoint)
    ch = args.in_channels
    try:
        if args.translation:
            shifts = analyze_translation(model, size, in_channels=ch)
            print(shifts.table())
            if args.json:
                write_json(args.json, {"model": name, **shifts.to_dict()})
            print(f"verdict: {shifts.verdict}")
            return
        report = analyze_exactness(model, size, in_channels=ch, group=args.group)
    except TraceError as err:
        raise CLIError(str(err)) from None
    print(report.table())
    lines, sizes = _size_lines(model, report, size, span, ch, args.group)
    for line in lines:
        print(line)
    if args.json:
        write_json(args.json, {"model": name, **report.to_dict(), **sizes, "notes_cli": lines})
    print(f"verdict: {report.verdict}")


def _size_lines(model: Any, report: ExactnessReport, size: tuple[int, int],
                span: tuple[int, int] | None, ch: int | None, group: str
                ) -> tuple[list[str], dict[str, Any]]:
    """The size-search lines printed under the table, and the same as JSON fields.

    The nearest exact sizes (square inputs) and, with ``--range``, the exact sizes in it.
    When the weights are not constrained (a plain CNN: no size is exact) the nearest
    aligned sizes and the aligned sizes in the range too, marked as the sampling geometry
    alone."""
    plain = report.weights != CONSTRAINED
    caveat = (f" (sampling geometry only: the weights are {report.weights}, so these sizes "
              "are not exact)")
    lines: list[str] = []
    sizes: dict[str, Any] = {}
    if size[0] == size[1]:
        below, above = nearest_exact_size(model, size[0], in_channels=ch, group=group)
        lines.append(f"nearest exact sizes to {size[0]}: below {below}, above {above}")
        sizes["nearest_exact"] = [below, above]
        if plain:
            below, above = nearest_aligned_size(model, size[0], in_channels=ch, group=group)
            lines.append(f"nearest aligned sizes to {size[0]}: below {below}, above {above}"
                         + caveat)
            sizes["nearest_aligned"] = [below, above]
    if span:
        lo, hi = span
        found = exact_sizes(model, lo, hi, in_channels=ch, group=group)
        lines.append(f"exact sizes in {lo}..{hi}: {', '.join(map(str, found)) or 'none'}")
        sizes["exact_sizes"] = found
        if plain:
            found = aligned_sizes(model, lo, hi, in_channels=ch, group=group)
            lines.append(f"aligned sizes in {lo}..{hi}: "
                         f"{', '.join(map(str, found)) or 'none'}" + caveat)
            sizes["aligned_sizes"] = found
    return lines, sizes


def add_parsers(sub: Any) -> None:
    """Add ``exactness`` to the ``equivision`` subcommand parsers ``sub``."""
    e = sub.add_parser("exactness", help="does subsampling keep a model exactly equivariant?",
                       description="Trace every conv and pooling layer at an input size and "
                       "check (i + 2p - k_eff) mod s == 0; last line: the verdict.")
    e.add_argument("--model", required=True, help="registry name or module:attr")
    e.add_argument("--model-args", help="constructor arguments, e.g. width=0.5")
    e.add_argument("--checkpoint", help="weights (not needed for the analysis)")
    e.add_argument("--input-size", required=True, help="N or HxW")
    e.add_argument("--group", default="p4", choices=["p4", "p4m", "flip"])
    e.add_argument("--range", help="A:B, list the exact square sizes in this range (and, "
                   "for a model with unconstrained weights, the aligned ones)")
    e.add_argument("--in-channels", type=positive_int, default=None,
                   help="input channels, for models without a convolution weight to read "
                   "them from")
    e.add_argument("--translation", action="store_true",
                   help="translation mode: the integer shifts each layer is exactly "
                   "equivariant to, and the subsampling layers that alias")
    e.add_argument("--json", help="write the report as JSON to this path")
    e.set_defaults(func=cmd_exactness)
