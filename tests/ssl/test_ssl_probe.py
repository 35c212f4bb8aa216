"""Probes of frozen SSL encoders, equivariance scores and generated corruptions."""

from __future__ import annotations

import json

import pytest
import torch

from equivision.data import ImageDataset
from equivision.ssl import SSLViT
from equivision.ssl.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    corruption_accuracy,
)
from equivision.ssl.probe import (
    PROBES,
    equivariance_scores,
    extract_features,
    fit_images,
    knn_probe,
    linear_probe,
    mlp_probe,
    probe_baselines,
    run_probes,
    transformation_prediction,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, cls_layer=1)


def encoder(exact: bool = False, seed: int = 0) -> SSLViT:
    """A tiny SSLViT; ``exact=True`` makes every token map exactly D4-equivariant: no
    positional embedding and a patch embedding that sums each patch (rotation-invariant
    within the patch), so rotating the image only permutes the tokens."""
    torch.manual_seed(seed)
    enc = SSLViT(**ENC)
    if exact:
        with torch.no_grad():
            enc.pos_embed.zero_()
            w = enc.patch_embed.weight
            w.copy_(w.mean(dim=(2, 3), keepdim=True).expand_as(w))
    return enc.eval()


def dataset(n: int = 24, seed: int = 0, classes: int = 3) -> ImageDataset:
    """Images whose class sets the brightness of a random texture."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    tex = torch.rand(n, 3, 16, 16, generator=g)
    images = (0.15 + 0.3 * labels.float()[:, None, None, None] + 0.2 * tex).clamp(0, 1)
    return ImageDataset(images, labels, [str(k) for k in range(classes)])


def test_knn_matches_a_hand_computed_weighted_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    # k=2: neighbours 0 (label 0) and 1 (label 1); label 0 is more similar -> wins
    assert knn_probe(train, labels, test, torch.tensor([0]), k=2)["top1"] == 1.0
    # k=3 with a huge temperature: votes ~ counts, so label 1 (two votes) wins
    assert knn_probe(train, labels, test, torch.tensor([0]), k=3, temperature=100.0)[
        "top1"] == 0.0
    with pytest.raises(ValueError, match="temperature"):
        knn_probe(train, labels, test, torch.tensor([0]), temperature=0.0)


def test_linear_and_mlp_probes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    xor = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    lin = linear_probe(x[:300], xor[:300], x[300:], xor[300:], steps=200)
    mlp = mlp_probe(x[:300], xor[:300], x[300:], xor[300:], hidden=32, steps=300, lr=1e-2)
    assert lin["top1"] < 0.75 < 0.9 < mlp["top1"]  # XOR needs the hidden layers
    sep = (x[:, 0] > 0).long()
    assert linear_probe(x[:300], sep[:300], x[300:], sep[300:], steps=200)["top1"] > 0.95
    with pytest.raises(ValueError, match="same F"):
        linear_probe(x, sep, x[:, :1], sep)


def test_fit_images_pads_resizes_and_converts_channels():
    digits = torch.rand(2, 1, 28, 28)
    out = fit_images(digits, 32, 3)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:, 1, 2:30, 2:30], digits[:, 0]) and out[:, :, :2].abs().sum() == 0
    assert fit_images(digits, 16, 3).shape == (2, 3, 16, 16)
    assert fit_images(torch.rand(2, 3, 8, 8), 8, 1).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        fit_images(torch.rand(2, 2, 8, 8), 8, 3)


def test_features_and_equivariance_scores():
    data = dataset(8)
    feats, labels = extract_features(encoder(), data, n_last=4)
    assert feats.shape == (8, 2 * 32)  # only depth - cls_layer = 2 blocks carry [CLS]
    assert torch.equal(labels, data.labels)
    exact = equivariance_scores(encoder(exact=True), data, max_images=8)
    assert exact["layers"] == [1, 2, 3]
    for name in ("rot90", "hflip"):
        assert exact["scores"][name] == pytest.approx([1.0] * 3, abs=1e-5)
        assert exact["cls"][name] == pytest.approx(1.0, abs=1e-5)
    plain = equivariance_scores(encoder(), data, max_images=8)
    assert max(plain["scores"]["rot90"]) < 0.999  # learned positions break equivariance
    assert set(plain["scores"]) == {"rot90", "hflip", "scale"}


def test_transformation_prediction_is_at_chance_for_invariant_pooled_tokens():
    train, test = dataset(48, seed=1), dataset(48, seed=2)
    out = transformation_prediction(encoder(exact=True), train, test, steps=100)
    assert out["layers"] == [1, 2, 3]
    # pooled tokens of an exactly equivariant map are invariant: nothing to predict
    assert max(out["rotation"]["per_layer"]) < 0.5 and max(out["flip"]["per_layer"]) < 0.7
    with pytest.raises(ValueError, match="unknown task"):
        transformation_prediction(encoder(), train, test, tasks=("shear",))


def test_corruptions_are_seeded_bounded_and_grow_with_severity():
    x = dataset(6).images
    for name in CORRUPTIONS:
        outs = [corrupt(x, name, s) for s in SEVERITIES]
        assert all(o.shape == x.shape and 0 <= o.min() and o.max() <= 1 for o in outs)
        assert torch.equal(outs[0], corrupt(x, name, 1))
        assert (outs[-1] - x).abs().mean() > (outs[0] - x).abs().mean(), name
    assert not torch.equal(corrupt(x, "gaussian_noise", 3, seed=1),
                           corrupt(x, "gaussian_noise", 3, seed=2))
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)


def test_corruption_accuracy_of_a_brightness_classifier():
    data = dataset(12, classes=2)
    centers = torch.tensor([0.25, 0.55])

    def classify(x):
        return -(x.mean(dim=(1, 2, 3))[:, None] - centers).abs()

    out = corruption_accuracy(classify, data, ("contrast", "translation"), (1, 5))
    assert out["clean"] == 1.0
    assert out["per_corruption"]["contrast"] == {"1": 1.0, "5": 1.0}  # keeps the mean
    assert out["mean_appearance"] == 1.0 and out["mean_all"] is not None
    json.dumps(out)


def test_run_probes_all_is_json_serializable():
    train, test = dataset(24, seed=1), dataset(12, seed=2)
    small = {"linear": {"steps": 20}, "mlp": {"steps": 20, "hidden": 16},
             "transform_prediction": {"steps": 20},
             "corruptions": {"steps": 20, "corruptions": ["rotation"], "severities": [1]},
             "equivariance": {"max_images": 4}}
    out = run_probes(encoder(), train, test, which=PROBES, options=small)
    assert set(out) == set(PROBES)
    text = json.dumps(out)
    assert json.loads(text)["knn"]["top1"] == out["knn"]["top1"]
    assert 0.0 <= out["linear"]["top1"] <= 1.0
    with pytest.raises(ValueError, match="unknown probe"):
        run_probes(encoder(), train, test, which=["segmentation"])


def test_probes_leave_the_global_rng_and_modes_alone():
    enc = encoder().train()
    state = torch.get_rng_state()
    linear_probe(*extract_features(enc, dataset(6)), *extract_features(enc, dataset(6)),
                 steps=5)
    assert torch.equal(state, torch.get_rng_state()) and enc.training


def test_baselines_are_raw_pixels_and_a_seeded_random_twin():
    from equivision.ssl.baselines import pixel_features, random_init_like

    trained = encoder(seed=3)
    with torch.no_grad():
        trained.pos_embed.add_(1.0)  # as if trained: not what a fresh init gives
    twin = random_init_like(trained, seed=0)
    assert twin.config() == trained.config() and not twin.training
    assert not torch.equal(twin.pos_embed, trained.pos_embed)
    fresh = encoder(seed=0)  # the same seed gives the same untrained weights
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(),
                                                 fresh.state_dict().values()))
    state = torch.get_rng_state()
    train, test = dataset(24, seed=1), dataset(12, seed=2)
    out = probe_baselines(trained, train, test, options={"linear": {"steps": 20},
                                                         "equivariance": {"max_images": 4}})
    assert torch.equal(torch.get_rng_state(), state)
    ftr = pixel_features(train.images)
    assert ftr.shape == (24, 3 * 16 * 16)
    pixels = (ftr, train.labels, pixel_features(test.images), test.labels)
    assert out["raw_pixels"]["knn"] == knn_probe(*pixels)
    assert out["raw_pixels"]["linear"]["top1"] == linear_probe(*pixels, steps=20)["top1"]
    twin_feats = (*extract_features(twin, train), *extract_features(twin, test))
    assert out["random_init"]["knn"] == knn_probe(*twin_feats)
    assert set(out["random_init"]["equivariance"]["centred"]) == {"rot90", "hflip", "scale"}
    full = run_probes(trained, train, test, which=["knn"], baselines=True)
    assert full["baselines"]["random_init"]["knn"] == out["random_init"]["knn"]
    json.dumps(full)
