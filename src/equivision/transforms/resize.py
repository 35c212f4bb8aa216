"""Resizing that changes the size of the canvas (the image grows or shrinks).

:class:`~equivision.transforms.affine.Scale` zooms about the centre and keeps the
size; :class:`Resize` instead maps an ``H x W`` image to ``round(H f) x round(W f)``,
as the multi-scale views of test-time defenses do. Its action on a feature map of
stride ``s`` resizes the map to the size the network produces for the resized image;
that size depends on the network's padding and pooling (``floor`` or ``ceil`` of
``H f / s``), so :meth:`Resize.apply_map` takes the target ``size`` when the caller
knows it (e.g. the size of the map actually produced) and otherwise rounds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Stride, Transform, as_stride, check_image
from .layout import Layout


def resized_side(side: int, factor: float, multiple: int = 1) -> int:
    """Side length after resizing ``side`` pixels by ``factor``: ``round(side * factor)``
    (halves round up) to the nearest multiple of ``multiple``, at least ``multiple``."""
    return multiple * max(1, math.floor(side * factor / multiple + 0.5))


class Resize(Transform):
    """Resize by ``factor`` (> 0): an ``(B, C, H, W)`` batch becomes
    ``(B, C, round(H f), round(W f))``, bilinear with ``align_corners=False``.

    Args:
        factor: size ratio; ``Resize(0.5)`` halves, ``Resize(2)`` doubles.
        mode: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``.
        antialias: low-pass before downsampling (bilinear / bicubic only); off by default
            so that the action matches plain interpolation.
        multiple: round image sizes to a multiple of this (e.g. 4 for a network that
            needs sides divisible by 4); maps without a given ``size`` use 1.

    The action is interpolated, so ``exact`` is False, and ``Resize(f).inverse()`` is
    ``Resize(1 / f)``, which returns to the original size only up to rounding: pass the
    wanted ``size`` to :meth:`apply_map` (or a :class:`~.layout.Layout` with ``size`` to
    :meth:`act`) to land exactly on it.
    """

    exact = False

    def __init__(
        self, factor: float, mode: str = "bilinear", antialias: bool = False, multiple: int = 1
    ) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"Resize factor must be a number, got {type(factor).__name__}")
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"Resize factor must be a finite number > 0, got {factor}")
        if mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"Resize mode must be 'bilinear', 'bicubic' or 'nearest', got {mode!r}"
            )
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"Resize multiple must be an integer >= 1, got {multiple!r}")
        self.factor = float(factor)
        self.multiple = multiple
        self.mode = mode
        self.antialias = bool(antialias) and mode != "nearest"

    def _key(self) -> tuple:
        return (self.factor, self.mode, self.antialias, self.multiple)

    @property
    def name(self) -> str:
        return f"resize({self.factor:g})"

    def output_size(self, shape: tuple[int, int], multiple: int = 1) -> tuple[int, int]:
        """``(h, w)`` of the result for an input of spatial ``shape``."""
        return (resized_side(int(shape[0]), self.factor, multiple),
                resized_side(int(shape[1]), self.factor, multiple))

    def apply_image(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, round(H f), round(W f))`` (sides rounded to a
        multiple of ``multiple``)."""
        check_image(x)
        return self.apply_map(x, 1.0, size=self.output_size(x.shape[-2:], self.multiple))

    def apply_map(
        self, x: Tensor, stride: float | Stride = 1.0, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Resize a map ``(..., h, w)`` to ``size`` (default ``round(h f), round(w f)``).

        ``stride`` does not change the action (a map of an image of side ``S`` at stride
        ``s`` has about ``S / s`` positions, and the resized image's map about
        ``S f / s``, so the ratio is ``f`` at every stride); it is accepted for the
        common :class:`Transform` interface. Pass ``size`` to match the map the network
        actually produces for the resized image (``floor`` vs ``ceil`` of ``S f / s``).
        """
        as_stride(stride)
        if x.dim() < 3:
            raise ValueError(f"Resize acts on maps (..., h, w), got shape {tuple(x.shape)}")
        target = self.output_size((x.shape[-2], x.shape[-1])) if size is None else (
            int(size[0]), int(size[1]))
        if target[0] < 1 or target[1] < 1:
            raise ValueError(f"Resize target size must be positive, got {target}")
        if target == (x.shape[-2], x.shape[-1]) and (self.factor == 1.0 or size is not None):
            return x
        lead = x.shape[:-2]
        flat = x.reshape(-1, 1, x.shape[-2], x.shape[-1]) if x.dim() != 4 else x
        if self.mode == "nearest":
            out = F.interpolate(flat, size=target, mode="nearest")
        else:
            out = F.interpolate(flat, size=target, mode=self.mode, align_corners=False,
                                antialias=self.antialias)
        return out.reshape(*lead, *target)

    def act(self, x: Tensor, layout: Layout) -> Tensor:
        """As :meth:`Transform.act`; maps and group maps land on ``layout.size`` when the
        layout gives it (the size of the map the network produced), so that undoing a
        resize returns exactly to the reference map."""
        if layout.size is not None and layout.kind in ("map", "group"):
            return self.apply_map(x, layout.stride, size=layout.size)
        return super().act(x, layout)

    def valid_mask(self, shape, stride=1.0, device=None) -> Tensor:  # noqa: D102
        return torch.ones(*self.output_size(tuple(shape)), dtype=torch.bool, device=device)

    def inverse(self) -> Resize:
        return Resize(1.0 / self.factor, self.mode, self.antialias, self.multiple)
