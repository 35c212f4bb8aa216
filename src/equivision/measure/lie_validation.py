"""Validation models and inputs for the Lie derivative.

A 3x3 kernel ``b * PLUS + c * CENTRE`` (the 5-point stencil) has the Fourier transform
``c + 2 b (cos wx + cos wy)``, a function of ``cos wx + cos wy``; such a kernel commutes
exactly with the discrete rotation generator ``y d/dx - x d/dy`` built from central
differences (its commutator is ``K_x d/dy - K_y d/dx`` with ``K_x`` the first-moment
kernel, whose Fourier transform is ``i d/dwx k``). A CNN of such convolutions, without
nonlinearity, therefore has a rotation Lie derivative of exactly zero away from the
border; a full D4-symmetric 3x3 kernel (non-zero corners) does not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CENTRE", "PLUS", "smooth_blobs", "stencil_cnn"]

PLUS = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])
CENTRE = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]])


def stencil_cnn(isotropic: bool, relu: bool = True, seed: int = 0, channels: int = 6,
                depth: int = 3) -> nn.Sequential:
    """``depth`` 3x3 convolutions (padding 1; ReLU after each when ``relu``), global
    average pooling, a linear head to 3 outputs; float64. With ``isotropic`` every kernel
    of the default initialisation is projected onto ``b * PLUS + c * CENTRE`` (``b`` the
    mean of its four edge neighbours, ``c`` its centre). ``(B, 1, H, W)`` -> ``(B, 3)``."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    cin = 1
    for _ in range(depth):
        conv = nn.Conv2d(cin, channels, 3, padding=1)
        if isotropic:
            with torch.no_grad():
                w = conv.weight
                b = (w[..., 0, 1] + w[..., 1, 0] + w[..., 1, 2] + w[..., 2, 1])[..., None, None]
                conv.weight.copy_(b / 4 * PLUS + w[..., 1:2, 1:2] * CENTRE)
        mods += [conv, nn.ReLU()] if relu else [conv]
        cin = channels
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)]
    return nn.Sequential(*mods).double()


def smooth_blobs(n: int = 6, size: int = 32, seed: int = 0) -> Tensor:
    """Smooth anisotropic Gaussian blobs (widths 1.5-2.5 px, 1.4x taller than wide) near
    the centre, nearly zero at the border: ``(n, 1, size, size)`` float64."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.randn(2, generator=g, dtype=torch.float64) * 2).tolist()
        s = 1.5 + float(torch.rand(1, generator=g))
        out.append(torch.exp(-((xx - cx) ** 2 + 0.5 * (yy - cy) ** 2) / (2 * s * s)))
    return torch.stack(out)[:, None]
