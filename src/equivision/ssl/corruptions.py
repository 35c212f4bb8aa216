"""Generated corruptions and perturbations at several severities (ImageNet-C / -P in spirit).

Appearance corruptions: ``gaussian_noise``, ``gaussian_blur``, ``contrast`` (ImageNet-C's
noise and contrast levels; blur widths scaled to small images). Geometric perturbations:
``rotation``, ``scale``, ``translation`` (ImageNet-P's geometric families), built on
:mod:`equivision.transforms`. Severities run from 1 (mild) to 5 (strong). Random parts
(noise, the sign of a rotation, the direction of a shift) are drawn from a generator seeded
by ``(seed, name, severity)``, so every evaluation of the same images sees the same
corruption.

Example::

    x_c = corrupt(images, "gaussian_blur", severity=3)
    accs = corruption_accuracy(classify, test_set)   # {"clean": ..., "gaussian_noise": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import kornia.filters as KF
import torch
from torch import Tensor

from ..data.seeding import derived_generator
from ..transforms import Scale, rotate_batch, shift_zero_fill

__all__ = ["CORRUPTIONS", "APPEARANCE", "GEOMETRIC", "SEVERITIES", "corrupt",
           "corruption_accuracy"]

APPEARANCE = ("gaussian_noise", "gaussian_blur", "contrast")
GEOMETRIC = ("rotation", "scale", "translation")
#: All corruption names accepted by :func:`corrupt`.
CORRUPTIONS = APPEARANCE + GEOMETRIC
SEVERITIES = (1, 2, 3, 4, 5)

# Parameters per severity 1..5.
_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C gaussian_noise
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C contrast
_BLUR_SIGMA_PER_32PX = (0.5, 0.75, 1.0, 1.5, 2.0)  # sigma in pixels for a 32 px image
_ROT_DEGREES = (5.0, 10.0, 15.0, 20.0, 30.0)
_SCALE = (0.95, 0.9, 0.85, 0.8, 0.7)  # zoom out about the centre (zero border)
_SHIFT_PER_32PX = (1, 2, 3, 4, 6)  # pixels for a 32 px image


def _check(images: Tensor, name: str, severity: int) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            "images must be a floating tensor (B, C, H, W) in [0, 1], got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Return a corrupted copy of ``images (B, C, H, W)`` in ``[0, 1]`` (same shape).

    Args:
        images: a batch in ``[0, 1]``.
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: seeds the random parts (with ``name`` and ``severity``); the global RNG is not
            used.

    Raises:
        ValueError: unknown name, bad severity or not a (B, C, H, W) floating tensor.
    """
    _check(images, name, severity)
    s = severity - 1
    b, _, h, w = images.shape
    g = derived_generator("corrupt", seed, name, severity, b, h, w)
    size = min(h, w)
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=g).to(images)
        out = images + _NOISE_STD[s] * noise
    elif name == "gaussian_blur":
        sigma = _BLUR_SIGMA_PER_32PX[s] * size / 32.0
        k = max(3, 2 * int(round(2 * sigma)) + 1)
        out = KF.gaussian_blur2d(images, (k, k), (sigma, sigma), border_type="reflect")
    elif name == "contrast":
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        out = (images - mean) * _CONTRAST[s] + mean
    elif name == "rotation":
        sign = torch.randint(0, 2, (b,), generator=g).float() * 2 - 1
        out = rotate_batch(images, (sign * _ROT_DEGREES[s]).to(images))
    elif name == "scale":
        out = Scale(_SCALE[s]).apply_image(images)
    else:  # translation: a shift of the given length in one of four directions per image
        shift = max(1, int(round(_SHIFT_PER_32PX[s] * size / 32.0)))
        direction = torch.randint(0, 4, (b,), generator=g)
        out = torch.empty_like(images)
        moves = ((0, shift), (0, -shift), (shift, 0), (-shift, 0))
        for d, (dy, dx) in enumerate(moves):
            sel = direction == d
            if bool(sel.any()):
                out[sel] = shift_zero_fill(images[sel], dy, dx)
    return out.clamp(0.0, 1.0)


@torch.no_grad()
def corruption_accuracy(
    classify: Callable[[Tensor], Tensor],
    dataset: Any,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 accuracy of ``classify`` on clean and corrupted copies of ``dataset``.

    Args:
        classify: maps images ``(B, C, H, W)`` to logits ``(B, K)``.
        dataset: an :class:`~equivision.data.ImageDataset` (``images (N, C, H, W)``,
            ``labels (N,)``) or any map-style dataset of ``(image, label)``.
        corruptions: names from :data:`CORRUPTIONS`.
        severities: severities to evaluate.
        batch_size: images per call of ``classify``.
        seed: seed of the corruptions' random parts.

    Returns:
        ``{"clean": acc, "per_corruption": {name: {str(severity): acc}}, "mean":
        {name: mean over severities}, "mean_appearance", "mean_geometric", "mean_all"}``
        (accuracies in ``[0, 1]``; group means are None when the group was not evaluated).
    """
    images, labels = _tensors(dataset)
    for name in corruptions:
        _check(images[:1], name, severities[0] if severities else 1)
    for sev in severities:
        _check(images[:1], corruptions[0] if corruptions else CORRUPTIONS[0], sev)

    def accuracy(transform: Callable[[Tensor, int], Tensor] | None) -> float:
        correct = 0
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if transform is not None:
                x = transform(x, i)
            pred = classify(x).argmax(1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
        return correct / len(images)

    per: dict[str, dict[str, float]] = {}
    for name in corruptions:
        per[name] = {}
        for sev in severities:
            per[name][str(sev)] = accuracy(
                lambda x, i, n=name, v=sev: corrupt(x, n, v, seed=seed * 1_000_003 + i)
            )
    means = {n: sum(v.values()) / len(v) for n, v in per.items() if v}

    def group(names: Sequence[str]) -> float | None:
        vals = [means[n] for n in names if n in means]
        return sum(vals) / len(vals) if vals else None

    return {
        "clean": accuracy(None),
        "per_corruption": per,
        "mean": means,
        "mean_appearance": group(APPEARANCE),
        "mean_geometric": group(GEOMETRIC),
        "mean_all": group(CORRUPTIONS),
    }


def _tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """``(images (N, C, H, W), labels (N,))`` of an ImageDataset or map-style dataset."""
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return images, labels.long()
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError("the dataset must be a non-empty map-style dataset of (image, label)")
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(list(xs)), torch.as_tensor([int(y) for y in ys])
