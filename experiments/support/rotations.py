"""Rotation robustness experiments: training on rotations drawn from a normal distribution
and plots of accuracy against rotation angle (using-and-abusing paper, figures 5 and 6).
The accuracy itself is library API: :func:`equivision.evaluation.accuracy_vs_rotation`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import Tensor, nn

from equivision.data import ImageDataset, resize_dataset
from equivision.data.rotated import circle_crop
from equivision.io import save_png
from equivision.transforms import rotate_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

__all__ = ["EarlyStopping", "RandomRotation", "StopTraining", "circular_distance",
           "plot_accuracy_vs_rotation", "prepare_images", "rotate_fixed", "take"]


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


class StopTraining(Exception):  # noqa: N818  (a signal, not an error)
    """Raised by :class:`EarlyStopping` to end :func:`equivision.training.train`."""


class EarlyStopping:
    """Training callback: keep the weights of the epoch with the best ``val_acc`` and
    raise :class:`StopTraining` once ``patience`` epochs in a row have not improved on it.

    After training (stopped or not) call :meth:`restore` to load the best weights.
    """

    def __init__(self, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        self.patience = patience
        self.best, self.best_epoch, self.state = -1.0, 0, None

    def on_epoch_end(self, epoch: int, model: nn.Module, history: dict[str, Any]) -> None:
        val = history["val_acc"][-1]
        if val is None:
            raise ValueError("EarlyStopping needs a validation set (train(..., val_set))")
        if val > self.best:
            self.best, self.best_epoch = float(val), epoch
            self.state = copy.deepcopy(model.state_dict())
        elif epoch - self.best_epoch >= self.patience:
            raise StopTraining(f"no val_acc gain for {self.patience} epochs")

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best epoch's weights into ``model``; returns it."""
        if self.state is not None:
            model.load_state_dict(self.state)
        return model


def take(data: ImageDataset, index: Tensor, name: str = "") -> ImageDataset:
    """The items ``index (M,)`` of ``data`` as a new :class:`ImageDataset`."""
    return ImageDataset(data.images[index], data.labels[index], data.classes,
                        name or data.name)


def prepare_images(data: ImageDataset, size: int) -> ImageDataset:
    """``data`` resized to ``size x size`` (bilinear, ``align_corners=False``, as
    torchvision's ``Resize`` does when enlarging) and CircleCropped."""
    data = resize_dataset(data, size)
    return ImageDataset(circle_crop(data.images), data.labels, data.classes, data.name)


def rotate_fixed(data: ImageDataset, angles: Tensor) -> ImageDataset:
    """Each image ``i`` of ``data`` rotated once by ``angles[i]`` degrees (bilinear),
    then CircleCropped: a fixed rotated copy such as RotMNIST."""
    images = circle_crop(rotate_batch(data.images, angles.to(data.images.dtype)))
    return ImageDataset(images, data.labels, data.classes, f"rotated({data.name})")


def circular_distance(a: float, b: float) -> float:
    """The distance of two angles (degrees) on the circle, in ``[0, 180]``."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)
