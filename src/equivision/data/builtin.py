"""Datasets built from data bundled with scikit-learn and scikit-image (no download)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageDataset
from .seeding import derived_generator

SPLITS = ("train", "test", "all")

#: scikit-image photographs shipped inside the package (loaded without pooch/network).
BUNDLED_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
    "rocket", "text",
)
#: The photographs :func:`photos` uses by default (label ``k`` is ``DEFAULT_PHOTOS[k]``).
DEFAULT_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry",
    "hubble_deep_field", "coins",
)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stratified_split(labels: Tensor, split: str, test_fraction: float, seed: int) -> Tensor:
    """Sorted indices ``(M,)`` of one split, stratified by class and deterministic in ``seed``.

    Each class's indices are permuted by a generator seeded with ``seed``; the first
    ``round(n_class * test_fraction)`` go to ``"test"``, the rest to ``"train"``;
    ``"all"`` returns every index.
    """
    _check_split(split)
    if split == "all":
        return torch.arange(len(labels))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for k in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
    return torch.sort(torch.cat(chosen)).values


def digits(
    split: str = "train",
    size: int = 28,
    seed: int = 0,
    test_fraction: float = 0.2,
    exclude: Sequence[int] = (),
) -> ImageDataset:
    """scikit-learn's 1797 handwritten digits, MNIST-like: ``(N, 1, size, size)`` in ``[0, 1]``.

    The 8x8 images (values 0..16) are scaled to ``[0, 1]``, resized bilinearly to
    ``round(size * 20 / 28)`` pixels and zero-padded to ``size``, so the digit sits in
    the middle of the frame like MNIST's 20x20 digits in 28x28.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``; the split is stratified by digit
            and deterministic in ``seed`` (see :func:`stratified_split`).
        size: output side length (at least 4).
        seed: seed of the split.
        test_fraction: fraction of each digit held out for ``"test"``.
        exclude: digits to drop; the remaining ones are relabelled ``0..K-1`` in
            increasing order and ``classes`` keeps their names (e.g. ``"2"``).

    Raises:
        ValueError: bad split/size/exclude, or no images left.
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    if size < 4:
        raise ValueError(f"size must be at least 4, got {size}")
    bad = [d for d in exclude if d not in range(10)]
    if bad:
        raise ValueError(f"exclude must hold digits 0..9, got {bad}")
    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    idx = stratified_split(labels, split, test_fraction, seed)
    images, labels = images[idx], labels[idx]
    kept = [d for d in range(10) if d not in set(exclude)]
    mask = torch.isin(labels, torch.tensor(kept, dtype=torch.long))
    if not bool(mask.any()):
        raise ValueError(f"digits(exclude={tuple(exclude)}) has zero images: every class is "
                         "excluded")
    images, labels = images[mask], labels[mask]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[kept] = torch.arange(len(kept))
    inner = max(1, int(round(size * 20 / 28)))
    images = F.interpolate(images, size=(inner, inner), mode="bilinear", align_corners=False)
    before = (size - inner) // 2
    images = F.pad(images, (before, size - inner - before, before, size - inner - before))
    name = "digits" + (f"-no{''.join(map(str, sorted(set(exclude))))}" if exclude else "")
    return ImageDataset(images.clamp(0.0, 1.0), relabel[labels], [str(d) for d in kept],
                        name=f"{name}/{split}")


@cache
def _load_photo(name: str) -> Tensor:
    """A bundled photograph as ``(3, H, W)`` float32 in ``[0, 1]`` (gray replicated)."""
    import skimage.data

    if name not in BUNDLED_PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; bundled ones: {', '.join(BUNDLED_PHOTOS)}")
    arr = np.asarray(getattr(skimage.data, name)())
    x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
    x = x[None] if x.dim() == 2 else x[..., :3].permute(2, 0, 1)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()


def photos(
    split: str = "train",
    size: int = 32,
    patches_per_image: int | None = None,
    seed: int = 0,
    grayscale: bool = False,
    names: Sequence[str] = DEFAULT_PHOTOS,
    test_fraction: float = 0.2,
    scale: float = 1.0,
) -> ImageDataset:
    """Square patches cut at random positions from bundled photographs; label = photograph.

    Returns ``(N, 3, size, size)`` RGB (gray photographs replicated to 3 channels) or
    ``(N, 1, size, size)`` with ``grayscale=True`` (ITU-R 601 luma), values in ``[0, 1]``,
    with ``N = len(names) * patches_per_image``.

    Train and test never share a pixel: test patches come from the rightmost
    ``max(size, round(W * test_fraction))`` columns of each (rescaled) photograph,
    train patches from the columns left of it; ``"all"`` samples the whole photograph.
    Positions are deterministic in ``(seed, split, photograph name)``.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: patch side length.
        patches_per_image: patches per photograph; default 80 (train), 20 (test), 100 (all).
        seed: seed of the patch positions.
        grayscale: return one luma channel instead of RGB.
        names: photographs to use (from :data:`BUNDLED_PHOTOS`); ``classes`` = ``names``.
        test_fraction: width fraction of each photograph reserved for ``"test"``.
        scale: rescale every photograph by this factor (antialiased) before cutting.
    """
    _check_split(split)
    if patches_per_image is None:
        patches_per_image = {"train": 80, "test": 20, "all": 100}[split]
    if patches_per_image < 1 or size < 1 or scale <= 0 or not names:
        raise ValueError("need patches_per_image >= 1, size >= 1, scale > 0 and some names, got "
                         f"{patches_per_image}, {size}, {scale}, {tuple(names)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    patches = []
    for name in names:
        photo = _load_photo(name)
        if scale != 1.0:
            photo = F.interpolate(photo[None], scale_factor=scale, mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp(0.0, 1.0)
        _, h, w = photo.shape
        strip = max(size, int(round(w * test_fraction)))
        x_lo, x_hi = {"train": (0, w - strip - size), "test": (w - strip, w - size),
                      "all": (0, w - size)}[split]
        if h < size or x_hi < x_lo:
            raise ValueError(f"photograph {name!r} ({h}x{w} after scale {scale:g}) is too small "
                             f"for {size}x{size} {split} patches")
        g = derived_generator("photos", seed, split, name)
        ys = torch.randint(0, h - size + 1, (patches_per_image,), generator=g).tolist()
        xs = torch.randint(x_lo, x_hi + 1, (patches_per_image,), generator=g).tolist()
        patches.append(torch.stack([photo[:, y:y + size, x:x + size] for y, x in zip(ys, xs)]))
    images = torch.cat(patches)
    if grayscale:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images * luma).sum(1, keepdim=True).clamp(0.0, 1.0)
    labels = torch.arange(len(names)).repeat_interleave(patches_per_image)
    return ImageDataset(images, labels, list(names), name=f"photos/{split}")
