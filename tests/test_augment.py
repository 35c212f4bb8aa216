"""Training augmentations (crop, flip, CutMix, RandAugment), their parsing, and training
with soft targets."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from equivision import augment
from equivision.augment import (
    AUGMENTATIONS,
    AugmentPipeline,
    CutMix,
    HorizontalFlip,
    RandAugment,
    RandomCrop,
    build_augment,
    cutmix,
    none,
    randaugment,
    random_crop,
    random_hflip,
)
from equivision.models import create_model
from equivision.registry import Registry, UnknownNameError
from equivision.training import TrainConfig, TrainError, train
from equivision.transforms import Dihedral, Translation


def batch(n=8, c=1, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


class Pairs(Dataset):
    def __init__(self, n=24, size=8, classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = torch.rand(n, 1, size, size, generator=g) * 0.5 + 0.2 * self.y.view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


# ----------------------------------------------------------------------------- crop / flip


def test_random_crop_is_a_translation_of_the_padded_image():
    x = batch(6, 2, 10)
    torch.manual_seed(3)
    out = random_crop(x, padding=4)
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    shifts = set()
    for b in range(len(x)):
        hits = [(t, l) for t in range(9) for l in range(9)
                if torch.equal(out[b], padded[b, :, t:t + 10, l:l + 10])]
        assert hits, f"image {b} is not a crop of its padded version"
        shifts.add(hits[0])
    assert len(shifts) > 1  # offsets are drawn per image
    # the offsets come from torch's RNG: the same seed gives the same crops
    crop = RandomCrop(4)
    torch.manual_seed(3)
    top, left = crop.offsets(6)
    torch.manual_seed(3)
    again = crop(x)
    assert torch.equal(again, out)
    for b in range(6):
        t, l = int(top[b]), int(left[b])
        assert torch.equal(out[b], padded[b, :, t:t + 10, l:l + 10])


def test_crop_zero_padding_is_identity_and_range_kept():
    x = batch()
    assert torch.equal(RandomCrop(0)(x), x)
    out = RandomCrop(4)(x)
    assert out.min() >= 0 and out.max() <= 1


def test_random_hflip_flips_some_images_and_is_seeded():
    x = batch(32)
    torch.manual_seed(0)
    out = random_hflip(x)
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(32)]
    kept = [torch.equal(out[b], x[b]) for b in range(32)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32
    torch.manual_seed(0)
    assert torch.equal(HorizontalFlip()(x), out)
    assert torch.equal(HorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(HorizontalFlip(0.0)(x), x)


def test_determinism_does_not_depend_on_python_or_numpy_rng():
    x = batch(8, 3, 16)
    aug = build_augment("crop,flip,randaugment,cutmix:1.0:1.0", num_classes=4)
    y = torch.arange(8) % 4
    torch.manual_seed(7)
    random.seed(1)
    np.random.seed(1)
    a = aug(x, y)
    torch.manual_seed(7)
    random.seed(2)
    np.random.seed(2)
    b = aug(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- cutmix


def test_cutmix_soft_targets_match_box_area():
    n, size, k = 8, 16, 8
    # image i is constant i / n: the pasted box is where the image changed
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 1, size, size)
    y = torch.arange(n)
    torch.manual_seed(1)
    mixed = 0
    for _ in range(10):
        out, t = cutmix(x, y, num_classes=k)
        assert out.shape == x.shape and t.shape == (n, k)
        assert torch.allclose(t.sum(1), torch.ones(n))
        assert out.min() >= x.min() and out.max() <= x.max()
        for i in range(n):
            changed = (out[i] != x[i]).float().mean().item()
            if changed > 0:
                mixed += 1
                src = int(round(out[i][out[i] != x[i]][0].item() * n))
                assert t[i, src] == pytest.approx(changed, abs=1e-6)
                assert t[i, i] == pytest.approx(1 - changed, abs=1e-6)
            else:  # no box (clipped to nothing) or the image mixed with itself
                assert t[i, i] == pytest.approx(1.0)
    assert mixed > 0


def test_cutmix_probability_and_width():
    x, y = batch(4), torch.tensor([0, 1, 2, 1])
    out, t = CutMix(p=0.0, num_classes=5)(x, y)
    assert torch.equal(out, x) and torch.equal(t, F.one_hot(y, 5).float())
    torch.manual_seed(0)
    _, t = cutmix(x, y)  # width inferred from the labels
    assert t.shape == (4, 3)
    with pytest.raises(ValueError):
        CutMix(alpha=0)
    with pytest.raises(ValueError):
        cutmix(x, torch.tensor([0, 1, 5, 1]), num_classes=3)


# ----------------------------------------------------------------------------- randaugment


@pytest.mark.parametrize("c", [1, 3])
def test_randaugment_keeps_shape_and_range(c):
    x = batch(16, c, 16)
    torch.manual_seed(0)
    out = randaugment(x, n=2, m=9)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5
    assert not torch.equal(out, x)
    torch.manual_seed(0)
    assert torch.equal(RandAugment(2, 9)(x), out)


def test_randaugment_grayscale_runs_every_operation():
    ra = RandAugment(n=15, m=9)  # every operation on every image (color: identity on gray)
    out = ra(batch(4, 1, 16))
    assert out.shape == (4, 1, 16, 16) and not out.requires_grad
    with pytest.raises(ValueError, match="1- or 3-channel"):
        ra(batch(2, 2, 16))
    with pytest.raises(ValueError):
        RandAugment(n=0)
    with pytest.raises(ValueError):
        RandAugment(m=30)


# ----------------------------------------------------------------------------- parsing


def test_build_augment_parses_and_composes():
    aug = build_augment("crop,flip")
    assert isinstance(aug, AugmentPipeline) and aug.takes_labels
    assert [type(a) for a in aug.augmentations] == [RandomCrop, HorizontalFlip]
    aug = build_augment("random_crop:2, hflip:0.25, cutmix:0.5:1, randaugment:1:5", 10)
    crop, flip, mix, ra = aug.augmentations
    assert crop.padding == 2 and flip.p == 0.25
    assert (mix.alpha, mix.p, mix.num_classes) == (0.5, 1.0, 10)
    assert (ra.n, ra.m) == (1, 5)
    for spec in ("none", "", None):
        ident = build_augment(spec)
        x, y = batch(), torch.zeros(8, dtype=torch.long)
        assert ident.augmentations == [] and ident(x, y) == (x, y)
    x = batch()
    assert none(x) is x
    assert set(AUGMENTATIONS) == {"crop", "flip", "cutmix", "randaugment", "none"}


@pytest.mark.parametrize("spec,match", [
    ("crop,rotate", "valid: crop"),
    ("blur", "unknown augmentation"),
    ("crop,crop", "twice"),
    ("crop:a", "bad argument"),
    ("crop:1:2", "at most 1"),
    ("none,flip", "cannot be combined"),
    ("crop,,flip", "empty"),
    ("flip:2", "probability"),
])
def test_build_augment_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_augment(spec)


def test_compose_keeps_labels_for_image_only_augmentations():
    x, y = batch(), torch.arange(8)
    out, labels = build_augment("crop,flip")(x, y)
    assert out.shape == x.shape and labels is y


# ----------------------------------------------------------------------------- training


def test_train_one_epoch_with_cutmix_and_exact_resume(tmp_path):
    data = Pairs()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, device="cpu", seed=0)

    def model():
        torch.manual_seed(0)
        return create_model("cnn-small", num_classes=3, width=4)

    aug = build_augment("crop:2,flip,cutmix:1.0:1.0")  # width inferred, padded to 3
    straight = model()
    hist = train(straight, data, data, cfg, out_dir=tmp_path / "a", augment=aug,
                 progress=False)
    assert len(hist["epoch"]) == 2
    assert all(np.isfinite(hist["train_loss"])) and 0 <= hist["train_acc"][0] <= 1
    # interrupted after one epoch, resumed: same result (augmentation randomness is torch's)
    class Crash:
        def on_epoch_end(self, epoch, model, history):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model(), data, data, cfg, out_dir=tmp_path / "b", augment=aug,
              callbacks=[Crash()], progress=False)
    torch.rand(5)  # the global RNG moves on; the checkpoint restores it
    resumed = model()
    hist_b = train(resumed, data, data, cfg, out_dir=tmp_path / "b", resume=True, augment=aug,
                   progress=False)
    assert hist_b["train_loss"] == hist["train_loss"]
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_train_soft_targets_checks():
    data = Pairs()
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu")
    net = create_model("cnn-small", num_classes=3, width=4)

    class TooWide:
        takes_labels = True

        def __call__(self, x, y):
            return x, F.one_hot(y, 5).float()

    with pytest.raises(TrainError, match="5 classes"):
        train(net, data, None, cfg, augment=TooWide(), progress=False)

    class Bad:
        takes_labels = True

        def __call__(self, x, y):
            return x

    with pytest.raises(TrainError, match="must return"):
        train(net, data, None, cfg, augment=Bad(), progress=False)
    # an image-only function still works as before
    hist = train(net, data, None, cfg, augment=lambda x: x.flip(-1), progress=False)
    assert len(hist["epoch"]) == 1


def test_cli_train_with_augment(tmp_path, capsys):
    from equivision.checkpoint import load_checkpoint
    from equivision.cli import main

    run = tmp_path / "vit"
    # image_size is taken from the data (12 px) for models that have one
    assert main(["train", "--model", "vit-small", "--model-args", "dim=8,depth=1,heads=2",
                 "--data", "digits", "--size", "12", "--epochs", "1", "--out", str(run),
                 "--augment", "crop:2,flip,cutmix", "--quiet"]) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["model_kwargs"]["image_size"] == 12
    assert main(["train", "--model", "cnn-small", "--data", "digits", "--size", "12",
                 "--out", str(tmp_path / "bad"), "--augment", "crop,mixup", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown augmentation 'mixup'" in err and "randaugment" in err
    assert not (tmp_path / "bad").exists()


def test_random_geometry_is_per_image_elements():
    x = batch(12)
    crop, flip = RandomCrop(3), HorizontalFlip(0.5)
    torch.manual_seed(5)
    shifts = crop.elements(12)
    torch.manual_seed(5)
    out = crop(x)
    assert all(isinstance(g, Translation) for g in shifts)
    assert all(-3 <= g.dx <= 3 and -3 <= g.dy <= 3 for g in shifts)
    for b, g in enumerate(shifts):  # each image moved by its own translation
        assert torch.equal(out[b: b + 1], g.apply_image(x[b: b + 1]))
    torch.manual_seed(6)
    mirrors = flip.elements(12)
    torch.manual_seed(6)
    out = flip(x)
    assert set(mirrors) <= {Dihedral(0), Dihedral(0, True)}
    for b, g in enumerate(mirrors):
        assert torch.equal(out[b: b + 1], g.apply_image(x[b: b + 1]))


def test_augmentation_names_use_the_registry():
    assert isinstance(AUGMENTATIONS, Registry)
    assert AUGMENTATIONS.get("CROP").usage == "crop[:PAD]"
    assert AUGMENTATIONS.describe()["cutmix"] == "cutmix[:ALPHA[:P]]"
    with pytest.raises(UnknownNameError, match="Did you mean 'flip'") as err:
        build_augment("crop,flpi")
    assert isinstance(err.value, KeyError) and "valid: crop[:PAD]" in str(err.value)
    # one name, one meaning: the fixed transformations keep hflip / Compose
    assert not hasattr(augment, "hflip") and not hasattr(augment, "Compose")
