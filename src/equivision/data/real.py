"""Named real datasets kept as files on disk: Fashion-MNIST and MNIST (IDX format).

Where the files are looked up, in order (the first folder holding all four files wins):

1. the ``root`` argument: ``root/<name>/`` or ``root`` itself;
2. ``$EQUIVISION_DATA/<name>/``;
3. ``/usr/share/datasets/<name>/`` (Debian/Ubuntu: ``apt-get install -y
   dataset-fashion-mnist``);
4. ``~/.cache/equivision/<name>/`` (where ``equivision data download NAME`` puts them).

A folder holds the files in the MNIST layout: ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
gzipped (``.gz``) or not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import ImageDataset, concat_datasets
from .formats import load_mnist_idx

__all__ = ["REAL_DATASETS", "DATA_ENV", "DatasetNotFoundError", "RealDataset",
           "SYSTEM_DATA_DIR", "default_download_root", "find_idx_files", "find_real_dataset",
           "load_idx_folder", "load_real_dataset", "search_folders"]

#: environment variable naming a folder that holds ``<name>/`` dataset folders
DATA_ENV = "EQUIVISION_DATA"
#: where Debian's ``dataset-*`` packages install datasets
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

#: the IDX stems of each split, in the MNIST layout: (images, labels)
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A named dataset whose files are nowhere; the message lists where it looked and how
    to get it. Subclasses ``FileNotFoundError`` and ``ValueError``."""

    def __str__(self) -> str:  # OSError would add errno formatting
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RealDataset:
    """A real dataset distributed as four gzipped IDX files.

    Attributes:
        name: the registry name (``"fashion-mnist"``).
        url: the official folder URL the files are fetched from (ends with ``/``).
        sha256: ``{file name: SHA-256 hex digest}`` of the official ``.gz`` files.
        classes: the class names, label ``k`` is ``classes[k]``.
        apt_package: the Debian package that installs it, or ``""``.
    """

    name: str
    url: str
    sha256: dict[str, str]
    classes: tuple[str, ...]
    apt_package: str = ""


# SHA-256 sums of the official .gz files. Fashion-MNIST: the sums that several
# independent public loaders list next to the official MD5s of
# github.com/zalandoresearch/fashion-mnist (8d4fb7e6..., 25c81989..., bef4ecab...,
# bb300cfd...). MNIST: the sums of the files on torchvision's mirror (ossci-datasets),
# the same files yann.lecun.com/exdb/mnist/ served, as listed by
# ankane/torchvision-ruby (lib/torchvision/datasets/mnist.rb) and guildai's mnist
# package. (Debian's dataset-fashion-mnist holds re-compressed files: same IDX
# contents, other .gz bytes, so it loads but is not a download cache.)
REAL_DATASETS: dict[str, RealDataset] = {
    "fashion-mnist": RealDataset(
        "fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {"train-images-idx3-ubyte.gz":
             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
         "train-labels-idx1-ubyte.gz":
             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
         "t10k-images-idx3-ubyte.gz":
             "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
         "t10k-labels-idx1-ubyte.gz":
             "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"},
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
         "Sneaker", "Bag", "Ankle boot"),
        apt_package="dataset-fashion-mnist"),
    "mnist": RealDataset(
        "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {"train-images-idx3-ubyte.gz":
             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz":
             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz":
             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz":
             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        tuple(str(d) for d in range(10))),
}


def default_download_root() -> Path:
    """The folder ``equivision data download`` fills by default: ``$EQUIVISION_DATA``, else
    ``~/.cache/equivision``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "equivision"


def search_folders(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The folders where dataset ``name`` is looked for, in order (see the module doc)."""
    folders = []
    if root is not None:
        root = Path(root).expanduser()
        folders += [root / name, root]
    env = os.environ.get(DATA_ENV)
    if env:
        folders.append(Path(env).expanduser() / name)
    folders += [SYSTEM_DATA_DIR / name, Path.home() / ".cache" / "equivision" / name]
    return folders


def find_idx_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` paths of ``split`` ("train" or "test") in an MNIST-layout
    ``folder`` (each file gzipped or not, ``-idx`` or ``.idx`` spelling), or ``None``."""
    found = []
    for stem in IDX_STEMS[split]:
        spellings = [stem, stem.replace("-idx", ".idx")]
        paths = [folder / f"{s}{gz}" for s in spellings for gz in (".gz", "")]
        hit = next((p for p in paths if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def find_real_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """The first folder of :func:`search_folders` that holds all of ``name``'s files.

    Raises:
        DatasetNotFoundError: none does; the message lists the folders and how to get
            the files.
    """
    spec = REAL_DATASETS[name]
    folders = search_folders(name, root)
    for folder in folders:
        if all(find_idx_files(folder, split) for split in IDX_STEMS):
            return folder
    how = f"`equivision data download {name}`"
    if spec.apt_package:
        how = f"`apt-get install -y {spec.apt_package}` (Debian/Ubuntu) or " + how
    raise DatasetNotFoundError(
        f"dataset {name!r} not found; looked in {', '.join(map(str, folders))}. "
        f"Get it with {how}, or pass --data-root (root=) / set ${DATA_ENV} to the folder "
        f"that holds {name}/")


def load_idx_folder(folder: str | os.PathLike, split: str,
                    classes: Sequence[str] | None = None) -> ImageDataset:
    """The ``split`` ("train", "test", or "all" = train then test) of an MNIST-layout IDX
    ``folder``.

    Returns:
        images ``(N, 1, H, W)`` float32 in ``[0, 1]``, labels ``(N,)``.

    Raises:
        ValueError: the folder lacks the split's files (the message names the expected
            files), or a file is unreadable (see :func:`load_mnist_idx`).
    """
    folder = Path(folder)
    sets = []
    for part in ("train", "test") if split == "all" else (split,):
        files = find_idx_files(folder, part)
        if files is None:
            raise ValueError(f"{folder}: no MNIST-layout {part} files (expected "
                             f"{' and '.join(IDX_STEMS[part])}, optionally .gz)")
        sets.append(load_mnist_idx(*files, classes=classes))
    ds = concat_datasets(sets)
    ds.name = f"{folder.name}/{split}"
    return ds


def load_real_dataset(name: str, split: str = "train",
                      root: str | os.PathLike | None = None) -> ImageDataset:
    """The ``split`` ("train", "test" or "all") of the real dataset ``name``, from the
    first folder of :func:`search_folders` that holds its files.

    Returns:
        images ``(N, 1, 28, 28)`` float32 in ``[0, 1]``, labels ``(N,)``, the dataset's
        class names.

    Raises:
        DatasetNotFoundError: no folder holds the files.
        ValueError: a file is unreadable.
    """
    ds = load_idx_folder(find_real_dataset(name, root), split, REAL_DATASETS[name].classes)
    ds.name = f"{name}/{split}"
    return ds
