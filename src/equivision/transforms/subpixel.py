"""Sub-pixel translations: shifts by any real number of pixels, bilinear, zero fill.

Whole-pixel :class:`~.translation.Translation` s are measured only on maps whose stride
divides them, where a CNN without subsampling is equivariant by construction (border
effects aside). A shift by 0.5 px, or by 1 px on a stride-2 map (half a position), is
defined at every layer: the map is shifted by ``shift / stride`` positions with linear
interpolation, so the equivariance that subsampling loses (aliasing, Zhang 2019;
Azulay & Weiss 2019) becomes measurable. The inverse on a strided map (what
``measure.compare.align_back`` applies) is the map shifted back by ``shift / stride``,
through the same :meth:`SubpixelShift.apply_map`.
"""

from __future__ import annotations

import math
import re

from torch import Tensor

from .base import Stride, Transform, as_stride
from .translation import Translation, shift_zero_fill

__all__ = ["SubpixelShift", "build_subshift", "linear_shift"]


def _shift_axis(x: Tensor, d: float, axis: int) -> Tensor:
    """Shift ``x`` by ``d`` positions along ``axis`` (-1: width, -2: height), linear
    interpolation between the two whole shifts around ``d``, zero fill."""
    n = math.floor(d)
    frac = d - n
    whole = (n, 0) if axis == -2 else (0, n)
    lo = shift_zero_fill(x, *whole)
    if frac < 1e-9:
        return lo
    step = (n + 1, 0) if axis == -2 else (0, n + 1)
    return (1.0 - frac) * lo + frac * shift_zero_fill(x, *step)


def linear_shift(x: Tensor, dy: float, dx: float) -> Tensor:
    """Shift the last two axes of ``x (..., h, w)`` by ``(dy, dx)`` positions (any reals;
    positive moves content down / right), bilinear, zero fill:
    ``out[..., i, j] = x(i - dy, j - dx)`` interpolated."""
    return _shift_axis(_shift_axis(x, dy, -2), dx, -1)


class SubpixelShift(Transform):
    """Shift by ``(dx, dy)`` input pixels, any real numbers (bilinear, zero fill).

    On a map of stride ``s`` the shift is ``(dx / s, dy / s)`` positions, interpolated
    when that is not whole: defined at every stride, never rounded. Whole shifts act
    exactly as :class:`~.translation.Translation` (but the class is reported inexact:
    it interpolates in general). Positions whose value comes partly from outside the
    map are invalid (:meth:`valid_mask`).
    """

    exact = False

    def __init__(self, dx: float, dy: float) -> None:
        if not (math.isfinite(dx) and math.isfinite(dy)):
            raise ValueError(f"shifts must be finite numbers, got ({dx}, {dy})")
        self.dx, self.dy = float(dx), float(dy)

    def _key(self) -> tuple:
        return (self.dx, self.dy)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return (self.dx, self.dy) == (0.0, 0.0)

    @property
    def name(self) -> str:
        return f"subshift({self.dx:g},{self.dy:g})"

    def map_shift(self, stride: float | Stride) -> tuple[float, float]:
        """The shift ``(dy, dx)`` in map positions at ``stride`` (sub-pixel allowed)."""
        sy, sx = as_stride(stride)
        return self.dy / sy, self.dx / sx

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        dy, dx = self.map_shift(stride)
        return linear_shift(x, dy, dx)

    def inverse(self) -> SubpixelShift:
        return SubpixelShift(-self.dx, -self.dy)

    def _merge(self, other: Transform) -> Transform | None:
        # a whole-pixel shift commutes with interpolation: the sum is exact
        if isinstance(other, Translation):
            return SubpixelShift(self.dx + other.dx, self.dy + other.dy)
        return None


def build_subshift(arg: str, entry: str) -> list[Transform]:
    """The spec entry ``subshift:D`` (diagonal ``(D, D)``), ``subshift:DXxDY`` (e.g.
    ``subshift:0.5x0``) or ``subshift:D1/D2/...`` (several diagonal shifts); plain
    ``subshift`` is the half-pixel diagonal shift ``(0.5, 0.5)``."""
    arg = arg or "0.5"
    out: list[Transform] = []
    for part in arg.split("/"):
        m = re.fullmatch(r"\s*(-?[\d.]+)(?:x(-?[\d.]+))?\s*", part.lower())
        if not m:
            raise ValueError(f"bad shift {part!r} in {entry!r}; write e.g. subshift:0.5, "
                             "subshift:0.5x0 or subshift:0.25/0.5")
        dx = float(m.group(1))
        out.append(SubpixelShift(dx, float(m.group(2)) if m.group(2) is not None else dx))
    return out
