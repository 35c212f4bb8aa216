"""Evaluations of a trained model under transformations of its input.

:func:`accuracy_vs_rotation`: a classifier's accuracy against the rotation angle of its
input images (the curves of the using-and-abusing paper, figures 5 and 6; the experiment
around it is ``experiments/gcnn_rotations.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.rotated import circle_crop
from .transforms import rotate_batch
from .utils import model_device

__all__ = ["accuracy_vs_rotation"]


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

    Args:
        model: a classifier ``(B, C, H, W) -> (B, K)`` logits.
        dataset: ``(image (C, H, W), label)`` items.
        angles: rotation angles in degrees.
        crop: apply CircleCrop (so that rotation moves no content out of the frame).
        batch_size: images per forward pass.
        device: where to evaluate (default: the model's device).

    Returns:
        ``{angle: accuracy}``.

    Raises:
        ValueError: an empty dataset.
    """
    dev = torch.device(device) if device is not None else model_device(model)
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
