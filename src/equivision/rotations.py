"""Rotation robustness: training on rotations drawn from a normal distribution and
accuracy against rotation angle (using-and-abusing paper, figures 5 and 6)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data.rotated import circle_crop
from .transforms import rotate_batch


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


@torch.no_grad()
def accuracy_vs_rotation(
    model: nn.Module,
    dataset: Dataset,
    angles: Sequence[float] = tuple(range(0, 361, 15)),
    crop: bool = True,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[float, float]:
    """Accuracy of ``model`` on ``dataset`` rotated by each angle (degrees, bilinear,
    CircleCrop applied to every image, the unrotated ones too, when ``crop``).

    Returns ``{angle: accuracy}``.
    """
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    correct = {float(a): 0 for a in angles}
    total = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            total += len(y)
            for a in correct:
                xr = rotate_batch(x, torch.full((len(x),), a, device=dev))
                xr = circle_crop(xr) if crop else xr
                correct[a] += int((model(xr).argmax(1) == y).sum())
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("the dataset is empty")
    return {a: c / total for a, c in correct.items()}


def plot_accuracy_vs_rotation(curves: dict[str, dict[float, float]], path: str | Path,
                              title: str = "accuracy against rotation angle") -> Path:
    """Draw ``{label: {angle: accuracy}}`` curves to a PNG (written atomically)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .measure.report import save_png

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
