"""``resolve_dataset(spec, split)``: the one way a name, a path or ``module:attr`` becomes a
dataset (what ``--data`` and ``--data-root`` mean on the command line)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..registry import UnknownNameError
from .base import ImageDataset, concat_datasets, resize_dataset
from .builtin import stratified_split
from .formats import load_cifar, load_image_folder
from .real import REAL_DATASETS, find_idx_files, load_idx_folder, load_real_dataset
from .registry import DATASETS, get_dataset

__all__ = ["SPLITS", "VAL_FRACTION", "carve_validation", "resolve_dataset"]

#: the splits :func:`resolve_dataset` accepts
SPLITS = ("train", "val", "test", "all")
#: default fraction of the training data held out as the validation split
VAL_FRACTION = 0.1


def resolve_dataset(
    spec: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    size: int | None = None,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
    **kw: Any,
) -> Dataset:
    """The dataset ``spec`` names, one split of it.

    ``spec`` is, in this order of precedence:

    * a registered name (:func:`~equivision.data.list_datasets`): a built-in
      (``digits``, ``photos``, ``scenes``, ...) or a real dataset on disk
      (``fashion-mnist``, ``mnist``; looked up in ``root``, ``$EQUIVISION_DATA``,
      ``/usr/share/datasets``, ``~/.cache/equivision``, see :mod:`equivision.data.real`);
    * ``module:attr`` (the current directory is put on the import path): ``attr`` is a
      ``Dataset`` (the same data for every split; "train" and "val" are still carved
      from it) or a callable ``attr(split=..., size=..., seed=..., **kw)`` returning one
      (called with "train" for "train" and "val");
    * an existing path (write ``./digits`` for a folder that shares a registered
      name): an IDX folder in the MNIST layout (``train-images-idx3-ubyte``,
      ``t10k-...``, gzipped or not), a CIFAR-10/100 python pickle folder, or a
      class-per-folder image directory (``root/<class>/<image>``; with ``train/`` and
      ``test/`` sub-folders each such a directory, else its test split is a seeded,
      stratified ``test_fraction`` (default 0.2) of it).

    Splits: ``"train"``, ``"val"``, ``"test"`` and ``"all"``. ``"val"`` is a seeded,
    class-stratified ``val_fraction`` of the training data, never the test split, and
    ``"train"`` is the rest, so the two never share an item; ``val_fraction=0`` makes
    ``"train"`` the whole training data (and ``"val"`` an error).

    ``size``: images are resized (bilinear, antialiased when shrinking) to
    ``size x size`` when the files' size differs; built-ins draw at ``size`` directly;
    ``None`` keeps the files' size.

    Args:
        spec: name, path or ``module:attr``.
        split: one of :data:`SPLITS`.
        root: where named real datasets are looked for first.
        size: output side length, or ``None``.
        seed: seed of the validation carve and of the built-ins' own randomness.
        val_fraction: fraction of the training data held out as ``"val"``, in ``[0, 1)``.
        **kw: passed to a built-in's builder or a ``module:attr`` callable; for image
            folders ``grayscale`` and ``test_fraction``.

    Returns:
        A ``Dataset`` of ``(image (C, H, W) float in [0, 1], label)`` items; an
        :class:`ImageDataset` except where a builder returns another kind (``scenes``).

    Raises:
        ValueError: bad split, size or fraction; an unknown name (did-you-mean and the
            valid names); a ``module:attr`` that cannot be imported or gives no Dataset;
            unreadable files (one line naming the file and the fault).
        DatasetNotFoundError: a named real dataset with no files anywhere (the message
            lists where it looked and how to get it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
        raise ValueError("split 'val' needs val_fraction > 0")
    source = "train" if split in ("train", "val") else split
    data = _load(spec, source, root=root, size=size, seed=seed, **kw)
    if split in ("train", "val") and val_fraction > 0.0:
        data = carve_validation(data, split, val_fraction, seed)
    return data


def _load(spec: str, split: str, *, root: str | os.PathLike | None, size: int | None,
          seed: int, **kw: Any) -> Dataset:
    """Split ``split`` ("train", "test" or "all") of ``spec``, before the validation carve."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a dataset must be a name, a path or module:attr, got {spec!r}")
    if spec in REAL_DATASETS:
        _no_options(spec, kw)
        return resize_dataset(load_real_dataset(spec, split, root), size)
    if spec in DATASETS:
        return get_dataset(spec, split=split, size=size, seed=seed, **kw)
    path = Path(spec).expanduser()
    if ":" in spec and not spec.startswith((".", "/", "~")) and not path.exists():
        return _load_import(spec, split, size=size, seed=seed, **kw)
    if path.exists():
        return resize_dataset(_load_path(path, split, size=size, seed=seed, **kw), size)
    if os.sep in spec or spec.startswith((".", "~")):
        raise ValueError(f"{spec}: no such file or folder")
    try:
        DATASETS.get(spec)
    except UnknownNameError as err:  # did-you-mean and the valid names
        raise UnknownNameError(f"{err}; or give a dataset folder or module:attr") from None
    raise AssertionError(f"{spec!r} is registered but was not loaded")  # not reached


def _no_options(what: str, kw: dict[str, Any]) -> None:
    """Refuse options that a source does not take (instead of ignoring them)."""
    if kw:
        raise ValueError(f"{what} takes no dataset options, got {', '.join(sorted(kw))}")


def _cifar_variant(folder: Path) -> int | None:
    """10 or 100 when ``folder`` is (or holds) a CIFAR pickle folder, else ``None``."""
    if (folder / "cifar-10-batches-py").is_dir() or (folder / "data_batch_1").is_file():
        return 10
    if (folder / "cifar-100-python").is_dir() or (
            (folder / "train").is_file() and (folder / "meta").is_file()):
        return 100
    return None


def _load_path(path: Path, split: str, *, size: int | None, seed: int,
               **kw: Any) -> ImageDataset:
    """``split`` of the files at ``path`` (IDX, CIFAR or image folder)."""
    if not path.is_dir():
        raise ValueError(f"{path}: a dataset path must be a folder (an MNIST-layout IDX "
                         "folder, a CIFAR-10/100 pickle folder or a class-per-folder image "
                         "directory)")
    if find_idx_files(path, "train") or find_idx_files(path, "test"):
        _no_options(str(path), kw)
        return load_idx_folder(path, split)
    variant = _cifar_variant(path)
    if variant is not None:
        _no_options(str(path), kw)
        parts = ["train", "test"] if split == "all" else [split]
        return concat_datasets([load_cifar(path, variant, s) for s in parts])
    return _load_image_folder(path, split, size=size, seed=seed, **kw)


def _load_image_folder(path: Path, split: str, *, size: int | None, seed: int,
                       grayscale: bool = False, test_fraction: float = 0.2) -> ImageDataset:
    """A class-per-folder directory: its ``train/`` and ``test/`` sub-directories when it
    has both, else a seeded, stratified split of the whole directory."""
    subs = {p.name for p in path.iterdir() if p.is_dir()}
    if {"train", "test"} <= subs:
        parts = ["train", "test"] if split == "all" else [split]
        return concat_datasets([load_image_folder(path / s, size, grayscale) for s in parts])
    data = load_image_folder(path, size, grayscale)
    if split == "all":
        return data
    idx = stratified_split(data.labels, split, test_fraction, seed)
    return _take(data, idx, f"{path.name}/{split}")


def _load_import(spec: str, split: str, *, size: int | None, seed: int,
                 **kw: Any) -> Dataset:
    """The dataset ``module:attr`` gives (the current directory is importable)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"bad dataset {spec!r}: write module:attr, e.g. mydata:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot load dataset {spec!r}: {err}") from None
    if not isinstance(obj, Dataset):
        if not callable(obj):
            raise ValueError(f"dataset {spec!r} is a {type(obj).__name__}, neither a "
                             "Dataset nor a callable returning one")
        obj = obj(split=split, size=size, seed=seed, **kw)
    if not isinstance(obj, Dataset):
        raise ValueError(f"dataset {spec!r} returned a {type(obj).__name__}, not a "
                         "torch.utils.data.Dataset")
    return resize_dataset(obj, size) if isinstance(obj, ImageDataset) else obj


def _take(data: Dataset, idx: torch.Tensor, name: str) -> Dataset:
    """The items ``idx`` of ``data``: its own ``subset`` when it has one (ImageDataset,
    SceneDataset), else a ``torch.utils.data.Subset``."""
    subset = getattr(data, "subset", None)
    return subset(idx, name) if callable(subset) else Subset(data, idx.tolist())


def carve_validation(data: Dataset, split: str, fraction: float, seed: int) -> Dataset:
    """``"val"``: a seeded, class-stratified ``fraction`` of ``data``; ``"train"``: the
    rest. Datasets without ``labels`` are split without stratification.

    Raises:
        ValueError: the requested part would be empty.
    """
    labels = getattr(data, "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        labels = torch.zeros(len(data), dtype=torch.long)  # type: ignore[arg-type]
    idx = stratified_split(labels, "test" if split == "val" else "train", fraction, seed)
    if len(idx) == 0:
        raise ValueError(f"the {split} split is empty: val_fraction={fraction:g} of "
                         f"{len(labels)} training items; change val_fraction")
    base = getattr(data, "name", "") or "data"
    return _take(data, idx, f"{base.rsplit('/', 1)[0]}/{split}")
