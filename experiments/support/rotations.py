"""Rotation robustness experiments: training on rotations drawn from a normal distribution
and plots of accuracy against rotation angle (using-and-abusing paper, figures 5 and 6).
The accuracy itself is library API: :func:`equivision.evaluation.accuracy_vs_rotation`."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from torch import Tensor

from equivision.data.rotated import circle_crop
from equivision.io import save_png
from equivision.transforms import rotate_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

__all__ = ["RandomRotation", "plot_accuracy_vs_rotation"]


class RandomRotation:
    """Training augmentation: rotate each image by an angle drawn from
    ``N(mean, sigma)`` degrees (bilinear, about the centre), then CircleCrop.

    Draws from torch's global RNG, so the training loop's saved RNG state covers it.
    Call on ``(B, C, H, W)`` images; returns the same shape.
    """

    def __init__(self, mean: float = 45.0, sigma: float = 20.0, crop: bool = True) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.mean, self.sigma, self.crop = float(mean), float(sigma), crop

    def __call__(self, x: Tensor) -> Tensor:
        angles = self.mean + self.sigma * torch.randn(x.shape[0], device=x.device)
        out = rotate_batch(x, angles)
        return circle_crop(out) if self.crop else out

    def __repr__(self) -> str:
        return f"RandomRotation(mean={self.mean:g}, sigma={self.sigma:g}, crop={self.crop})"


def plot_accuracy_vs_rotation(curves: dict[str, dict[float, float]], path: str | Path,
                              title: str = "accuracy against rotation angle") -> Path:
    """Draw ``{label: {angle: accuracy}}`` curves to a PNG (written atomically)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[a] for a in xs], marker=".", label=label)
    ax.set_xlabel("rotation angle (degrees)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(range(0, 361, 45))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
