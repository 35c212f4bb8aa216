"""Named datasets: ``get_dataset("digits6-roteq", split="test")``."""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import ImageDataset, resize_dataset
from .builtin import digits, photos
from .real import REAL_DATASETS, load_real_dataset
from .rotated import RIGHT_ANGLES, RotatedDataset
from .scenes import scenes

#: Digits whose classes are ambiguous or symmetric under 90° rotations (6 ~ 9, 0, 1, 8).
ROTATION_AMBIGUOUS_DIGITS = (0, 1, 6, 8)

Builder = Callable[..., ImageDataset]

#: every named dataset: ``builder(split=..., size=..., seed=..., **kwargs)``
DATASETS: Registry[Builder] = Registry("dataset")


def register_dataset(name: str, builder: Builder, description: str = "") -> None:
    """Register ``builder(split=..., size=..., seed=..., **kwargs) -> ImageDataset``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS.add(name, builder, description)


def list_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return DATASETS.list()


def describe_datasets() -> dict[str, str]:
    """``{name: one-line description}`` for every registered dataset."""
    return DATASETS.describe()


def get_dataset(
    name: str, split: str = "train", size: int | None = None, seed: int = 0, **kwargs
) -> ImageDataset:
    """Build the dataset registered as ``name``; ``size=None`` uses its default side.

    ``seed`` fixes the split, patch positions and rotations; other keyword arguments go
    to the underlying builder (e.g. ``test_fraction`` for digits, ``grayscale`` for
    photos).

    Raises:
        ValueError: unknown ``name`` (with suggestions; the message lists the valid
            names), or a dataset with zero images.
    """
    dataset = DATASETS.get(name)(split=split, size=size, seed=seed, **kwargs)
    dataset.name = f"{name}/{split}"
    return dataset


def _digits(split: str, size: int | None, seed: int, **kw) -> ImageDataset:
    return digits(split, size=size or 28, seed=seed, **kw)


def _digits6(split: str, size: int | None, seed: int, **kw) -> ImageDataset:
    kw.setdefault("exclude", ROTATION_AMBIGUOUS_DIGITS)
    return _digits(split, size, seed, **kw)


def _rotated(base: Builder, **rot) -> Builder:
    def build(split: str, size: int | None, seed: int, **kw) -> ImageDataset:
        return RotatedDataset(base(split, size, seed, **kw), seed=seed, **rot).materialize()

    return build


def _photos(split: str, size: int | None, seed: int, **kw) -> ImageDataset:
    return photos(split, size=size or 32, seed=seed, **kw)


register_dataset("digits", _digits, "sklearn digits 1x28x28, 10 classes")
register_dataset("digits6", _digits6, "digits without 0, 1, 6, 8: 6 classes")
register_dataset("digits6-rotinv", _rotated(_digits6, angles=RIGHT_ANGLES),
                 "digits6, each rotated by a random multiple of 90°, label kept")
register_dataset("digits6-roteq",
                 _rotated(_digits6, angles=RIGHT_ANGLES, label_mode="equivariant"),
                 "digits6 rotated by a random multiple of 90°, label = digit*4 + rotation")
register_dataset("digits-rot", _rotated(_digits, angles="uniform", circle_crop=True),
                 "digits rotated by uniform angles in [0, 360), circle-cropped, label kept")
register_dataset("photos", _photos, "3x32x32 patches of 8 scikit-image photographs")


def _scenes(split: str, size: int | None, seed: int, **kw):  # -> scenes.SceneDataset
    # masks (N, H, W) instead of labels (N,): not an ImageDataset
    return scenes(split, size=size or 32, seed=seed, **kw)


register_dataset("scenes", _scenes,
                 "generated segmentation scenes 3x32x32, shapes on photo textures, 5 classes "
                 "(items are (image, mask (H, W) int64))")


def _real(name: str) -> Builder:
    def build(split: str, size: int | None, seed: int, root: str | None = None
              ) -> ImageDataset:
        del seed  # the files fix everything
        return resize_dataset(load_real_dataset(name, split, root), size)  # type: ignore

    return build


for _name, _spec in REAL_DATASETS.items():
    register_dataset(_name, _real(_name),
                     f"{_name} from IDX files on disk (1x28x28, {len(_spec.classes)} classes; "
                     f"`equivision data download {_name}`)")
