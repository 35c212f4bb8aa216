"""The in-memory image dataset every loader in :mod:`equivision.data` returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


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
        ValueError: on zero images, wrong shapes or dtypes, values outside ``[0, 1]``
            or labels outside ``[0, K)``.
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
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels{where} must be ({images.shape[0]},) to match the images, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels{where} must be integers, got {labels.dtype}")
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

    def class_counts(self) -> Tensor:
        """Number of images per class, ``(K,)`` int64."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return (
            f"ImageDataset({name}n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )
