"""Tests of the inference-time defenses (purifiers) and the Resize transform."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from equivision.data import ImageDataset
from equivision.models import create_model
from equivision.robust.defenses import (
    EquivarianceDefense,
    InvarianceDefense,
    RandomNoiseDefense,
    default_transforms,
    equivariance_score,
)
from equivision.robust.heads import (
    ContrastiveDefense,
    ContrastiveHead,
    RotationDefense,
    RotationHead,
    contrastive_agreement,
    rotation_loss,
    train_contrastive_head,
    train_rotation_head,
)
from equivision.robust.purify import noise_std
from equivision.robust.views import FeatureExtractor, align_view
from equivision.transforms import ColorJitter, Resize, Rotation, hflip

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.05
TF = [Resize(0.5), Resize(1.5), ColorJitter(brightness=0.1, contrast=1.2), hflip(),
      Rotation(-15.0), Rotation(15.0)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cnn-small", in_channels=1, num_classes=5, width=4).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 12, 12, generator=g)
    x[0, :, :2] = 1.0  # values at the box edges
    x[1, :, :2] = 0.0
    return x


def _defense(model: nn.Module, **kw) -> EquivarianceDefense:
    settings = dict(eps_v=EPS, steps=3, noise=0.5, transforms=TF,
                    feature_layer="features.relu2", seed=0)
    settings.update(kw)
    return EquivarianceDefense(model, **settings)


# ----------------------------------------------------------------------------- purify


def test_purify_stays_in_box_and_ball(model, images):
    out = _defense(model, eta=EPS).purify(images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().max() <= EPS + 1e-6
    assert (out - images).abs().max() > EPS / 2  # it moved


@settings(max_examples=8, deadline=None)
@given(eps=st.floats(1e-3, 0.5), eta=st.floats(1e-3, 1.0), steps=st.integers(1, 3),
       update=st.sampled_from(["sign", "l2"]))
def test_purify_bounds_property(eps, eta, steps, update):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh())
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    d = EquivarianceDefense(lin, eps_v=eps, eta=eta, steps=steps, noise=1.0, seed=0,
                            transforms=[hflip(), Resize(0.5)], feature_layer="1", update=update)
    out = d.purify(x)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= eps + 1e-6


def test_zero_steps_is_identity(model, images):
    out = _defense(model, steps=0).purify(images)
    assert torch.equal(out, images)


def test_same_seed_same_output_and_generator(model, images):
    a = _defense(model).purify(images)
    b = _defense(model).purify(images)
    c = _defense(model, seed=5).purify(images)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = _defense(model, seed=None)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(d.purify(images, generator=g1), d.purify(images, generator=g2))
    assert d.randomized and not _defense(model, noise=0.0).randomized


@pytest.mark.parametrize("layer,pairing,max_batch", [
    ("features.relu2", "identity", None), ("logits", "pairs", 6),
    ("features.relu1", "pairs", "auto"),
])
def test_batched_equals_loop(model, images, layer, pairing, max_batch):
    # logits are vectors: the equivariance defense takes them only when told (its loss is
    # then the invariance loss)
    kw = dict(feature_layer=layer, pairing=pairing, allow_invariance=layer == "logits")
    a = _defense(model, max_batch=max_batch, **kw).purify(images)
    b = _defense(model, batched=False, **kw).purify(images)
    assert (a - b).abs().max() <= 1e-6
    la = _defense(model, max_batch=max_batch, **kw).equivariance_loss(images)
    lb = _defense(model, batched=False, **kw).equivariance_loss(images)
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)


def test_image_result_independent_of_batch(model, images):
    """Per-image gradient normalization; the released batch-wide norm couples images."""
    other = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(9))
    batch = torch.cat([images[:1], other])
    ours = _defense(model, noise=0.0, update="l2")
    assert torch.allclose(ours.purify(images[:1]), ours.purify(batch)[:1], atol=1e-6)
    released = _defense(model, noise=0.0, update="l2", grad_norm="batch")
    assert not torch.allclose(released.purify(images[:1]), released.purify(batch)[:1], atol=1e-4)


def test_reference_code_preset(model):
    d = EquivarianceDefense.reference_code(model, eps_v=EPS, steps=2, transforms=TF)
    assert (d.eta, d.grad_norm, d.pairing, d.feature_layer) == (1.0, "batch", "pairs", "logits")
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    out = d.purify(x)
    # eta = 1 >> eps_v: every changed pixel ends on the ball's surface or the box
    moved = (out - x).abs()
    on_edge = (moved - EPS).abs() < 1e-6
    at_box = (out == 0) | (out == 1)
    assert bool((on_edge | at_box | (moved == 0)).all())


def test_differentiable_flag(model, images):
    x = images.clone().requires_grad_(True)
    for update in ("sign", "l2"):
        d = _defense(model, update=update, steps=2)
        out = d.purify(x, differentiable=True)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.abs().sum() > 0
    out = _defense(model, steps=2).purify(x)
    assert not out.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_l2_differentiable_has_second_order_path(model, images):
    """With update="l2" the unrolled gradient differs from the identity (BPDA)."""
    x = images.clone().requires_grad_(True)
    d = _defense(model, update="l2", noise=0.0, steps=1, eta=1e-3, eps_v=0.5)
    (grad,) = torch.autograd.grad(d.purify(x, differentiable=True).sum(), x)
    interior = (images > 0.05) & (images < 0.95)
    assert (grad[interior] - 1).abs().max() > 1e-4


def test_loss_decreases_over_steps(model, images):
    d = _defense(model, noise=0.0, steps=5)
    before = d.equivariance_loss(images)
    after = d.equivariance_loss(d.purify(images))
    assert before.shape == (3,)
    assert bool((after < before).all())


def test_logits_name_prefers_a_logits_submodule(images):
    torch.manual_seed(0)
    seg = create_model("segmenter", in_channels=1, num_classes=3, width=2).eval()
    x = torch.rand(2, 1, 16, 16)
    pre = FeatureExtractor(seg, "logits")(x)
    assert pre.shape == (2, 3, 8, 8)  # before upsampling
    assert FeatureExtractor(seg, "output")(x).shape == (2, 3, 16, 16)
    d = EquivarianceDefense(seg, eps_v=EPS, steps=2, transforms=default_transforms(1, 4))
    out = d.purify(x)
    assert out.shape == x.shape and (out - x).abs().max() <= EPS + 1e-6


def test_model_stays_eval(model):
    d = _defense(model)
    d.train()
    assert d.training and not model.training


def test_noise_schedule_anneals_to_zero():
    stds = [noise_std(1.0, t, 4) for t in range(4)]
    assert stds == [0.75, 0.5, 0.25, 0.0]


# ----------------------------------------------------------------------------- score


class _FlipInvariant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.body(x.flip(-1))


def _flip_equivariant_conv() -> nn.Module:
    conv = nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return nn.Sequential(conv, nn.ReLU())


def test_score_is_one_for_exact_flip_equivariance(images):
    torch.manual_seed(0)
    for pairing in ("identity", "pairs"):
        s = equivariance_score(_FlipInvariant(), images, [hflip(), hflip()], "logits",
                               pairing=pairing)
        torch.testing.assert_close(s, torch.ones(3), atol=1e-6, rtol=0)
    s = equivariance_score(_flip_equivariant_conv(), images, [hflip()], feature_layer="1")
    torch.testing.assert_close(s, torch.ones(3), atol=1e-6, rtol=0)
    # a rotation by 15 degrees is not a symmetry of this conv: score below 1
    s = equivariance_score(_flip_equivariant_conv(), images, [Rotation(15.0)], feature_layer="1")
    assert bool((s < 0.999).all())


def test_score_is_minus_loss(model, images):
    d = _defense(model)
    torch.testing.assert_close(
        equivariance_score(model, images, TF, feature_layer="features.relu2"),
        -d.equivariance_loss(images).detach(), atol=1e-6, rtol=0)


def test_resize_views_are_aligned_to_reference_size():
    """With F = identity the score of a resize view is cos(resize^-1(resize x), x)."""
    ident = nn.Sequential(nn.Conv2d(1, 1, 1))
    with torch.no_grad():
        ident[0].weight.fill_(1.0)
        ident[0].bias.zero_()
    x = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    s = equivariance_score(ident, x, [Resize(2.0)], feature_layer="0")
    back = Resize(0.5).apply_map(Resize(2.0)(x), size=(10, 10))
    expected = torch.nn.functional.cosine_similarity(back.flatten(1), x.flatten(1))
    torch.testing.assert_close(s, expected, atol=1e-6, rtol=0)
    assert bool((s < 1 - 1e-4).all())  # bilinear up + down is a blur, not the identity


# ----------------------------------------------------------------------------- errors


def test_unknown_layer_lists_names(model):
    with pytest.raises(ValueError, match=r"available: output, logits, features.*features\.relu2"):
        EquivarianceDefense(model, feature_layer="nope")


@pytest.mark.parametrize("kw,match", [
    (dict(eps_v=0.0), "eps_v"), (dict(eps_v=-1.0), "eps_v"), (dict(eps_v=2.0), "eps_v"),
    (dict(eps_v=float("nan")), "eps_v"), (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"),
    (dict(eta=0.0), "eta"), (dict(noise=-0.1), "noise"), (dict(pairing="all"), "pairing"),
    (dict(grad_norm="global"), "grad_norm"), (dict(update="adam"), "update"),
    (dict(max_batch=0), "max_batch"),
])
def test_bad_settings(model, kw, match):
    with pytest.raises(ValueError, match=match):
        EquivarianceDefense(model, **kw)


def test_bad_images(model, images):
    d = _defense(model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d.purify(images * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d.equivariance_loss(images - 0.5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        d.purify(images[0])
    with pytest.raises(TypeError, match="floating"):
        d.purify((images * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="Transform"):
        EquivarianceDefense(model, transforms=[42])


# ----------------------------------------------------------------------------- baselines


def test_default_transforms_follow_the_paper():
    gs = default_transforms(3)
    assert len(gs) == 8
    assert sorted(g.factor for g in gs if isinstance(g, Resize)) == [0.3, 0.6, 1.4, 2.0]
    assert sum(isinstance(g, ColorJitter) for g in gs) == 1
    assert hflip() in gs
    angles = [g.angle for g in gs if isinstance(g, Rotation)]
    assert len(angles) == 2 and all(abs(a) <= 15 for a in angles)
    assert all(g.saturation == 1.0 for g in default_transforms(1) if isinstance(g, ColorJitter))


def test_random_noise_defense(model, images):
    d = RandomNoiseDefense(model, eps_v=EPS, seed=0)
    a, b = d.purify(images), d.purify(images)
    assert d.randomized and torch.equal(a, b)
    assert (a - images).abs().max() <= EPS + 1e-6 and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, images)
    g = RandomNoiseDefense(model, eps_v=EPS, kind="gaussian").purify(images)
    assert (g - images).abs().max() <= EPS + 1e-6
    x = images.clone().requires_grad_(True)
    loss = d.equivariance_loss(x)
    assert torch.equal(loss.detach(), torch.zeros(3))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="kind"):
        RandomNoiseDefense(model, kind="salt")


def test_invariance_defense_pools(model, images):
    inv = InvarianceDefense(model, eps_v=EPS, steps=2, transforms=TF,
                            feature_layer="features.relu2", noise=0.0)
    equi = _defense(model, noise=0.0)
    assert not torch.allclose(inv.equivariance_loss(images), equi.equivariance_loss(images))
    out = inv.purify(images)
    assert (out - images).abs().max() <= EPS + 1e-6
    # pooled features of a flip-invariant toy agree exactly under a flip
    pooled = InvarianceDefense(_flip_equivariant_conv(), transforms=[hflip()], feature_layer="1")
    torch.testing.assert_close(pooled.equivariance_loss(images), -torch.ones(3), atol=1e-6,
                               rtol=0)


def _oriented_set(n: int = 32, size: int = 8) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    x[:, :, :2] += 0.7  # a bright top edge makes the rotation predictable
    return ImageDataset(x, torch.zeros(n, dtype=torch.long), ["a"])


def test_rotation_head_trains_and_defends(model, tmp_path):
    data = _oriented_set()
    x = data.images[:8]
    extractor = FeatureExtractor(model, "features.relu2")
    torch.manual_seed(0)
    fresh = RotationHead(4)
    before = rotation_loss(extractor, fresh, x).mean()
    head = train_rotation_head(model, "features.relu2", data, epochs=10, lr=0.05, batch_size=32)
    after = rotation_loss(extractor, head, x).mean()
    assert after < before - 0.15
    assert head.history["train_loss"][-1] < head.history["train_loss"][0]
    assert all(p.grad is None for p in model.parameters())
    torch.save(head.state_dict(), tmp_path / "rot.pt")
    copy = RotationHead(**head.config)
    copy.load_state_dict(torch.load(tmp_path / "rot.pt", weights_only=True))
    torch.testing.assert_close(rotation_loss(extractor, copy, x), rotation_loss(extractor, head, x))
    d = RotationDefense(model, head, "features.relu2", eps_v=EPS, steps=3, noise=0.0)
    out = d.purify(x)
    assert (out - x).abs().max() <= EPS + 1e-6
    assert bool((d.equivariance_loss(out) <= d.equivariance_loss(x) + 1e-6).all())
    with pytest.raises(TypeError, match="RotationHead"):
        RotationDefense(model, ContrastiveHead(4), "features.relu2")


def test_contrastive_head_trains_and_defends(model, tmp_path):
    data = _oriented_set()
    x = data.images[:8]
    head = train_contrastive_head(model, "features.relu2", data, epochs=4, lr=0.02,
                                  batch_size=16, crop=1)
    assert head.history[-1] < head.history[0]
    torch.save(head.state_dict(), tmp_path / "con.pt")
    copy = ContrastiveHead(**head.config)
    copy.load_state_dict(torch.load(tmp_path / "con.pt", weights_only=True))
    extractor = FeatureExtractor(model, "features.relu2")
    views = [hflip(), Rotation(10.0)]
    torch.testing.assert_close(contrastive_agreement(extractor, copy, x, views),
                               contrastive_agreement(extractor, head, x, views))
    d = ContrastiveDefense(model, head, "features.relu2", transforms=views, eps_v=EPS, steps=3,
                           noise=0.0)
    out = d.purify(x)
    assert (out - x).abs().max() <= EPS + 1e-6
    assert bool((d.equivariance_loss(out) <= d.equivariance_loss(x) + 1e-6).all())


# ----------------------------------------------------------------------------- Resize


def test_resize_sizes_and_inverse():
    x = torch.rand(2, 3, 10, 7)
    y = Resize(0.5).apply_image(x)
    assert y.shape == (2, 3, 5, 4)  # 3.5 rounds up
    assert Resize(2.0)(x).shape == (2, 3, 20, 14)
    assert Resize(0.5).inverse() == Resize(2.0)
    assert not Resize(0.5).exact and Resize(2.0).name == "resize(2)"
    assert torch.equal(Resize(1.0)(x), x)
    flat = torch.full((1, 1, 9, 9), 0.25)  # interpolation keeps constant images
    torch.testing.assert_close(Resize(0.3)(flat), torch.full((1, 1, 3, 3), 0.25))
    assert Resize(0.3).valid_mask((10, 10)).shape == (3, 3)
    assert Resize(0.3, multiple=4)(torch.rand(1, 1, 32, 36)).shape == (1, 1, 8, 12)
    assert Resize(0.1, multiple=4)(torch.rand(1, 1, 8, 8)).shape == (1, 1, 4, 4)


def test_resize_map_action_takes_target_size():
    f = torch.rand(1, 4, 6, 6)
    assert Resize(0.5).apply_map(f, stride=4).shape == (1, 4, 3, 3)
    assert Resize(0.5).apply_map(f, stride=4, size=(4, 3)).shape == (1, 4, 4, 3)
    group = torch.rand(1, 2, 4, 6, 6)  # (B, C, G, h, w): spatial axes are resized
    assert Resize(2.0).apply_map(group).shape == (1, 2, 4, 12, 12)
    # align_view undoes a resize onto the reference map size
    undone = align_view(Resize(2.0), torch.rand(1, 4, 13, 11), (6, 5), (24, 20))
    assert undone.shape == (1, 4, 6, 5)


def test_resize_is_differentiable_and_validates():
    x = torch.rand(1, 1, 6, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(Resize(1.5)(x).sum(), x)
    assert grad.abs().sum() > 0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="factor"):
            Resize(bad)
    with pytest.raises(TypeError, match="number"):
        Resize("2")
    with pytest.raises(ValueError, match="mode"):
        Resize(2.0, mode="area")


def test_equivariance_defense_refuses_vector_features():
    """On classifier logits every transformation acts trivially: the loss would be the
    invariance defense's, which is an error unless asked for (bug 5 of issue 14: it was a
    warning)."""
    import warnings

    from equivision.models import create_model
    from equivision.robust import EquivarianceDefense

    torch.manual_seed(0)
    model = create_model("cnn-small", in_channels=1, num_classes=3, width=4).eval()
    x = torch.rand(2, 1, 12, 12)
    with pytest.raises(ValueError, match="gives vectors .* allow_invariance=True"):
        EquivarianceDefense(model, steps=1, feature_layer="logits").purify(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EquivarianceDefense(model, steps=1, feature_layer="logits",
                            allow_invariance=True).purify(x)
        EquivarianceDefense(model, steps=1, feature_layer="features.relu3").purify(x)
        InvarianceDefense(model, steps=1, feature_layer="logits").purify(x)


class _Identity(nn.Module):
    """Identity features: exactly equivariant (up to interpolation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _smooth_images(n: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    coarse = torch.rand(n, 3, 6, 6, generator=g) + 0.5
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                     align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("pairing", ["identity", "pairs"])
def test_identity_features_score_one_under_rotation_views(pairing):
    """Only positions valid in both views count: the zero corners do not."""
    x = _smooth_images()
    gs = [Rotation(15.0), Rotation(-15.0), hflip()]
    score = equivariance_score(_Identity(), x, gs, feature_layer="output", pairing=pairing)
    assert bool((score > 0.999).all()), score


def test_rotation_view_corners_do_not_drive_the_purifier():
    x = _smooth_images(2).requires_grad_(True)
    defense = EquivarianceDefense(_Identity(), transforms=[Rotation(15.0)],
                                  feature_layer="output", batched=False)
    (g,) = torch.autograd.grad(defense._loss(x).sum(), x)
    corner = g[..., :3, :3].abs().mean()
    centre = g[..., 12:20, 12:20].abs().mean()
    assert corner <= centre + 1e-12
    batched = EquivarianceDefense(_Identity(), transforms=[Rotation(15.0)],
                                  feature_layer="output", batched=True)
    assert torch.allclose(batched._loss(x), defense._loss(x), atol=1e-6)
