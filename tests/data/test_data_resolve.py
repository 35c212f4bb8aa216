"""resolve_dataset: names, paths, module:attr, the validation split, real datasets on
disk, and one clear line for each bad input."""

import gzip
import sys
import textwrap

import pytest
import torch
from datafiles import STEMS, idx_bytes, write_cifar10, write_idx_folder, write_image_folder

from equivision.data import (
    DatasetNotFoundError,
    ImageDataset,
    concat_datasets,
    digits,
    real,
    resize_dataset,
    resolve_dataset,
)
from equivision.data.scenes import SceneDataset

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def _bytes(ds: ImageDataset) -> torch.Tensor:
    return (ds.images[:, 0] * 255).round().to(torch.uint8)


def _rows(ds: ImageDataset) -> set[bytes]:
    return {bytes(r) for r in _bytes(ds).flatten(1).numpy()}


# ---------------------------------------------------------------- IDX folders


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_path_splits(tmp_path, gz):
    arrays = write_idx_folder(tmp_path / "idx", gz=gz)
    test = resolve_dataset(str(tmp_path / "idx"), "test")
    assert test.image_shape == (1, 8, 8) and len(test) == 10
    assert torch.equal(_bytes(test), torch.from_numpy(arrays["test"][0]))
    assert test.labels.tolist() == arrays["test"][1].tolist()
    every = resolve_dataset(str(tmp_path / "idx"), "all")
    assert len(every) == 50 and torch.equal(every.labels[40:], test.labels)


def test_validation_split_disjoint_stratified_seeded(tmp_path):
    write_idx_folder(tmp_path / "idx", n_train=100)
    path = str(tmp_path / "idx")
    train, val = resolve_dataset(path, "train"), resolve_dataset(path, "val")
    assert (len(train), len(val)) == (90, 10)
    assert not _rows(train) & _rows(val)  # never the same item
    assert _rows(train) | _rows(val) == _rows(resolve_dataset(path, "train", val_fraction=0))
    assert val.class_counts().tolist() == [1] * 10  # stratified: 10% of each class
    assert not _rows(val) & _rows(resolve_dataset(path, "test"))  # never the test split
    again, other = resolve_dataset(path, "val"), resolve_dataset(path, "val", seed=1)
    assert torch.equal(again.images, val.images)
    assert not torch.equal(other.images, val.images)
    assert len(resolve_dataset(path, "val", val_fraction=0.3)) == 30
    assert len(resolve_dataset(path, "train", val_fraction=0)) == 100
    with pytest.raises(ValueError, match="val_fraction > 0"):
        resolve_dataset(path, "val", val_fraction=0)


def test_size_resizes_only_when_it_differs(tmp_path):
    write_idx_folder(tmp_path / "idx", side=8)
    path = str(tmp_path / "idx")
    same = resolve_dataset(path, "test", size=8)
    assert torch.equal(same.images, resolve_dataset(path, "test").images)
    big = resolve_dataset(path, "test", size=16)
    assert big.image_shape == (1, 16, 16) and 0 <= float(big.images.min())
    assert float(big.images.max()) <= 1
    assert resolve_dataset("digits", "test", size=20).image_shape == (1, 20, 20)


def test_bad_idx_folders_give_one_line(tmp_path):
    folder = tmp_path / "idx"
    write_idx_folder(folder, gz=False)
    images = folder / (STEMS["train"][0])
    images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"train-images.*wrong magic number") as err:
        resolve_dataset(str(folder), "train")
    assert "\n" not in str(err.value)
    images.write_bytes(idx_bytes(torch.zeros(3, 8, 8, dtype=torch.uint8).numpy())[:10])
    with pytest.raises(ValueError, match="truncated IDX header"):
        resolve_dataset(str(folder), "train")
    images.write_bytes(idx_bytes(torch.zeros(3, 8, 8, dtype=torch.uint8).numpy()))
    with pytest.raises(ValueError, match="3 images but .* 40 labels"):
        resolve_dataset(str(folder), "train")
    (folder / STEMS["test"][0]).unlink()
    with pytest.raises(ValueError, match="no MNIST-layout test files"):
        resolve_dataset(str(folder), "test")


def test_missing_and_odd_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        resolve_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such file or folder"):
        resolve_dataset("./no/such/folder")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        resolve_dataset(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        resolve_dataset(str(tmp_path / "empty"))


# ---------------------------------------------------------------- CIFAR, image folders


def test_cifar_folder_path(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        test = resolve_dataset(str(path), "test")
        assert test.image_shape == (3, 32, 32) and len(test) == 4
        assert test.classes == [f"c{k}" for k in range(10)]
    assert len(resolve_dataset(str(tmp_path), "train", val_fraction=0)) == 20
    assert len(resolve_dataset(str(tmp_path), "all")) == 24
    assert resolve_dataset(str(tmp_path), "test", size=16).image_shape == (3, 16, 16)


def test_image_folder_path(tmp_path):
    write_image_folder(tmp_path / "pics", per_class=5)
    path = str(tmp_path / "pics")
    every = resolve_dataset(path, "all")
    assert len(every) == 10 and every.classes == ["cat", "dog"]
    train, test = resolve_dataset(path, "train", val_fraction=0), resolve_dataset(path, "test")
    assert (len(train), len(test)) == (8, 2) and not _rows(train) & _rows(test)
    gray = resolve_dataset(path, "test", size=6, grayscale=True)
    assert gray.image_shape == (1, 6, 6)
    write_image_folder(tmp_path / "split" / "train", per_class=3)
    write_image_folder(tmp_path / "split" / "test", per_class=2)
    assert len(resolve_dataset(str(tmp_path / "split"), "test")) == 4
    assert len(resolve_dataset(str(tmp_path / "split"), "train", val_fraction=0)) == 6


# ---------------------------------------------------------------- names, module:attr


def test_unknown_name_and_bad_split():
    with pytest.raises(ValueError, match="unknown dataset 'fashion-mnsit'. Did you mean "
                       "'fashion-mnist'") as err:
        resolve_dataset("fashion-mnsit")
    assert "\n" not in str(err.value) and "digits" in str(err.value)
    assert "folder or module:attr" in str(err.value)
    with pytest.raises(ValueError, match="split must be one of train, val, test, all"):
        resolve_dataset("digits", "validation")
    with pytest.raises(ValueError, match="size must be"):
        resolve_dataset("digits", size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        resolve_dataset("digits", val_fraction=1.0)


def test_builtin_names_pass_through_with_validation():
    base = digits("train")
    train, val = resolve_dataset("digits", "train"), resolve_dataset("digits", "val")
    assert len(train) + len(val) == len(base) and val.name == "digits/val"
    assert torch.equal(resolve_dataset("digits", "test").images, digits("test").images)
    scenes_val = resolve_dataset("scenes", "val", size=8, n=20)
    assert isinstance(scenes_val, SceneDataset) and len(scenes_val) == 2
    assert scenes_val.name == "scenes/val" and scenes_val.masks.shape == (2, 8, 8)


def test_names_win_over_folders_and_options_are_checked(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset("digits", "test").image_shape == (1, 28, 28)  # the built-in
    assert resolve_dataset("./digits", "all").classes == ["cat", "dog"]  # the folder
    write_idx_folder(tmp_path / "idx")
    with pytest.raises(ValueError, match="takes no dataset options, got grayscale"):
        resolve_dataset(str(tmp_path / "idx"), grayscale=True)
    with pytest.raises(ValueError, match="'fashion-mnist' takes no dataset options|"
                       "fashion-mnist takes no dataset options"):
        resolve_dataset("fashion-mnist", exclude=(1,))


def test_module_attr(tmp_path, monkeypatch):
    (tmp_path / "mydata_ev.py").write_text(textwrap.dedent("""
        import torch
        from equivision.data import ImageDataset

        def build(split="train", size=None, seed=0, n=10):
            g = torch.Generator().manual_seed(seed + (split == "test"))
            side = size or 6
            return ImageDataset(torch.rand(n, 1, side, side, generator=g),
                                torch.arange(n) % 2, ["a", "b"], name=split)

        FIXED = build(n=4)
        NOT_DATA = 3

        def broken(split, size, seed):
            return [1, 2]
    """))
    monkeypatch.chdir(tmp_path)  # resolve_dataset puts the current folder on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    test = resolve_dataset("mydata_ev:build", "test", size=5, n=8)
    assert test.image_shape == (1, 5, 5) and len(test) == 8 and test.name == "test"
    assert len(resolve_dataset("mydata_ev:build", "val", n=20)) == 2
    assert len(resolve_dataset("mydata_ev:FIXED", "test")) == 4
    assert resolve_dataset("mydata_ev:FIXED", "test", size=3).image_shape == (1, 3, 3)
    bad = {"no_such_mod_ev:x": "cannot load dataset 'no_such_mod_ev:x': No module",
           "mydata_ev:nothere": "cannot load dataset 'mydata_ev:nothere'",
           "mydata_ev:NOT_DATA": "is a int, neither a Dataset nor a callable",
           "mydata_ev:broken": "returned a list, not a torch.utils.data.Dataset",
           "mydata_ev:": "write module:attr"}
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            resolve_dataset(spec)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- real datasets on disk


def test_named_dataset_lookup_order(tmp_path, monkeypatch, no_default_data):
    write_idx_folder(tmp_path / "rootdir" / "fashion-mnist", n_test=10, seed=1)
    ds = resolve_dataset("fashion-mnist", "test", root=str(tmp_path / "rootdir"))
    assert ds.classes == FASHION_CLASSES and ds.name == "fashion-mnist/test"
    write_idx_folder(tmp_path / "flat", n_test=7)  # root itself holds the files
    assert len(resolve_dataset("fashion-mnist", "test", root=str(tmp_path / "flat"))) == 7
    write_idx_folder(tmp_path / "env" / "fashion-mnist", n_test=6)
    monkeypatch.setenv(real.DATA_ENV, str(tmp_path / "env"))
    assert len(resolve_dataset("fashion-mnist", "test")) == 6
    assert len(resolve_dataset("fashion-mnist", "test", root=str(tmp_path / "flat"))) == 7
    monkeypatch.delenv(real.DATA_ENV)
    write_idx_folder(no_default_data / "system" / "fashion-mnist", n_test=5)
    assert len(resolve_dataset("fashion-mnist", "test")) == 5
    write_idx_folder(no_default_data / "home" / ".cache" / "equivision" / "mnist", n_test=4)
    mnist = resolve_dataset("mnist", "test")
    assert len(mnist) == 4 and mnist.classes == [str(d) for d in range(10)]


def test_missing_named_dataset_says_where_and_how(no_default_data):
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_dataset("fashion-mnist", root="/some/where")
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, ValueError)
    for part in ("/some/where/fashion-mnist", str(no_default_data / "system" / "fashion-mnist"),
                 ".cache/equivision/fashion-mnist", "apt-get install -y dataset-fashion-mnist",
                 "equivision data download fashion-mnist"):
        assert part in msg


def test_named_dataset_with_corrupt_gzip(tmp_path, no_default_data):
    folder = tmp_path / "fashion-mnist"
    write_idx_folder(folder, gz=True)
    # a corrupt gzip stays a one-line error naming the file
    (folder / (STEMS["test"][1] + ".gz")).write_bytes(gzip.compress(b"x" * 100)[:-8])
    with pytest.raises(ValueError, match=r"t10k-labels.*gzip"):
        resolve_dataset("fashion-mnist", "test", root=str(tmp_path))


@pytest.mark.skipif(not (real.SYSTEM_DATA_DIR / "fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.delenv(real.DATA_ENV, raising=False)
    train = resolve_dataset("fashion-mnist", "train", val_fraction=0)
    test = resolve_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10
    assert train.class_counts().tolist() == [6000] * 10
    assert len(resolve_dataset("fashion-mnist", "val")) == 6000


# ---------------------------------------------------------------- ImageDataset checks


def test_image_dataset_rejects_nan_inf_and_channel_last():
    labels = torch.zeros(2, dtype=torch.long)
    for bad in (float("nan"), float("inf")):
        x = torch.rand(2, 1, 6, 6)
        x[1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match="1 NaN or infinite value.*nan_to_num"):
            ImageDataset(x, labels, ["a"])
    for c in (1, 3, 4):
        with pytest.raises(ValueError, match=r"channel-last.*permute\(0, 3, 1, 2\)"):
            ImageDataset(torch.rand(2, 8, 8, c), labels, ["a"])
    ImageDataset(torch.rand(2, 3, 4, 4), labels, ["a"])  # small images stay accepted
    ImageDataset(torch.rand(2, 3, 8, 8), labels, ["a"])


def test_concat_and_resize_helpers():
    a = ImageDataset(torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ["a", "b"], name="a")
    b = ImageDataset(torch.rand(3, 1, 6, 6), torch.tensor([1, 1, 0]), ["a", "b"], name="b")
    both = concat_datasets([a, b])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, 1, 1, 0] and both.name == "a"
    assert concat_datasets([a]) is a
    with pytest.raises(ValueError, match=r"image shape \(1, 4, 4\) differs"):
        concat_datasets([a, resize_dataset(b, 4)])
    with pytest.raises(ValueError, match="no datasets"):
        concat_datasets([])
    assert resize_dataset(a, None) is a and resize_dataset(a, 6) is a
    assert resize_dataset([1, 2], 4) == [1, 2]  # not an ImageDataset: passed through
    assert a.subset(torch.tensor([1])).labels.tolist() == [1]
