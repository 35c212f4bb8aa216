"""Interpolated geometric transformations: rotation by any angle and scaling.

Both act about the centre of the map, keep its size, use bilinear interpolation
(kornia) and fill uncovered positions with zeros, which :meth:`valid_mask` marks
invalid. They act the same way on a map of any resolution, so the stride does not
matter.
"""

from __future__ import annotations

import math
from functools import lru_cache

import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Stride, Transform
from .dihedral import Dihedral


@lru_cache(maxsize=64)
def _grid(theta: tuple[float, float, float, float], h: int, w: int, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """Sampling grid ``(1, h, w, 2)`` of ``F.grid_sample`` (``align_corners=True``) for the
    linear map ``theta = (a, b, c, d)`` (output -> input, normalized coordinates, no
    translation). Cached: the defense and SER apply the same few maps every step."""
    t = torch.tensor([[theta[0], theta[1], 0.0], [theta[2], theta[3], 0.0]],
                     dtype=torch.float64)
    grid = F.affine_grid(t[None], [1, 1, h, w], align_corners=True)
    return grid.to(device=device, dtype=dtype)


def _warp(x: Tensor, theta: tuple[float, float, float, float], mode: str) -> Tensor:
    """Warp ``x (N, C, h, w)`` about its centre by ``theta`` (output -> input, normalized
    coordinates), zero fill; the same result as kornia's ``rotate`` / ``scale`` with
    ``align_corners=True`` without rebuilding the matrices and the grid on every call."""
    h, w = x.shape[-2:]
    grid = _grid(theta, h, w, x.dtype, x.device)
    return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode=mode,
                         padding_mode="zeros", align_corners=True)


def rotate_batch(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate each image of ``x (B, C, H, W)`` by its own angle, ``angles (B,)`` degrees
    counter-clockwise: multiples of 90° exactly (:class:`~.dihedral.Dihedral`), others
    bilinearly about the centre with zero fill (:class:`Rotation`'s action)."""
    out = torch.empty_like(x)
    quarter = torch.remainder(angles, 90.0) == 0
    ks = torch.remainder(torch.round(angles / 90.0), 4).long()
    for k in range(4):
        sel = quarter & (ks == k)
        if sel.any():
            out[sel] = Dihedral(k).apply_map(x[sel])
    if (~quarter).any():
        sel = ~quarter
        out[sel] = KT.rotate(x[sel], angles[sel].to(x.dtype), mode="bilinear",
                             padding_mode="zeros", align_corners=True)
    return out


class Rotation(Transform):
    """Rotation by ``angle`` degrees counter-clockwise about the centre (bilinear).

    ``Rotation(90)`` agrees with ``rot90(1)`` on square maps (up to float error) but
    is reported inexact: only :class:`~equivision.transforms.dihedral.Dihedral`
    elements permute pixels exactly.
    """

    exact = False

    def __init__(self, angle: float, mode: str = "bilinear") -> None:
        self.angle = float(angle)
        self.mode = mode

    def _key(self) -> tuple:
        return (self.angle, self.mode)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return self.angle == 0.0

    @property
    def name(self) -> str:
        return f"rotate({self.angle:g})"

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        if self.angle == 0.0:
            return x
        shape = x.shape
        flat = x.reshape(-1, 1, *shape[-2:]) if x.dim() != 4 else x
        h, w = shape[-2:]
        if h < 2 or w < 2 or not flat.is_floating_point():
            angle = torch.full((flat.shape[0],), self.angle, dtype=flat.dtype,
                               device=flat.device)
            out = KT.rotate(flat, angle, mode=self.mode, padding_mode="zeros",
                            align_corners=True)
            return out.reshape(shape)
        # kornia's rotation maps a source pixel (centred) to R src with R = [[c, s], [-s, c]]
        # (counter-clockwise on screen); sampling needs R^-1 in coordinates normalized by
        # (w - 1) / 2 and (h - 1) / 2: theta = S R^-1 S^-1 with S = diag(2/(w-1), 2/(h-1)).
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        r = (w - 1) / (h - 1)
        out = _warp(flat, (c, -s / r, s * r, c), self.mode)
        return out.reshape(shape)

    def inverse(self) -> Rotation:
        return Rotation(-self.angle, self.mode)

    def _merge(self, other: Transform) -> Transform | None:
        if isinstance(other, Rotation) and other.mode == self.mode:
            return Rotation(self.angle + other.angle, self.mode)
        return None


class Scale(Transform):
    """Scaling about the centre by ``sx`` (width) and ``sy`` (height), same canvas.

    ``sy=None`` gives isotropic scaling. Factors above 1 zoom in (content beyond the
    border is lost); below 1 zoom out (the uncovered border is invalid).
    """

    exact = False

    def __init__(self, sx: float, sy: float | None = None, mode: str = "bilinear") -> None:
        self.sx = float(sx)
        self.sy = float(sx if sy is None else sy)
        if self.sx <= 0 or self.sy <= 0:
            raise ValueError(f"scale factors must be positive, got ({self.sx}, {self.sy})")
        self.mode = mode
        self.exact = self.sx == 1.0 and self.sy == 1.0

    def _key(self) -> tuple:
        return (self.sx, self.sy, self.mode)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return (self.sx, self.sy) == (1.0, 1.0)

    @property
    def name(self) -> str:
        if self.sx == self.sy:
            return f"scale({self.sx:g})"
        return f"scale({self.sx:g}x{self.sy:g})"

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        if self.exact:
            return x
        shape = x.shape
        flat = x.reshape(-1, 1, *shape[-2:]) if x.dim() != 4 else x
        if shape[-2] < 2 or shape[-1] < 2 or not flat.is_floating_point():
            factor = torch.tensor([[self.sx, self.sy]], dtype=flat.dtype, device=flat.device)
            out = KT.scale(flat, factor.expand(flat.shape[0], 2), mode=self.mode,
                           padding_mode="zeros", align_corners=True)
            return out.reshape(shape)
        out = _warp(flat, (1.0 / self.sx, 0.0, 0.0, 1.0 / self.sy), self.mode)
        return out.reshape(shape)

    def inverse(self) -> Scale:
        return Scale(1.0 / self.sx, 1.0 / self.sy, self.mode)

    def _merge(self, other: Transform) -> Transform | None:
        if isinstance(other, Scale) and other.mode == self.mode:
            return Scale(self.sx * other.sx, self.sy * other.sy, self.mode)
        return None
