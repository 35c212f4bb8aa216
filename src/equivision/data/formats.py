"""Loaders for standard dataset files: MNIST IDX, CIFAR-10/100 pickles, image folders.

Each returns an :class:`~equivision.data.base.ImageDataset` and raises ``ValueError``
naming the file and what is wrong with it (missing, truncated, wrong magic number,
unexpected contents).
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .base import ImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _read_bytes(path: Path) -> bytes:
    """The contents of ``path``, gunzipped when it starts with the gzip magic."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array with ``ndim`` dimensions from ``path`` (maybe gzipped)."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    magic = int.from_bytes(data[:4], "big")
    expected = 0x0800 | ndim
    if magic != expected:
        raise ValueError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected:08x} "
                         f"(unsigned-byte IDX with {ndim} dimension(s))")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    body = len(data) - header
    if body < count:
        raise ValueError(f"{path}: truncated IDX file: dimensions {dims} need {count} data "
                         f"bytes, found {body}")
    if body > count:
        raise ValueError(f"{path}: {body - count} unexpected bytes after the {count} data bytes "
                         f"of dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(
    images_path: str | Path,
    labels_path: str | Path,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """MNIST-format IDX files (also Fashion-/K-MNIST), optionally gzipped.

    Args:
        images_path: IDX3 unsigned-byte images (magic ``0x00000803``), ``(N, H, W)``.
        labels_path: IDX1 unsigned-byte labels (magic ``0x00000801``), ``(N,)``.
        classes: class names; default ``"0"``.. ``"9"`` (more if a label is above 9).

    Returns:
        images ``(N, 1, H, W)`` float32 = bytes / 255, labels ``(N,)``.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{images_path}: zero images")
    if classes is None:
        classes = [str(k) for k in range(max(10, int(labels.max()) + 1))]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), classes,
                        name=images_path.name)


def _unpickle(path: Path) -> dict:
    """A dict from a CIFAR python pickle, with ``bytes`` keys decoded to ``str``."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")  # noqa: S301 (trusted files only)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_names(path: Path | None, key: str) -> list[str] | None:
    if path is None or not path.is_file():
        return None
    names = _unpickle(path).get(key)
    return None if names is None else [n.decode() if isinstance(n, bytes) else str(n)
                                       for n in names]


def load_cifar(path: str | Path, variant: int = 10, split: str = "train") -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the python pickle batches.

    Security: this unpickles the files, and unpickling can run arbitrary code; only
    load files from a source you trust (e.g. the official archives).

    Args:
        path: the extracted folder (``cifar-10-batches-py`` with ``data_batch_1`` ..
            ``data_batch_5``, ``test_batch``, ``batches.meta``; or ``cifar-100-python``
            with ``train``, ``test``, ``meta``), a folder holding one of those, or one
            batch file (then ``split`` is ignored).
        variant: 10 (``labels``) or 100 (``fine_labels``).
        split: ``"train"`` or ``"test"``.

    Returns:
        images ``(N, 3, 32, 32)`` float32 = bytes / 255 (rows of 3072 bytes: R, G, B
        planes, each row-major), labels ``(N,)``, class names from the meta file when
        present, else ``"0"``.. ``"K-1"``.
    """
    if variant not in (10, 100):
        raise ValueError(f"variant must be 10 or 100, got {variant}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    label_key = "labels" if variant == 10 else "fine_labels"
    meta_name, names_key = ("batches.meta", "label_names") if variant == 10 else (
        "meta", "fine_label_names")
    if path.is_dir():
        sub = path / ("cifar-10-batches-py" if variant == 10 else "cifar-100-python")
        folder = sub if sub.is_dir() else path
        if variant == 10:
            wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [
                "test_batch"]
        else:
            wanted = [split]
        files = [folder / w for w in wanted]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: missing CIFAR-{variant} {split} file(s): "
                             f"{', '.join(missing)}")
        meta: Path | None = folder / meta_name
    elif path.is_file():
        files, meta = [path], path.parent / meta_name
    else:
        raise ValueError(f"{path}: no such file or folder")
    datas, labels = [], []
    for f in files:
        batch = _unpickle(f)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{f}: not a CIFAR-{variant} batch: expected keys 'data' and "
                             f"{label_key!r}, found {sorted(map(str, batch))}")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{f}: 'data' must be uint8 (N, 3072), got {data.dtype} "
                             f"{data.shape}")
        if lab.shape != (len(data),):
            raise ValueError(f"{f}: {len(data)} images but {label_key!r} has shape {lab.shape}")
        datas.append(data)
        labels.append(lab.astype(np.int64))
    data = np.concatenate(datas)
    if len(data) == 0:
        raise ValueError(f"{files[0]}: zero images")
    classes = _cifar_names(meta, names_key) or [str(k) for k in range(variant)]
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return ImageDataset(x, torch.from_numpy(np.concatenate(labels)), classes,
                        name=f"cifar{variant}/{split}")


def load_image_folder(
    root: str | Path, size: int | None = None, grayscale: bool = False
) -> ImageDataset:
    """Images in class-per-folder layout ``root/<class>/<image>`` (read with Pillow).

    Classes are the sub-folder names in sorted order; files are read in sorted order;
    files whose extension is not in :data:`IMAGE_EXTENSIONS` are skipped.

    Args:
        root: the folder holding one sub-folder per class.
        size: resize every image to ``size x size`` (bilinear); ``None`` keeps the
            size, which must then be the same for all images.
        grayscale: load ``(1, H, W)`` luma instead of ``(3, H, W)`` RGB.

    Returns:
        images ``(N, C, H, W)`` float32 = bytes / 255, labels ``(N,)``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    images, labels, shape_of = [], [], None
    for k, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{d}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB")
                    if size is not None:
                        im = im.resize((size, size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{f}: cannot read image ({e}); remove or replace the "
                                 "file") from e
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape_of is None:
                shape_of = (f, arr.shape)
            elif arr.shape != shape_of[1]:
                raise ValueError(f"{f}: size {arr.shape[1:]} differs from {shape_of[0]} "
                                 f"{shape_of[1][1:]}; resize them all with --size N "
                                 "(Python: size=N)")
            images.append(arr)
            labels.append(k)
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)
    return ImageDataset(x, torch.tensor(labels), [d.name for d in class_dirs], name=root.name)
