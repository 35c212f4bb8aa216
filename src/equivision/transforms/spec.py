"""Transformations in one form: parse spec strings, accept ``Transform`` objects.

:func:`as_transforms` is what every part calls: it takes a spec string such as
``"rot90,flip,shift:1-8"``, a single :class:`~equivision.transforms.Transform`, or a
sequence mixing both, and returns a list of transformations. Entry names are kept in
:data:`TRANSFORMATIONS`, a :class:`~equivision.registry.Registry` (unknown names get
did-you-mean suggestions).

Grammar (entries separated by commas or spaces)::

    identity
    rot90            rotations by 90, 180 and 270 degrees
    rot90:1,3        only 90 and 270 (digits after the colon are multiples of 90)
    hflip  vflip     mirror left-right / top-bottom
    flip             hflip and vflip
    d4               the seven non-identity elements of D4
    shift:1-8        diagonal shifts (d, d) for d = 1..8 input pixels
    shift:4          the diagonal shift (4, 4)
    shiftx:1-4       horizontal shifts (d, 0);  shifty:1-4 vertical shifts (0, d)
    subshift:0.5     sub-pixel shift (0.5, 0.5), bilinear; subshift:0.5x0, subshift:0.25/0.5
    rotate:15        bilinear rotation by 15 degrees (rotate:-15 for the other way)
    scale:1.2        isotropic scaling; scale:1.2x0.8 anisotropic (width x height)
    jitter:B/C/S/H   colour jitter: brightness added, contrast, saturation, hue (deg)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..registry import Registry, UnknownNameError, suggest
from .affine import Rotation, Scale
from .base import Transform
from .dihedral import Dihedral, hflip, identity, vflip
from .photometric import ColorJitter
from .subpixel import build_subshift
from .translation import Translation


def _range(text: str, entry: str) -> list[int]:
    m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", text)
    if not m:
        raise ValueError(f"bad range {text!r} in {entry!r}; write e.g. 1-8 or 4")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise ValueError(f"empty range {text!r} in {entry!r}")
    return list(range(lo, hi + 1))


def _split(spec: str) -> list[str]:
    # commas separate entries, except inside "rot90:1,3" style lists of digits
    tokens = [t for t in re.split(r"[\s,]+", spec.strip()) if t]
    out: list[str] = []
    for t in tokens:
        if out and re.fullmatch(r"\d+", t) and out[-1].startswith("rot90:"):
            out[-1] += "," + t
        else:
            out.append(t)
    return out


def _rot90(arg: str, entry: str) -> list[Transform]:
    ks = [int(k) for k in arg.split(",")] if arg else [1, 2, 3]
    return [Dihedral(k) for k in ks]


def _d4(arg: str, entry: str) -> list[Transform]:
    return [Dihedral(k, f) for f in (False, True) for k in range(4) if (k, f) != (0, False)]


def _shifts(direction: tuple[int, int]) -> Callable[[str, str], list[Transform]]:
    """Builder of ``shift*:A-B``: ``Translation(d * ux, d * uy)`` for ``d`` in the range."""

    def build(arg: str, entry: str) -> list[Transform]:
        if not arg:
            raise ValueError(f"{entry!r} needs a range, e.g. shift:1-8")
        return [Translation(d * direction[0], d * direction[1]) for d in _range(arg, entry)]

    return build


def _scale(arg: str, entry: str) -> list[Transform]:
    sx, _, sy = arg.lower().partition("x")
    return [Scale(float(sx), float(sy) if sy else None)]


def _jitter(arg: str, entry: str) -> list[Transform]:
    vals = [float(v) for v in arg.split("/")] if arg else []
    defaults = [0.0, 1.0, 1.0, 0.0]
    if len(vals) > 4:
        raise ValueError("jitter takes at most 4 values B/C/S/H")
    return [ColorJitter(*(vals + defaults[len(vals):]))]


class SpecEntry(NamedTuple):
    """A transformation name of the spec grammar: ``build(arg, entry)`` expands the entry
    (``arg`` is the text after the colon); ``usage`` is its grammar, e.g. ``"shift:A-B"``."""

    build: Callable[[str, str], list[Transform]]
    usage: str


#: the entry names of the spec grammar
TRANSFORMATIONS: Registry[SpecEntry] = Registry("transformation", normalize=str.lower)
for _name, _entry in (
    ("identity", SpecEntry(lambda a, e: [identity()], "identity")),
    ("rot90", SpecEntry(_rot90, "rot90[:k,...]")),
    ("hflip", SpecEntry(lambda a, e: [hflip()], "hflip")),
    ("vflip", SpecEntry(lambda a, e: [vflip()], "vflip")),
    ("flip", SpecEntry(lambda a, e: [hflip(), vflip()], "flip")),
    ("d4", SpecEntry(_d4, "d4")),
    ("shift", SpecEntry(_shifts((1, 1)), "shift:A-B")),
    ("shiftx", SpecEntry(_shifts((1, 0)), "shiftx:A-B")),
    ("shifty", SpecEntry(_shifts((0, 1)), "shifty:A-B")),
    ("subshift", SpecEntry(build_subshift, "subshift[:D[xD][/...]]")),
    ("rotate", SpecEntry(lambda a, e: [Rotation(float(a))], "rotate:DEG")),
    ("scale", SpecEntry(_scale, "scale:S[xS]")),
    ("jitter", SpecEntry(_jitter, "jitter:B/C/S/H")),
):
    TRANSFORMATIONS.add(_name, _entry, description=_entry.usage)

#: the grammar of each entry, in the order of the module docstring
NAMES: tuple[str, ...] = tuple(
    TRANSFORMATIONS.get(n).usage for n in (
        "identity", "rot90", "hflip", "vflip", "flip", "d4", "shift", "shiftx", "shifty",
        "subshift", "rotate", "scale", "jitter"))


def parse_transform_entry(entry: str) -> list[Transform]:
    """Expand one entry of the grammar above into transformations.

    Raises:
        UnknownNameError: an unknown name (a ``ValueError``; did-you-mean suggestions).
        ValueError: a bad argument.
    """
    name, _, arg = entry.partition(":")
    if name not in TRANSFORMATIONS:
        raise UnknownNameError(
            f"unknown transformation {entry!r}.{suggest(name.lower(), TRANSFORMATIONS.list())} "
            f"valid entries: {', '.join(NAMES)}")
    try:
        return TRANSFORMATIONS.get(name).build(arg, entry)
    except ValueError as err:
        if "could not convert" in str(err) or "invalid literal" in str(err):
            raise ValueError(f"bad argument in transformation {entry!r}: {err}") from None
        raise


def parse_transforms(spec: str | list[str]) -> list[Transform]:
    """Parse ``"rot90,flip,shift:1-8"`` (or a list of entries) into transformations."""
    entries = _split(spec) if isinstance(spec, str) else [e for s in spec for e in _split(s)]
    if not entries:
        raise ValueError(f"no transformation given; valid entries: {', '.join(NAMES)}")
    out: list[Transform] = []
    for e in entries:
        for t in parse_transform_entry(e):
            if t not in out:
                out.append(t)
    return out


TransformSpec = str | Transform | Sequence[str | Transform]


def as_transforms(spec: TransformSpec) -> list[Transform]:
    """Transformations in one form: a list of :class:`Transform`.

    Args:
        spec: a spec string (``"rot90,flip,shift:1-8"``, grammar above), one
            :class:`Transform`, or a sequence of Transforms and/or spec strings. Strings
            expand as in :func:`parse_transforms` (repeated entries dropped); Transforms
            are kept as given, in order.

    Returns:
        A new, non-empty list of transformations.

    Raises:
        TypeError: something that is neither a string nor a Transform (a Transform class
            rather than an instance, a tensor, a number, ``None``...).
        ValueError: an empty spec or sequence, an unknown name (with did-you-mean
            suggestions) or a bad argument.
    """
    if isinstance(spec, str):
        return parse_transforms(spec)
    if isinstance(spec, Transform):
        return [spec]
    if not isinstance(spec, Sequence):
        raise TypeError(_not_a_transform(spec, "transformations"))
    out: list[Transform] = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            out.extend(parse_transforms(item))
        elif isinstance(item, Transform):
            out.append(item)
        else:
            raise TypeError(_not_a_transform(item, f"item {i} of the transformations"))
    if not out:
        raise ValueError(f"no transformation given; valid entries: {', '.join(NAMES)}")
    return out


def _not_a_transform(item: object, what: str) -> str:
    hint = ""
    if isinstance(item, type) and issubclass(item, Transform):
        hint = f"; pass an instance such as {item.__name__}(...), not the class"
    return (f"{what} must be a spec string such as 'rot90,flip,shift:1-8', a Transform or "
            f"a sequence of them, got {type(item).__name__}{hint}")
