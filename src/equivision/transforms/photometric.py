"""Photometric transformations: they change pixel values, not positions, so they act
on input images and as the identity on every feature map."""

from __future__ import annotations

import math

import kornia.enhance as KE
from torch import Tensor

from .base import Layout, Stride, Transform, check_image
from .composite import Compose


class ColorJitter(Transform):
    """A fixed colour jitter: ``brightness`` added, ``contrast`` and ``saturation``
    multiplied, ``hue`` shifted by that many degrees, in this order, then clipped to
    [0, 1]. Saturation and hue need RGB images (C = 3).

    The feature-space action is the identity. The inverse undoes each step in reverse
    order; it is exact only where nothing was clipped.
    """

    photometric = True
    exact = True

    def __init__(
        self, brightness: float = 0.0, contrast: float = 1.0, saturation: float = 1.0,
        hue: float = 0.0,
    ) -> None:
        if contrast <= 0 or saturation < 0:
            raise ValueError("contrast must be > 0 and saturation >= 0")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def _key(self) -> tuple:
        return (self.brightness, self.contrast, self.saturation, self.hue)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return (self.brightness, self.contrast, self.saturation, self.hue) == (0.0, 1.0, 1.0, 0.0)

    @property
    def name(self) -> str:
        return "jitter({:g},{:g},{:g},{:g})".format(*self._key())

    def apply_image(self, x: Tensor) -> Tensor:
        check_image(x)
        colour = self.saturation != 1.0 or self.hue != 0.0
        if colour and x.shape[1] != 3:
            raise ValueError(
                f"{self.name}: saturation and hue need RGB images, got {x.shape[1]} channel(s);"
                " use brightness and contrast only"
            )
        if self.brightness:
            x = KE.adjust_brightness(x, self.brightness)
        if self.contrast != 1.0:
            x = KE.adjust_contrast(x, self.contrast)
        if self.saturation != 1.0:
            x = KE.adjust_saturation(x, self.saturation)
        if self.hue:
            x = KE.adjust_hue(x, math.radians(self.hue))
        return x

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        return x

    def act(self, x: Tensor, layout: Layout) -> Tensor:
        return x

    def inverse(self) -> Transform:
        steps = [
            ColorJitter(hue=-self.hue),
            ColorJitter(saturation=1.0 / self.saturation if self.saturation else 1.0),
            ColorJitter(contrast=1.0 / self.contrast),
            ColorJitter(brightness=-self.brightness),
        ]
        return Compose(steps).simplify()
