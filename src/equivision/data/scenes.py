"""A generated semantic-segmentation dataset: shapes on photographic backgrounds.

Every scene is a crop of one of scikit-image's bundled photographs (rescaled and dimmed,
so it is texture rather than content) with 1-3 filled shapes painted over it, each of a
random class, size, rotation and colour; later shapes occlude earlier ones. The mask holds
the class of every pixel: 0 background, 1 circle, 2 square, 3 triangle, 4 cross.

Shapes are rasterised with ``supersample x supersample`` samples per pixel: a pixel takes
the class covering most of it and the image blends the shape colour by its coverage.
With ``boundary_ignore=True`` pixels that a shape covers only partly (between 10 % and
90 %) are labelled 255 (ignored by losses and metrics).

Example::

    train = scenes("train")                      # 2048 scenes 3x32x32
    image, mask = train[0]                       # (3, 32, 32) float, (32, 32) int64
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .builtin import BUNDLED_PHOTOS, SPLITS, _load_photo
from .seeding import derived_generator

__all__ = ["SCENE_CLASSES", "SCENE_PHOTOS", "IGNORE_INDEX", "SceneDataset", "scenes",
           "render_shape"]

#: Class names; mask value ``k`` is ``SCENE_CLASSES[k]``.
SCENE_CLASSES = ("background", "circle", "square", "triangle", "cross")
#: Photographs the backgrounds are cut from.
SCENE_PHOTOS = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket",
                "immunohistochemistry")
#: Mask value of ignored (boundary) pixels.
IGNORE_INDEX = 255
_SQRT3 = math.sqrt(3.0)


class SceneDataset(Dataset):
    """Images ``(N, 3, H, W)`` float in ``[0, 1]`` with masks ``(N, H, W)`` int64.

    Items are ``(image (3, H, W), mask (H, W))``; the default collate gives
    ``(images (B, 3, H, W), masks (B, H, W))``. Mask values lie in ``[0, K)`` or equal
    ``ignore_index``.
    """

    def __init__(self, images: Tensor, masks: Tensor, classes: Sequence[str], name: str = "",
                 ignore_index: int = IGNORE_INDEX) -> None:
        if images.dim() != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"images (N, C, H, W) and masks (N, H, W) must match, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        if images.shape[0] == 0:
            raise ValueError("the dataset has zero images")
        if masks.dtype != torch.int64:
            raise ValueError(f"masks must be int64, got {masks.dtype}")
        valid = masks != ignore_index
        if bool(((masks[valid] < 0) | (masks[valid] >= len(classes))).any()):
            raise ValueError(f"mask values must lie in [0, {len(classes)}) or be {ignore_index}")
        self.images, self.masks = images, masks
        self.classes = [str(c) for c in classes]
        self.name, self.ignore_index = name, ignore_index

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Return ``(image (3, H, W), mask (H, W) int64)``."""
        return self.images[index], self.masks[index]

    @property
    def labels(self) -> Tensor:
        """The masks ``(N, H, W)`` (named like :class:`ImageDataset`'s labels)."""
        return self.masks

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (background included)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def subset(self, index: Tensor, name: str | None = None) -> SceneDataset:
        """The scenes ``index`` (``(M,)`` int64) as a new dataset named ``name``."""
        return SceneDataset(self.images[index], self.masks[index], self.classes,
                            self.name if name is None else name, self.ignore_index)

    def class_pixel_counts(self) -> Tensor:
        """Pixels per class ``(K,)`` int64 (ignored pixels not counted)."""
        m = self.masks[self.masks != self.ignore_index]
        return torch.bincount(m, minlength=self.num_classes)

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return (f"SceneDataset({name}n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")


def render_shape(kind: int, size: int, cx: float, cy: float, radius: float, angle: float,
                 supersample: int = 4) -> Tensor:
    """Coverage ``(size, size)`` in [0, 1] of one filled shape.

    Args:
        kind: 1 circle, 2 square, 3 triangle, 4 cross (see :data:`SCENE_CLASSES`).
        size: image side in pixels.
        cx, cy: centre in pixels (x = column, y = row; pixel centres at ``i + 0.5``).
        radius: circumradius in pixels.
        angle: rotation in radians.
        supersample: samples per pixel along each axis.
    """
    s = supersample
    t = (torch.arange(size * s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(t - cy, t - cx, indexing="ij")
    c, si = math.cos(angle), math.sin(angle)
    u = (c * xx + si * yy) / radius
    v = (-si * xx + c * yy) / radius
    if kind == 1:
        inside = u * u + v * v <= 1.0
    elif kind == 2:
        inside = torch.maximum(u.abs(), v.abs()) <= 0.75
    elif kind == 3:
        inside = (v >= -0.5) & (v <= 1.0 - _SQRT3 * u.abs())
    elif kind == 4:
        inside = ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    else:
        raise ValueError(f"kind must be 1..{len(SCENE_CLASSES) - 1}, got {kind}")
    return inside.float().view(size, s, size, s).mean((1, 3))


def _background(g: torch.Generator, size: int, photos: Sequence[str]) -> Tensor:
    name = photos[int(torch.randint(len(photos), (1,), generator=g))]
    photo = _load_photo(name)
    _, h, w = photo.shape
    side = int(torch.randint(size, min(h, w, 3 * size) + 1, (1,), generator=g))
    y = int(torch.randint(0, h - side + 1, (1,), generator=g))
    x = int(torch.randint(0, w - side + 1, (1,), generator=g))
    crop = photo[None, :, y:y + side, x:x + side]
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
    return (0.2 + 0.6 * crop[0]).clamp(0.0, 1.0)


def _scene(g: torch.Generator, size: int, photos: Sequence[str], max_shapes: int,
           supersample: int, boundary_ignore: bool) -> tuple[Tensor, Tensor]:
    image = _background(g, size, photos)
    mask = torch.zeros(size, size, dtype=torch.int64)
    partial = torch.zeros(size, size, dtype=torch.bool)
    n = int(torch.randint(1, max_shapes + 1, (1,), generator=g))
    for _ in range(n):
        kind = int(torch.randint(1, len(SCENE_CLASSES), (1,), generator=g))
        radius = size * (0.15 + 0.17 * float(torch.rand((), generator=g)))
        cx, cy = (size * (0.15 + 0.7 * torch.rand(2, generator=g))).tolist()
        angle = 2 * math.pi * float(torch.rand((), generator=g))
        colour = torch.rand(3, generator=g)
        cover = render_shape(kind, size, cx, cy, radius, angle, supersample)
        image = image * (1 - cover) + colour.view(3, 1, 1) * cover
        mask = torch.where(cover >= 0.5, kind, mask)
        edge = (cover > 0.1) & (cover < 0.9)
        partial = (partial & (cover <= 0.1)) | edge  # an opaque shape hides older edges
    if boundary_ignore:
        mask = mask.masked_fill(partial, IGNORE_INDEX)
    return image.clamp(0.0, 1.0), mask


def scenes(
    split: str = "train",
    size: int = 32,
    seed: int = 0,
    n: int | None = None,
    max_shapes: int = 3,
    boundary_ignore: bool = False,
    photos: Sequence[str] = SCENE_PHOTOS,
    supersample: int = 4,
) -> SceneDataset:
    """Generate the scenes of one split.

    Scenes are deterministic in ``(seed, split, index)``: the split name enters every
    scene's seed, so train and test scenes are different draws.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (its own draws).
        size: image side (>= 8).
        seed: seed of the scenes.
        n: number of scenes (default 2048 train, 256 test, 2304 all).
        max_shapes: each scene has between 1 and this many shapes.
        boundary_ignore: label partly covered pixels 255 (ignored).
        photos: bundled photographs the backgrounds are cut from.
        supersample: samples per pixel and axis when rasterising.

    Raises:
        ValueError: bad split, size, n, max_shapes, supersample or photograph name.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is None:
        n = {"train": 2048, "test": 256, "all": 2304}[split]
    for what, value, low in (("size", size, 8), ("n", n, 1), ("max_shapes", max_shapes, 1),
                             ("supersample", supersample, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"scenes: {what} must be an integer >= {low}, got {value!r}")
    unknown = [p for p in photos if p not in BUNDLED_PHOTOS]
    if not photos or unknown:
        raise ValueError(f"scenes: photos must be bundled photographs ({', '.join(BUNDLED_PHOTOS)})"
                         f", got {list(photos)}")
    images, masks = [], []
    for i in range(n):
        g = derived_generator("scenes", seed, split, i)
        image, mask = _scene(g, size, photos, max_shapes, supersample, boundary_ignore)
        images.append(image)
        masks.append(mask)
    return SceneDataset(torch.stack(images), torch.stack(masks), SCENE_CLASSES,
                        name=f"scenes/{split}")
