"""Datasets whose items are rotated copies of another dataset's items."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms.affine import rotate_batch
from .base import ImageDataset

RIGHT_ANGLES = (0.0, 90.0, 180.0, 270.0)


def circle_mask(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """``(H, W)`` bool mask of the pixels whose centres lie in the inscribed circle.

    The circle is centred on the image centre with radius ``min(H, W) / 2``; the mask
    is unchanged by ``torch.rot90`` on square grids.
    """
    ys = torch.arange(h, dtype=torch.float32, device=device)[:, None] - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32, device=device)[None, :] - (w - 1) / 2
    return ys**2 + xs**2 <= (min(h, w) / 2) ** 2


def circle_crop(x: Tensor) -> Tensor:
    """Zero the pixels of ``x (..., H, W)`` outside the inscribed circle; same shape out."""
    return x * circle_mask(x.shape[-2], x.shape[-1], x.device).to(x.dtype)


class RotatedDataset(Dataset):
    """Each item of ``base`` rotated by a fixed angle drawn per index from ``seed``.

    Items are ``(image (C, H, W), label int)``; image ``i`` is ``base[i]`` rotated by
    ``self.angles[i]`` degrees counter-clockwise (see :func:`rotate_batch`), then
    circle-cropped if ``circle_crop``. The angles ``(N,)`` are drawn once at
    construction, so every access and every process sees the same rotation.

    Args:
        base: a dataset of ``(image (C, H, W), label)``, e.g. :class:`ImageDataset`.
        angles: angles (degrees) to pick uniformly from, or ``"uniform"`` for angles
            uniform in ``[0, 360)``.
        seed: seed of the per-index angles.
        circle_crop: zero pixels outside the inscribed circle (after rotating), so no
            corner content reveals the angle.
        label_mode: ``"keep"`` keeps the base label; ``"equivariant"`` gives
            ``label * 4 + r`` with ``r = angle / 90`` the rotation index (only with the
            four angles 0, 90, 180, 270) and classes named ``"<name>@<angle>"``.
    """

    def __init__(
        self,
        base: Dataset,
        angles: Sequence[float] | str = RIGHT_ANGLES,
        seed: int = 0,
        circle_crop: bool = False,
        label_mode: str = "keep",
    ) -> None:
        n = len(base)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed)
        if isinstance(angles, str):
            if angles != "uniform":
                raise ValueError(f"angles must be a sequence of degrees or 'uniform', "
                                 f"got {angles!r}")
            u = torch.rand(n, generator=g, dtype=torch.float64) * 360.0
            self.angles = torch.remainder(u.float(), 360.0)  # float32 in [0, 360)
        else:
            choices = torch.tensor([float(a) for a in angles], dtype=torch.float32)
            if choices.numel() == 0:
                raise ValueError("angles must not be empty")
            self.angles = choices[torch.randint(len(choices), (n,), generator=g)]
        if label_mode not in ("keep", "equivariant"):
            raise ValueError(f"label_mode must be 'keep' or 'equivariant', got {label_mode!r}")
        base_classes = getattr(base, "classes", None)
        if label_mode == "equivariant":
            if isinstance(angles, str) or sorted(float(a) % 360 for a in angles) != list(
                RIGHT_ANGLES
            ):
                raise ValueError("label_mode='equivariant' needs angles = (0, 90, 180, 270), "
                                 f"got {angles!r}")
            if base_classes is None:
                raise ValueError("label_mode='equivariant' needs a base dataset with .classes")
            self.classes: list[str] | None = [
                f"{c}@{r}" for c in base_classes for r in (0, 90, 180, 270)
            ]
        else:
            self.classes = None if base_classes is None else list(base_classes)
        self.base, self.seed = base, seed
        self.circle_crop, self.label_mode = circle_crop, label_mode

    def __len__(self) -> int:
        return len(self.angles)

    @property
    def num_classes(self) -> int:
        """The number of classes (4x the base's with ``label_mode="equivariant"``)."""
        if self.classes is None:
            raise AttributeError("the base dataset has no .classes")
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the items."""
        c, h, w = self[0][0].shape
        return (c, h, w)

    def rotation_index(self) -> Tensor:
        """``(N,)`` int64: ``round(angle / 90) mod 4`` per item."""
        return torch.remainder(torch.round(self.angles / 90.0), 4).long()

    def _finish(self, images: Tensor, labels: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
        images = rotate_batch(images, angles)
        if self.circle_crop:
            images = circle_crop(images)
        if self.label_mode == "equivariant":
            labels = labels * 4 + torch.remainder(torch.round(angles / 90.0), 4).long()
        return images.clamp(0.0, 1.0), labels

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(rotated image (C, H, W), label)``."""
        image, label = self.base[index]
        images, labels = self._finish(image[None], torch.tensor([int(label)]),
                                      self.angles[index].reshape(1))
        return images[0], int(labels[0])

    def materialize(self, batch_size: int = 1024) -> ImageDataset:
        """All items as an :class:`ImageDataset` ``(N, C, H, W)``, rotated in batches."""
        if self.classes is None:
            raise ValueError("materialize() needs a base dataset with .classes")
        n = len(self)
        out_images, out_labels = [], []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if isinstance(self.base, ImageDataset):
                images, labels = self.base.images[start:stop], self.base.labels[start:stop]
            else:
                items = [self.base[i] for i in range(start, stop)]
                images = torch.stack([it[0] for it in items])
                labels = torch.tensor([int(it[1]) for it in items])
            images, labels = self._finish(images, labels, self.angles[start:stop])
            out_images.append(images)
            out_labels.append(labels)
        base_name = getattr(self.base, "name", "")
        return ImageDataset(torch.cat(out_images), torch.cat(out_labels), self.classes,
                            name=f"rotated({base_name})" if base_name else "rotated")

    def __repr__(self) -> str:
        return (f"RotatedDataset(n={len(self)}, label_mode={self.label_mode!r}, "
                f"circle_crop={self.circle_crop}, seed={self.seed})")
