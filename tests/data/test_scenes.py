"""The generated segmentation scenes and the small segmenter."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from equivision.data import get_dataset
from equivision.data.scenes import SCENE_CLASSES, SceneDataset, render_shape, scenes
from equivision.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    return scenes("train", size=16, n=24, seed=0)


def test_shapes_dtypes_and_classes(small):
    assert isinstance(small, SceneDataset) and len(small) == 24
    assert small.images.shape == (24, 3, 16, 16) and small.images.dtype == torch.float32
    assert small.masks.shape == (24, 16, 16) and small.masks.dtype == torch.int64
    assert 0 <= float(small.images.min()) and float(small.images.max()) <= 1
    assert small.num_classes == len(SCENE_CLASSES) == 5 and small.image_shape == (3, 16, 16)
    counts = small.class_pixel_counts()
    assert bool((counts > 0).all()), counts  # background and every shape class occur
    assert set(small.masks.unique().tolist()) == set(range(5))
    x, m = next(iter(DataLoader(small, batch_size=4)))
    assert x.shape == (4, 3, 16, 16) and m.shape == (4, 16, 16) and m.dtype == torch.int64


def test_deterministic_and_splits_disjoint(small):
    again = scenes("train", size=16, n=24, seed=0)
    assert torch.equal(again.images, small.images) and torch.equal(again.masks, small.masks)
    other = scenes("train", size=16, n=24, seed=1)
    test = scenes("test", size=16, n=24, seed=0)
    for d in (other, test):
        same = (d.images.flatten(1)[:, None] == small.images.flatten(1)[None]).all(-1)
        assert not bool(same.any())  # no scene is shared
    prefix = scenes("train", size=16, n=5, seed=0)  # scene i does not depend on n
    assert torch.equal(prefix.images, small.images[:5])


def test_masks_follow_the_pixels(small):
    # a shape pixel differs from the background crop: the mask marks painted pixels only
    plain = scenes("train", size=16, n=24, seed=0, max_shapes=1)
    assert bool(((plain.masks > 0).flatten(1).sum(1) > 0).all())
    ignored = scenes("train", size=16, n=24, seed=0, boundary_ignore=True)
    band = ignored.masks == 255
    assert 0 < float(band.float().mean()) < 0.3
    assert torch.equal(ignored.masks[~band], small.masks[~band])
    assert torch.equal(ignored.images, small.images)
    assert ignored.class_pixel_counts().sum() == int((~band).sum())


def test_render_shape_areas():
    r, size = 10.0, 64
    area = {k: float(render_shape(k, size, 32, 32, r, 0.3, supersample=8).sum())
            for k in range(1, 5)}
    assert area[1] == pytest.approx(math.pi * r * r, rel=0.02)
    assert area[2] == pytest.approx((1.5 * r) ** 2, rel=0.03)
    assert area[3] == pytest.approx(3 * math.sqrt(3) / 4 * r * r, rel=0.03)
    assert area[4] == pytest.approx((2 * 1.9 * 0.6 - 0.36) * r * r, rel=0.03)
    rotated = render_shape(2, size, 32, 32, r, 0.3 + math.pi / 2, supersample=8)
    assert torch.allclose(rotated, render_shape(2, size, 32, 32, r, 0.3, supersample=8),
                          atol=1e-2)
    with pytest.raises(ValueError, match="kind"):
        render_shape(7, 8, 4, 4, 2, 0)


def test_registry_and_bad_arguments():
    d = get_dataset("scenes", split="test", size=12, n=3)
    assert d.name == "scenes/test" and d.images.shape == (3, 3, 12, 12)
    with pytest.raises(ValueError, match="split"):
        scenes("val")
    with pytest.raises(ValueError, match="size"):
        scenes(size=4)
    with pytest.raises(ValueError, match="photos"):
        scenes(n=1, photos=("nope",))


def test_segmenter():
    model = create_model("segmenter", num_classes=5).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 <= n_params <= 100_000
    x = torch.rand(2, 3, 16, 16)
    modules = dict(model.named_modules())
    assert model.equivision_layers[-1] == "logits"
    assert all(name in modules for name in model.equivision_layers)
    seen = {}
    hook = model.logits.register_forward_hook(lambda m, i, o: seen.setdefault("logits", o))
    out = model(x)
    hook.remove()
    assert out.shape == (2, 5, 16, 16) and seen["logits"].shape == (2, 5, 8, 8)
    assert create_model("segmenter", skip=False, width=4)(x).shape == (2, 5, 16, 16)
    assert model(torch.rand(1, 3, 5, 7)).shape == (1, 5, 5, 7)  # e.g. a defense's resized view
    with pytest.raises(ValueError, match="at least 2x2"):
        model(torch.rand(1, 3, 1, 8))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.rand(1, 1, 16, 16))
