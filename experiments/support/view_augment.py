"""Training augmentation that matches the equivariance defense's views.

The defense (:func:`equivision.robust.default_transforms`) compares a model's features
under resizes by 0.3-2x, a colour jitter, a horizontal flip and rotations of +-15 degrees;
it assumes the model is (roughly) equivariant to them. :class:`ViewAugment` trains a model
on those transformations: per image a rotation drawn uniformly in [-max_angle, max_angle]
(with probability ``p_rotate``), a mirror (probability 0.5) and a brightness / contrast
jitter, and per batch (with probability ``p_resize``) one resize factor drawn uniformly
in [min_scale, max_scale] (the batch changes size, so the model must take any input size).
Randomness comes from torch's global RNG, so :func:`equivision.training.train` resumes
exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equivision.augment import random_hflip
from equivision.transforms import Resize, rotate_batch

__all__ = ["ViewAugment"]


class ViewAugment:
    """Random rotations, flips, jitter and resizes like the defense's views.

    Call on images ``(B, C, H, W)`` in [0, 1]; returns ``(B, C, H', W')`` in [0, 1]
    (``H' = round(H s)`` for the batch's resize factor ``s``, or ``H``).
    """

    def __init__(self, max_angle: float = 15.0, p_rotate: float = 0.5, p_resize: float = 0.5,
                 min_scale: float = 0.3, max_scale: float = 2.0, brightness: float = 0.1,
                 contrast: float = 0.2) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        for name, p in (("p_rotate", p_rotate), ("p_resize", p_resize)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        self.max_angle, self.p_rotate, self.p_resize = float(max_angle), p_rotate, p_resize
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def __call__(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        angles = (torch.rand(b, device=x.device) * 2 - 1) * self.max_angle
        angles = torch.where(torch.rand(b, device=x.device) < self.p_rotate, angles,
                             torch.zeros_like(angles))
        x = rotate_batch(x, angles)
        x = random_hflip(x)
        shape = (b, 1, 1, 1)
        shift = (torch.rand(shape, device=x.device) * 2 - 1) * self.brightness
        gain = 1 + (torch.rand(shape, device=x.device) * 2 - 1) * self.contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + shift).clamp(0, 1)
        if float(torch.rand(())) < self.p_resize:
            s = self.min_scale + float(torch.rand(())) * (self.max_scale - self.min_scale)
            if max(1, round(x.shape[-1] * s)) != x.shape[-1]:
                x = Resize(s)(x).clamp(0, 1)
        return x

    def __repr__(self) -> str:
        return (f"ViewAugment(max_angle={self.max_angle:g}, p_rotate={self.p_rotate:g}, "
                f"p_resize={self.p_resize:g}, scale={self.min_scale:g}-{self.max_scale:g}, "
                f"brightness={self.brightness:g}, contrast={self.contrast:g})")
