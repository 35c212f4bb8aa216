"""Parse transformation lists written on the command line.

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
    rotate:15        bilinear rotation by 15 degrees (rotate:-15 for the other way)
    scale:1.2        isotropic scaling; scale:1.2x0.8 anisotropic (width x height)
    jitter:B/C/S/H   colour jitter: brightness added, contrast, saturation, hue (deg)
"""

from __future__ import annotations

import re

from .affine import Rotation, Scale
from .base import Transform
from .dihedral import Dihedral, hflip, identity, vflip
from .photometric import ColorJitter
from .translation import Translation

NAMES = (
    "identity", "rot90[:k,...]", "hflip", "vflip", "flip", "d4", "shift:A-B", "shiftx:A-B",
    "shifty:A-B", "rotate:DEG", "scale:S[xS]", "jitter:B/C/S/H",
)


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


def parse_transform_entry(entry: str) -> list[Transform]:
    """Expand one entry of the grammar above into transformations."""
    name, _, arg = entry.partition(":")
    name = name.lower()
    try:
        if name == "identity":
            return [identity()]
        if name == "rot90":
            ks = [int(k) for k in arg.split(",")] if arg else [1, 2, 3]
            return [Dihedral(k) for k in ks]
        if name == "hflip":
            return [hflip()]
        if name == "vflip":
            return [vflip()]
        if name == "flip":
            return [hflip(), vflip()]
        if name == "d4":
            return [Dihedral(k, f) for f in (False, True) for k in range(4) if (k, f) != (0, False)]
        if name in ("shift", "shiftx", "shifty"):
            if not arg:
                raise ValueError("needs a range, e.g. shift:1-8")
            ds = _range(arg, entry)
            if name == "shift":
                return [Translation(d, d) for d in ds]
            if name == "shiftx":
                return [Translation(d, 0) for d in ds]
            return [Translation(0, d) for d in ds]
        if name == "rotate":
            return [Rotation(float(arg))]
        if name == "scale":
            sx, _, sy = arg.lower().partition("x")
            return [Scale(float(sx), float(sy) if sy else None)]
        if name == "jitter":
            vals = [float(v) for v in arg.split("/")] if arg else []
            defaults = [0.0, 1.0, 1.0, 0.0]
            if len(vals) > 4:
                raise ValueError("jitter takes at most 4 values B/C/S/H")
            return [ColorJitter(*(vals + defaults[len(vals):]))]
    except ValueError as err:
        if "could not convert" in str(err) or "invalid literal" in str(err):
            raise ValueError(f"bad argument in transformation {entry!r}: {err}") from None
        raise
    raise ValueError(
        f"unknown transformation {entry!r}; valid entries: {', '.join(NAMES)}"
    )


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
