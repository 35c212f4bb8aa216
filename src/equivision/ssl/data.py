"""Datasets for pretraining and probing: photograph patches or a built-in dataset fitted
to the encoder's input size."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import ImageDataset, photos, resolve_dataset
from ..data.builtin import DEFAULT_PHOTOS
from ..data.seeding import derived_generator
from .probe import fit_dataset

__all__ = ["load_images"]


def load_images(name: str, split: str, size: int, images: int | None = None, seed: int = 0,
                channels: int = 3, root: str | None = None) -> ImageDataset:
    """A built-in dataset as an :class:`~equivision.data.ImageDataset` of
    ``(N, channels, size, size)`` images in ``[0, 1]`` (at most ``images`` of them).

    ``name`` is anything :func:`equivision.data.resolve_dataset` takes (a built-in or
    real dataset name such as ``fashion-mnist``, a dataset folder, ``module:attr``;
    ``root`` is where named datasets are looked for). ``photos`` cuts ``size`` px
    patches of the bundled photographs (``images`` spread evenly over them; default 80
    per photograph for train, 20 for test); any other dataset (e.g. ``digits``) is
    built at its own size and fitted with
    :func:`equivision.ssl.probe.fit_dataset` (zero-padded or resized, channels repeated);
    a dataset folder is resized to ``size`` as it is read (its images may differ in size).

    Raises:
        ValueError: unknown dataset name, a dataset that is not images with class labels,
            or ``images < 1``.
    """
    if images is not None and images < 1:
        raise ValueError(f"the number of images must be >= 1, got {images}")
    if name == "photos":
        per = None if images is None else max(1, math.ceil(images / len(DEFAULT_PHOTOS)))
        ds = photos(split, size=size, patches_per_image=per, seed=seed,
                    grayscale=channels == 1)
    else:
        # a folder of the user's images may hold many sizes: resized to ``size`` on load
        found = resolve_dataset(name, split, root=root, seed=seed,
                                size=size if Path(name).expanduser().is_dir() else None)
        if not isinstance(found, ImageDataset):
            raise ValueError(
                f"dataset {name!r} gives {type(found).__name__} items, not images with class "
                "labels; pretraining and probing need an image classification dataset")
        ds = fit_dataset(found, size, channels)
    if images is not None and len(ds) > images:
        # a deterministic, class-balanced-ish subset: a seeded permutation
        idx = torch.randperm(len(ds), generator=derived_generator("cli-subset", seed, split))
        idx = idx[:images].sort().values
        ds = ImageDataset(ds.images[idx], ds.labels[idx], ds.classes, name=ds.name)
    return ds
