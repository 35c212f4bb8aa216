"""Hand-crafted toy CNNs that validate the measure (section 4.1 of the
learned-equivariance paper): one is rotation invariant per channel by construction,
the other is rotation equivariant with channels that are rotated copies."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Isotropic 2-D Gaussian ``(size, size)`` normalised to sum 1."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def quadrant_kernel(size: int, sigma: float) -> Tensor:
    """A Gaussian with all but its upper-left quadrant cut out: an oriented filter
    whose four 90° rotations are clearly different. ``(size, size)``."""
    g = gaussian_kernel(size, sigma).clone()
    half = size // 2
    g[half:, :] = 0
    g[:, half:] = 0
    return g / g.sum()


def gaussian_cnn(channels: int = 4, layers: int = 3, size: int = 5) -> nn.Sequential:
    """3-layer CNN whose filters are isotropic Gaussians (different widths and biases
    per channel): every channel is exactly rotation invariant, ``f(gX)_c = g·f(X)_c``."""
    mods: list[nn.Module] = []
    cin = 1
    for i in range(layers):
        conv = nn.Conv2d(cin, channels, size, padding=size // 2)
        with torch.no_grad():
            for c in range(channels):
                k = gaussian_kernel(size, 0.6 + 0.5 * c)
                # mix input channels with different signs so channels differ
                for j in range(cin):
                    conv.weight[c, j] = k * (1.0 if (c + j) % 2 == 0 else -0.5)
            conv.bias.copy_(torch.linspace(-0.1, 0.1, channels))
        mods += [conv, nn.ReLU()] if i < layers - 1 else [conv]
        cin = channels
    return nn.Sequential(*mods)


def rotated_filter_cnn(layers: int = 3, size: int = 5) -> nn.Sequential:
    """3-layer CNN with 4 channels per layer; channel ``c`` applies the quadrant filter
    rotated by ``c·90°`` (depthwise after the first layer), so
    ``f(R X)_c = R f(X)_{c-1}``: equivariant channel groups that are not invariant."""
    base = quadrant_kernel(size, 1.2)
    mods: list[nn.Module] = []
    for i in range(layers):
        cin, groups = (1, 1) if i == 0 else (4, 4)
        conv = nn.Conv2d(cin, 4, size, padding=size // 2, groups=groups, bias=False)
        with torch.no_grad():
            for c in range(4):
                conv.weight[c, 0] = torch.rot90(base, c, dims=(0, 1))
        mods += [conv, nn.ReLU()] if i < layers - 1 else [conv]
    return nn.Sequential(*mods)
