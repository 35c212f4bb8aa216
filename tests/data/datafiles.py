"""Writers of tiny dataset files (IDX, CIFAR pickles, image folders) for the data tests."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``arr``."""
    head = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d)
                                                           for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, n_train: int = 40, n_test: int = 10, side: int = 8,
                     gz: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An MNIST-layout folder with random images and labels cycling 0..9; returns the
    arrays per split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in zip(STEMS[split], (images, labels)):
            data = idx_bytes(arr)
            (folder / (stem + (".gz" if gz else ""))).write_bytes(
                gzip.compress(data) if gz else data)
        out[split] = (images, labels)
    return out


def write_cifar10(folder: Path, per_batch: int = 4, seed: int = 0) -> None:
    """A ``cifar-10-batches-py`` folder with five tiny train batches, a test batch and
    the meta file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"c{k}".encode() for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 5,
                       side: int = 12) -> None:
    """``root/<class>/<i>.png`` RGB images of one size."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
