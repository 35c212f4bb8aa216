"""The in-memory image dataset every loader in :mod:`equivision.data` returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

#: channel counts that mark an ``(N, H, W, C)`` array when they sit in the last dimension
CHANNEL_LAST_COUNTS = (1, 3, 4)


def _check_channels_first(images: Tensor, where: str) -> None:
    """Reject ``(N, H, W, C)`` images (C in 1/3/4 last, H and W above 4)."""
    _, h, w, c = images.shape
    if c in CHANNEL_LAST_COUNTS and h > 4 and w > 4:
        raise ValueError(
            f"images{where} look channel-last {tuple(images.shape)} (N, H, W, C); pass "
            f"(N, C, H, W), e.g. images.permute(0, 3, 1, 2)")


class ImageDataset(Dataset):
    """Images ``(N, C, H, W)`` float in ``[0, 1]`` with labels ``(N,)`` int64 in ``[0, K)``.

    Items are ``(image (C, H, W), label int)``, so the default ``DataLoader`` collate
    gives ``(images (B, C, H, W), labels (B,))``.

    Args:
        images: ``(N, C, H, W)`` floating tensor with values in ``[0, 1]``.
        labels: ``(N,)`` integer tensor, each in ``[0, len(classes))``.
        classes: the ``K`` class names; label ``k`` means ``classes[k]``.
        name: an optional name used in ``repr``.

    Raises:
        ValueError: on zero images, wrong shapes or dtypes, channel-last images
            ``(N, H, W, C)``, NaN or infinite values, values outside ``[0, 1]`` or labels
            outside ``[0, K)``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, classes: Sequence[str], name: str = ""
    ) -> None:
        self.name = name
        where = f" ({name})" if name else ""
        if images.dim() != 4:
            raise ValueError(f"images{where} must be (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"the dataset{where} has zero images")
        if not images.is_floating_point():
            raise ValueError(f"images{where} must be floating point in [0, 1], got {images.dtype}")
        _check_channels_first(images, where)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels{where} must be ({images.shape[0]},) to match the images, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels{where} must be integers, got {labels.dtype}")
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"images{where} hold {bad} NaN or infinite value(s); clean or drop "
                             "those images (e.g. torch.nan_to_num) before building the dataset")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image values{where} must lie in [0, 1], got [{lo:g}, {hi:g}]")
        self.classes = [str(c) for c in classes]
        if int(labels.min()) < 0 or int(labels.max()) >= len(self.classes):
            raise ValueError(
                f"labels{where} must lie in [0, {len(self.classes)}) for {len(self.classes)} "
                f"classes, got [{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(image (C, H, W), label)``."""
        return self.images[index], int(self.labels[index])

    @property
    def num_classes(self) -> int:
        """The number of classes ``K``."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def subset(self, index: Tensor, name: str | None = None) -> ImageDataset:
        """The items ``index`` (``(M,)`` int64) as a new dataset named ``name`` (default:
        this one's name)."""
        return ImageDataset(self.images[index], self.labels[index], self.classes,
                            self.name if name is None else name)

    def class_counts(self) -> Tensor:
        """Number of images per class, ``(K,)`` int64."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return (
            f"ImageDataset({name}n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


def concat_datasets(sets: Sequence[ImageDataset]) -> ImageDataset:
    """Image datasets of one image shape, one after the other, with the first one's
    classes and name (one set is returned as is).

    Raises:
        ValueError: no sets, or image shapes that differ.
    """
    if not sets:
        raise ValueError("no datasets to concatenate")
    first = sets[0]
    if len(sets) == 1:
        return first
    for other in sets[1:]:
        if other.image_shape != first.image_shape:
            raise ValueError(f"{other.name}: image shape {other.image_shape} differs from "
                             f"{first.name}'s {first.image_shape}")
    return ImageDataset(torch.cat([s.images for s in sets]),
                        torch.cat([s.labels for s in sets]), first.classes, first.name)


def resize_dataset(data: Dataset, size: int | None) -> Dataset:
    """``data`` with images resized to ``size x size`` when they differ (bilinear,
    antialiased when shrinking); non-image datasets and ``size=None`` pass through."""
    if size is None or not isinstance(data, ImageDataset):
        return data
    _, h, w = data.image_shape
    if (h, w) == (size, size):
        return data
    images = F.interpolate(data.images, size=(size, size), mode="bilinear",
                           antialias=size < max(h, w), align_corners=False).clamp(0.0, 1.0)
    return ImageDataset(images, data.labels, data.classes, data.name)
