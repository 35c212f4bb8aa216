"""Integer translations without wrap-around."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .base import InexactActionError, Stride, Transform, as_stride


def shift_zero_fill(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift the last two axes of ``x`` (…, h, w) by ``(dy, dx)`` positions, filling
    the uncovered border with zeros: ``out[..., i, j] = x[..., i - dy, j - dx]``."""
    h, w = x.shape[-2], x.shape[-1]
    if abs(dy) >= h or abs(dx) >= w:
        return x * 0.0
    # pad on the side the content moves away from, then crop to the original size
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


class Translation(Transform):
    """Shift by ``(dx, dy)`` input pixels: positive ``dx`` moves content right,
    positive ``dy`` moves it down. The uncovered border is zero and invalid.

    On a feature map of stride ``s`` the shift becomes ``(dx / s, dy / s)``; when
    that is not an integer the action is inexact and :meth:`apply_map` raises
    :class:`InexactActionError` instead of rounding.
    """

    exact = True

    def __init__(self, dx: int, dy: int) -> None:
        if int(dx) != dx or int(dy) != dy:
            raise ValueError(f"translations are by whole pixels, got ({dx}, {dy})")
        self.dx, self.dy = int(dx), int(dy)

    def _key(self) -> tuple:
        return (self.dx, self.dy)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return (self.dx, self.dy) == (0, 0)

    @property
    def name(self) -> str:
        return f"shift({self.dx},{self.dy})"

    def map_shift(self, stride: float | Stride) -> tuple[int, int]:
        """The shift ``(dy, dx)`` in map positions at ``stride``; raises if inexact."""
        sy, sx = as_stride(stride)
        qy, qx = self.dy / sy, self.dx / sx
        whole = math.isclose(qy, round(qy), abs_tol=1e-6) and math.isclose(
            qx, round(qx), abs_tol=1e-6)
        if not whole:
            raise InexactActionError(
                f"{self.name} is not a whole number of positions on a map of stride "
                f"({sy:g}, {sx:g}); use shifts that are multiples of the stride"
            )
        return int(round(qy)), int(round(qx))

    def _check_map(self, shape: tuple[int, int], stride: Stride) -> None:
        self.map_shift(stride)

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        dy, dx = self.map_shift(stride)
        return shift_zero_fill(x, dy, dx)

    def inverse(self) -> Translation:
        return Translation(-self.dx, -self.dy)

    def _merge(self, other: Transform) -> Transform | None:
        if isinstance(other, Translation):
            return Translation(self.dx + other.dx, self.dy + other.dy)
        return None
