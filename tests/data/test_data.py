"""Datasets: built-ins, rotated variants, file-format loaders and the registry."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from equivision.data import (
    DEFAULT_PHOTOS,
    ImageDataset,
    RotatedDataset,
    SyntheticImages,
    circle_crop,
    circle_mask,
    digits,
    get_dataset,
    list_datasets,
    load_cifar,
    load_image_folder,
    load_mnist_idx,
    photos,
    stratified_split,
)

EXCLUDED = (0, 1, 6, 8)
KEPT = [2, 3, 4, 5, 7, 9]


@pytest.fixture(scope="module")
def all_digits():
    return digits("all")


@pytest.fixture(scope="module")
def digits6():
    return digits("train", exclude=EXCLUDED)


def rot(x, k):
    return torch.rot90(x, k, dims=(-2, -1))


# ---------------------------------------------------------------- ImageDataset


def test_image_dataset_items_and_validation():
    ds = ImageDataset(torch.rand(5, 3, 4, 6), torch.tensor([0, 1, 2, 1, 0]), ["a", "b", "c"])
    x, y = ds[3]
    assert x.shape == (3, 4, 6) and y == 1 and isinstance(y, int)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.image_shape == (3, 4, 6)
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 4, 6) and yb.tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="zero images"):
        ImageDataset(torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset(torch.rand(2, 1, 4, 4) * 2, torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 3]), ["a", "b"])
    with pytest.raises(ValueError, match="N, C, H, W"):
        ImageDataset(torch.rand(2, 4, 4), torch.tensor([0, 1]), ["a", "b"])


# ---------------------------------------------------------------- digits


def test_digits_shape_range_and_mnist_like_padding(all_digits):
    ds = all_digits
    assert len(ds) == 1797 and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and 0.9 < float(ds.images.max()) <= 1.0
    # a 20x20 digit in the middle of a 28x28 frame: a 4-pixel zero border
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert float(ds.images[..., border].abs().max()) == 0.0
    small = digits("test", size=16)
    assert small.image_shape == (1, 16, 16) and float(small.images.max()) <= 1.0


def test_digits_split_disjoint_stratified_deterministic(all_digits):
    labels = all_digits.labels
    tr, te = stratified_split(labels, "train", 0.2, 0), stratified_split(labels, "test", 0.2, 0)
    assert not set(tr.tolist()) & set(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(len(labels)))
    counts, test_counts = torch.bincount(labels), torch.bincount(labels[te], minlength=10)
    assert torch.equal(test_counts, torch.round(counts * 0.2).long())
    train, test = digits("train"), digits("test")
    assert torch.equal(train.images, all_digits.images[tr])
    assert torch.equal(train.labels, labels[tr]) and torch.equal(test.labels, labels[te])
    assert torch.equal(digits("train", seed=0).images, train.images)
    other = stratified_split(labels, "test", 0.2, 1)
    assert not torch.equal(other, te)
    assert torch.equal(torch.bincount(labels[other], minlength=10), test_counts)


def test_digits_exclusion_relabels(all_digits):
    ds = digits("all", exclude=EXCLUDED)
    assert ds.classes == [str(d) for d in KEPT] and ds.num_classes == 6
    keep = torch.isin(all_digits.labels, torch.tensor(KEPT))
    assert torch.equal(ds.images, all_digits.images[keep])
    original = torch.tensor(KEPT)[ds.labels]
    assert torch.equal(original, all_digits.labels[keep])
    with pytest.raises(ValueError, match="zero images"):
        digits(exclude=range(10))
    with pytest.raises(ValueError, match="0..9"):
        digits(exclude=(11,))


# ---------------------------------------------------------------- photos


def _find(photo, patch):
    """Top-left (y, x) where ``patch (1, s, s)`` occurs in ``photo (1, H, W)`` (by SSD)."""
    p, x = patch[None].double(), photo[None].double()
    ones = torch.ones_like(p)
    ssd = F.conv2d(x**2, ones) - 2 * F.conv2d(x, p) + (p**2).sum()
    flat = int(ssd.flatten().argmin())
    assert float(ssd.flatten()[flat]) < 1e-6
    return divmod(flat, ssd.shape[-1])


def test_photos_shapes_labels_determinism_and_disjoint_regions():
    ds = photos("train", size=16, patches_per_image=6)
    assert ds.image_shape == (3, 16, 16) and len(ds) == 6 * len(DEFAULT_PHOTOS)
    assert ds.classes == list(DEFAULT_PHOTOS)
    assert torch.equal(ds.labels, torch.arange(len(DEFAULT_PHOTOS)).repeat_interleave(6))
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    assert torch.equal(photos("train", size=16, patches_per_image=6).images, ds.images)
    assert not torch.equal(photos("train", size=16, patches_per_image=6, seed=1).images,
                           ds.images)
    gray = photos("train", size=16, patches_per_image=6, grayscale=True)
    luma = (ds.images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    assert gray.image_shape == (1, 16, 16) and torch.allclose(gray.images, luma, atol=1e-6)
    # camera (gray) is replicated to 3 channels
    cam = ds.images[ds.labels == DEFAULT_PHOTOS.index("camera")]
    assert torch.equal(cam[:, 0], cam[:, 1]) and torch.equal(cam[:, 1], cam[:, 2])
    # train patches come from left of the held-out strip, test patches from inside it
    import skimage.data

    camera = torch.from_numpy(skimage.data.camera().astype(np.float32) / 255)[None]
    w, strip = camera.shape[-1], max(16, round(camera.shape[-1] * 0.2))
    for split in ("train", "test"):
        part = photos(split, size=16, patches_per_image=4, names=("camera",), grayscale=True)
        for patch in part.images:
            y, x = _find(camera, patch)
            assert torch.allclose(camera[:, y:y + 16, x:x + 16], patch, atol=1e-6)
            assert (x + 16 <= w - strip) if split == "train" else (x >= w - strip)


# ---------------------------------------------------------------- rotations


def test_rotated_items_are_rot90_of_base(digits6):
    ds = RotatedDataset(digits6, seed=3)
    ks = ds.rotation_index()
    assert set(ks.tolist()) == {0, 1, 2, 3}
    for i in range(0, len(ds), 97):
        x, y = ds[i]
        assert torch.equal(x, rot(digits6[i][0], int(ks[i]))) and y == digits6[i][1]
    assert torch.equal(RotatedDataset(digits6, seed=3).angles, ds.angles)
    assert not torch.equal(RotatedDataset(digits6, seed=4).angles, ds.angles)
    mat = ds.materialize()
    assert mat.num_classes == 6 and len(mat) == len(ds)
    for i in (0, 5, len(ds) - 1):
        assert torch.equal(mat[i][0], ds[i][0]) and mat[i][1] == ds[i][1]


def test_equivariant_labels(digits6):
    ds = RotatedDataset(digits6, angles=(0, 90, 180, 270), seed=1, label_mode="equivariant")
    assert ds.num_classes == 24 and ds.classes[:5] == ["2@0", "2@90", "2@180", "2@270", "3@0"]
    mat = ds.materialize()
    assert torch.equal(mat.labels, digits6.labels * 4 + ds.rotation_index())
    k = mat.labels % 4
    for i in range(0, len(mat), 53):
        assert torch.equal(mat.images[i], rot(digits6.images[i], int(k[i])))
    with pytest.raises(ValueError, match="equivariant"):
        RotatedDataset(digits6, angles="uniform", label_mode="equivariant")
    with pytest.raises(ValueError, match="equivariant"):
        RotatedDataset(digits6, angles=(0, 45), label_mode="equivariant")


def test_uniform_rotation_with_circle_crop(all_digits):
    ds = RotatedDataset(all_digits, angles="uniform", seed=0, circle_crop=True)
    assert float(ds.angles.min()) >= 0.0 and float(ds.angles.max()) < 360.0
    assert float(ds.angles.std()) > 80  # spread over the circle, not a few values
    x, y = ds[7]
    assert x.shape == (1, 28, 28) and y == all_digits[7][1]
    assert float(x[..., ~circle_mask(28, 28)].abs().max()) == 0.0
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    from equivision.transforms import Rotation

    expected = circle_crop(Rotation(float(ds.angles[7])).apply_image(all_digits[7][0][None])[0])
    assert torch.allclose(x, expected.clamp(0, 1), atol=1e-5)
    # a rotation by 45 degrees of a non-symmetric image is not a 90-degree rotation
    ds45 = RotatedDataset(all_digits, angles=(45,))
    assert all(not torch.allclose(ds45[3][0], rot(all_digits[3][0], k)) for k in range(4))


def test_circle_crop_zeroes_corners_only():
    x = torch.ones(2, 3, 10, 10)
    y = circle_crop(x)
    assert y.shape == x.shape
    assert float(y[..., 0, 0].abs().max()) == 0 and float(y[..., -1, -1].abs().max()) == 0
    assert float(y[..., 5, 5].min()) == 1 and float(y[..., 0, 5].min()) == 1
    m = circle_mask(10, 10)
    assert torch.equal(m, rot(m, 1)) and 0.7 < float(m.float().mean()) < 0.85


# ---------------------------------------------------------------- synthetic


def test_synthetic_images_lazy_and_deterministic():
    ds = SyntheticImages(4000, shape=(3, 16, 20), seed=5)
    assert len(ds) == 4000 and ds.image_shape == (3, 16, 20)
    x, y = ds[3999]
    assert x.shape == (3, 16, 20) and 0 <= y < 10
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    assert torch.equal(ds[17][0], SyntheticImages(4000, (3, 16, 20), seed=5)[17][0])
    assert torch.equal(ds[-1][0], x)
    assert not torch.equal(ds[17][0], ds[18][0])
    assert not torch.equal(ds[17][0], SyntheticImages(4000, (3, 16, 20), seed=6)[17][0])
    labels = {ds[i][1] for i in range(200)}
    assert len(labels) == 10
    xb, yb = next(iter(DataLoader(ds, batch_size=8)))
    assert xb.shape == (8, 3, 16, 20) and yb.shape == (8,)
    with pytest.raises(IndexError):
        ds[4000]


# ---------------------------------------------------------------- file formats


def _idx(arr: np.ndarray) -> bytes:
    head = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", d)
                                                           for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs, labs = rng.integers(0, 256, (5, 7, 6), dtype=np.uint8), np.array([3, 1, 4, 1, 5])
    suffix = ".gz" if gz else ""
    ip, lp = tmp_path / f"img-idx3-ubyte{suffix}", tmp_path / f"lab-idx1-ubyte{suffix}"
    write = gzip.compress if gz else (lambda b: b)
    ip.write_bytes(write(_idx(imgs)))
    lp.write_bytes(write(_idx(labs)))
    ds = load_mnist_idx(ip, lp)
    assert ds.image_shape == (1, 7, 6) and ds.num_classes == 10
    assert torch.equal((ds.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(imgs))
    assert ds.labels.tolist() == labs.tolist()


def test_load_mnist_idx_bad_input(tmp_path):
    imgs, labs = np.zeros((4, 3, 3), np.uint8), np.zeros(4, np.uint8)
    ip, lp = tmp_path / "images", tmp_path / "labels"
    lp.write_bytes(_idx(labs))
    ip.write_bytes(b"\x00\x00\x08\x01" + _idx(imgs)[4:])
    with pytest.raises(ValueError, match=r"images.*magic number 0x00000801"):
        load_mnist_idx(ip, lp)
    ip.write_bytes(_idx(imgs)[:-5])
    with pytest.raises(ValueError, match=r"images.*truncated"):
        load_mnist_idx(ip, lp)
    ip.write_bytes(_idx(imgs)[:7])
    with pytest.raises(ValueError, match="truncated IDX header"):
        load_mnist_idx(ip, lp)
    ip.write_bytes(gzip.compress(_idx(imgs))[:-10])
    with pytest.raises(ValueError, match="gzip"):
        load_mnist_idx(ip, lp)
    ip.write_bytes(_idx(np.zeros((3, 3, 3), np.uint8)))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        load_mnist_idx(ip, lp)
    with pytest.raises(ValueError, match="nothere.*not found"):
        load_mnist_idx(tmp_path / "nothere", lp)


def _cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_load_cifar10_batch_dir(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows, labels = [], []
    for i in range(1, 6):
        r, lab = _cifar_rows(rng, 2), [i % 10, (2 * i) % 10]
        _dump(folder / f"data_batch_{i}", {b"data": r, b"labels": lab, b"batch_label": b"x"})
        rows.append(r)
        labels += lab
    test_rows = _cifar_rows(rng, 3)
    _dump(folder / "test_batch", {b"data": test_rows, b"labels": [9, 0, 1]})
    names = [f"class{k}".encode() for k in range(10)]
    _dump(folder / "batches.meta", {b"label_names": names})
    for root in (tmp_path, folder):
        ds = load_cifar(root, 10, "train")
        assert len(ds) == 10 and ds.image_shape == (3, 32, 32) and ds.labels.tolist() == labels
        assert ds.classes == [f"class{k}" for k in range(10)]
        rows_all = np.concatenate(rows)
        # row layout: R plane, G plane, B plane, each row-major 32x32
        i, c, y, x = 7, 2, 5, 30
        assert round(float(ds.images[i, c, y, x]) * 255) == rows_all[i, c * 1024 + y * 32 + x]
        back = (ds.images * 255).round().to(torch.uint8).reshape(10, 3072)
        assert torch.equal(back, torch.from_numpy(rows_all))
    test = load_cifar(folder, 10, "test")
    assert test.labels.tolist() == [9, 0, 1]
    one = load_cifar(folder / "data_batch_2", 10)
    assert torch.equal(one.images, ds.images[2:4])
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="missing CIFAR-10 train file.*data_batch_3"):
        load_cifar(folder, 10, "train")
    _dump(folder / "test_batch", {b"images": test_rows})
    with pytest.raises(ValueError, match=r"test_batch.*expected keys 'data' and 'labels'"):
        load_cifar(folder, 10, "test")
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch.*pickle"):
        load_cifar(folder, 10, "test")


def test_load_cifar100_train_file(tmp_path):
    rng = np.random.default_rng(2)
    rows = _cifar_rows(rng, 4)
    _dump(tmp_path / "train", {b"data": rows, b"fine_labels": [99, 0, 42, 7],
                               b"coarse_labels": [19, 0, 1, 2]})
    _dump(tmp_path / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    ds = load_cifar(tmp_path, variant=100, split="train")
    assert ds.num_classes == 100 and ds.classes[42] == "f42"
    assert ds.labels.tolist() == [99, 0, 42, 7]
    assert torch.equal((ds.images * 255).round().to(torch.uint8).reshape(4, -1),
                       torch.from_numpy(rows))
    _dump(tmp_path / "train", {b"data": rows, b"labels": [0, 1, 2, 3]})  # a CIFAR-10 batch
    with pytest.raises(ValueError, match="train.*expected keys 'data' and 'fine_labels'"):
        load_cifar(tmp_path, variant=100)


def test_load_image_folder(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls).mkdir()
        for j in range(n):
            arr = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{j}.png")
            written[(cls, j)] = arr
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.image_shape == (3, 5, 4)
    order = [("cat", 0), ("cat", 1), ("dog", 0), ("dog", 1), ("dog", 2)]
    for i, key in enumerate(order):
        got = (ds.images[i] * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert torch.equal(got, torch.from_numpy(written[key]))
    assert load_image_folder(tmp_path, size=8, grayscale=True).image_shape == (1, 8, 8)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(ValueError, match=r"big.png.*differs.*--size N"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read image.*remove or replace"):
        load_image_folder(tmp_path, size=4)
    (tmp_path / "dog" / "broken.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*empty class folder"):
        load_image_folder(tmp_path, size=4)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such folder"):
        load_image_folder(tmp_path / "missing")


# ---------------------------------------------------------------- registry


def test_registry_names_and_errors():
    names = list_datasets()
    required = ["digits", "digits6", "digits6-rotinv", "digits6-roteq", "digits-rot", "photos"]
    assert set(required) <= set(names)
    with pytest.raises(ValueError, match="unknown dataset 'no-such-set'") as err:
        get_dataset("no-such-set")
    assert all(n in str(err.value) for n in required)
    with pytest.raises(ValueError, match="zero images"):
        get_dataset("digits", exclude=tuple(range(10)))
    ph = get_dataset("photos", split="test", size=24, patches_per_image=2)
    assert ph.image_shape == (3, 24, 24) and len(ph) == 2 * len(DEFAULT_PHOTOS)


def test_registry_rotated_digits(digits6):
    inv = get_dataset("digits6-rotinv")
    assert inv.num_classes == 6 and torch.equal(inv.labels, digits6.labels)
    ks = []
    for i in range(len(inv)):
        k = [k for k in range(4) if torch.equal(inv.images[i], rot(digits6.images[i], k))]
        assert k, f"item {i} is not a 90-degree rotation of the base item"
        ks.append(k[0])
    assert set(ks) == {0, 1, 2, 3}
    eq = get_dataset("digits6-roteq", size=20)
    base20 = digits("train", size=20, exclude=EXCLUDED)
    assert eq.num_classes == 24 and eq.image_shape == (1, 20, 20)
    assert torch.equal(eq.labels // 4, base20.labels)
    for i in range(0, len(eq), 31):
        assert torch.equal(eq.images[i], rot(base20.images[i], int(eq.labels[i] % 4)))
    dr = get_dataset("digits-rot", split="test")
    base = digits("test")
    assert torch.equal(dr.labels, base.labels) and dr.num_classes == 10
    assert float(dr.images[..., ~circle_mask(28, 28)].abs().max()) == 0.0
    assert not torch.allclose(dr.images, base.images)
    assert torch.equal(get_dataset("digits-rot", split="test").images, dr.images)
