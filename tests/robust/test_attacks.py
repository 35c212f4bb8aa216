"""Tests of equivision.robust.attacks, metrics and wrappers on tiny hand-built models."""

import math

import pytest
import torch
from torch import Tensor, nn

from equivision.metrics import (
    ConfusionMeter,
    accuracy,
    check_output_labels,
    confusion_matrix,
    is_segmentation,
    miou,
    per_image_miou,
    per_image_score,
    pixel_accuracy,
    task_loss,
)
from equivision.robust.attacks import (
    BIM,
    BPDA,
    CW,
    FGSM,
    IFGSM,
    MIM,
    PGD,
    Adaptive,
    FullGradient,
    Houdini,
    IterativeAttack,
    attack_objective,
    sweep_lambda,
)
from equivision.robust.wrappers import Normalize

pytestmark = pytest.mark.usefixtures("one_thread")

ATTACKS = [FGSM, IFGSM, PGD, MIM, CW, Houdini]


def linear_classifier(seed: int = 0, k: int = 3, d: int = 2 * 6 * 6) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    return model.eval()


def pixel_segmenter(seed: int = 0, k: int = 3) -> nn.Module:
    """A 1x1 convolution: every pixel is classified on its own."""
    torch.manual_seed(seed)
    return nn.Conv2d(2, k, 1).eval()


def conv_segmenter(seed: int = 0, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, k, 3, padding=1))


def images(n: int = 6, seed: int = 1, size: int = 6) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, size, size, generator=g)


def own_labels(model: nn.Module, x: Tensor) -> Tensor:
    """Labels equal to the clean predictions (clean accuracy 1)."""
    with torch.no_grad():
        return model(x).argmax(1)


def in_ball(adv: Tensor, x: Tensor, eps: float, norm: str) -> bool:
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return bool((size <= eps + 1e-6).all())


# ---------------------------------------------------------------- attacks, classification


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("cls", ATTACKS)
def test_box_and_ball(cls, norm):
    model, x = linear_classifier(), images()
    eps = 0.1 if norm == "linf" else 0.5
    adv = cls(model, eps, steps=3, norm=norm)(x, own_labels(model, x))
    assert adv.shape == x.shape and not adv.requires_grad
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert in_ball(adv, x, eps, norm)
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_segmentation_box_and_ball(norm):
    model, x = conv_segmenter(), images()
    y = own_labels(model, x)
    eps = 0.05 if norm == "linf" else 0.3
    for cls in ATTACKS:
        adv = cls(model, eps, steps=2, norm=norm)(x, y)
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1 and in_ball(adv, x, eps, norm)


def test_fgsm_moves_loss_up():
    model, x = linear_classifier(), images()
    y = own_labels(model, x)
    adv = FGSM(model, 0.03)(x, y)
    with torch.no_grad():
        assert bool((task_loss(model(adv), y) > task_loss(model(x), y)).all())


@pytest.mark.parametrize("cls", [PGD, MIM, CW, Houdini])
def test_large_eps_breaks_the_model(cls):
    model, x = linear_classifier(), images(16)
    y = own_labels(model, x)
    adv = cls(model, 0.5, steps=10)(x, y)
    with torch.no_grad():
        assert accuracy(model(adv), y) == 0.0


def test_segmentation_pgd_drives_miou_down():
    model, x = conv_segmenter(), images(4, size=8)
    y = own_labels(model, x)
    for cls in (PGD, Houdini, CW):
        adv = cls(model, 0.5, steps=10)(x, y)
        with torch.no_grad():
            pred = model(adv).argmax(1)
        assert pixel_accuracy(pred, y) < 0.25, cls.__name__  # 1.0 before the attack
        assert float(per_image_miou(pred, y, 3).mean()) < 0.1, cls.__name__


def test_restarts_never_worse_and_seeds_reproduce():
    model, x = linear_classifier(), images(32)
    y = own_labels(model, x)
    kw = dict(steps=2, alpha=0.01)
    one = PGD(model, 0.02, seed=3, **kw)(x, y)
    again = PGD(model, 0.02, seed=3, **kw)(x, y)
    other = PGD(model, 0.02, seed=4, **kw)(x, y)
    assert torch.equal(one, again) and not torch.equal(one, other)
    many = PGD(model, 0.02, seed=3, restarts=4, **kw)(x, y)
    with torch.no_grad():
        s_one, l_one = per_image_score(model(one), y), task_loss(model(one), y)
        s_many, l_many = per_image_score(model(many), y), task_loss(model(many), y)
    assert bool((s_many <= s_one).all())
    tie = s_many == s_one  # then the restart with the higher loss is kept
    assert bool((l_many[tie] >= l_one[tie] - 1e-6).all()) and float(l_many.sum()) > float(
        l_one.sum())


def test_targeted_reaches_targets():
    model, x = linear_classifier(), images(8)
    y = own_labels(model, x)
    target = (y + 1) % 3
    for cls in (PGD, CW, Houdini, MIM):
        adv = cls(model, 0.5, steps=20, targeted=True)(x, target)
        with torch.no_grad():
            assert torch.equal(model(adv).argmax(1), target), cls.__name__


def test_model_state_untouched():
    model, x = linear_classifier(), images()
    y = own_labels(model, x)
    model.train()
    PGD(model, 0.1, steps=2)(x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():  # attacks switch gradients on for themselves
        adv = CW(model, 0.1, steps=2)(x, y)
    assert not torch.equal(adv, x)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_bim_is_ifgsm_without_random_start():
    model, x = linear_classifier(), images()
    y = own_labels(model, x)
    assert BIM is IFGSM
    a = IFGSM(model, 0.05, steps=3, alpha=0.02, seed=0)(x, y)
    b = PGD(model, 0.05, steps=3, alpha=0.02, random_start=False, seed=9)(x, y)
    assert torch.equal(a, b)


def test_mim_momentum_changes_steps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = images()
    y = own_labels(model, x)
    a = MIM(model, 0.2, steps=5, alpha=0.02)(x, y)
    b = MIM(model, 0.2, steps=5, alpha=0.02, decay=0.0)(x, y)
    assert not torch.equal(a, b) and in_ball(a, x, 0.2, "linf")


# ---------------------------------------------------------------- segmentation, ignore_index


def test_ignored_pixels_do_not_affect_the_gradient():
    model, x = pixel_segmenter(), images(2, size=5)
    y = own_labels(model, x)
    y[:, :2] = 255
    for loss in ("ce", "cw", "houdini"):
        xr = x.clone().requires_grad_(True)
        attack_objective(model(xr), y, loss).sum().backward()
        g = xr.grad
        assert bool((g[:, :, :2] == 0).all()), loss
        assert bool((g[:, :, 2:].abs().sum((1,)) > 0).all()), loss
        # changing what lies under the ignored pixels changes nothing elsewhere
        y2 = y.clone()
        y2[:, :2] = 255
        x2 = x.clone()
        x2[:, :, :2] = 0.5
        x2.requires_grad_(True)
        attack_objective(model(x2), y2, loss).sum().backward()
        assert torch.allclose(x2.grad[:, :, 2:], g[:, :, 2:]), loss
    adv = IFGSM(model, 0.1, steps=3)(x, y)
    assert torch.equal(adv[:, :, :2], x[:, :, :2]) and not torch.equal(adv, x)


def test_houdini_matches_its_definition():
    out = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    expect = torch.tensor([1 - phi(2.0 - 1.0), 1 - phi(0.0 - 3.0)])
    assert torch.allclose(attack_objective(out, y, "houdini"), expect)
    # segmentation: mean over valid pixels of the same per-pixel value
    seg = out.T.reshape(1, 3, 1, 2)
    assert torch.allclose(attack_objective(seg, y.view(1, 1, 2), "houdini"), expect.mean())
    assert torch.allclose(attack_objective(seg, torch.tensor([[[0, 255]]]), "houdini"),
                          expect[:1])
    cw = attack_objective(out, y, "cw", kappa=0.5)
    assert torch.allclose(cw, torch.tensor([-1.0, 0.5]))


# ---------------------------------------------------------------- metrics


def test_miou_hand_computed():
    pred = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    target = torch.tensor([[[0, 1, 1], [1, 2, 255]]])
    # class 0: tp 1, union 2 -> 0.5; class 1: tp 2, union 3 -> 2/3; class 2: tp 1, union 1 -> 1
    # class 3: absent from both -> excluded
    assert miou(pred, target, 4) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert per_image_miou(pred, target, 4).tolist() == pytest.approx([(0.5 + 2 / 3 + 1) / 3])
    assert pixel_accuracy(pred, target) == pytest.approx(4 / 5)
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[1, 0, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    two = torch.cat([pred, torch.zeros_like(pred)])
    t2 = torch.cat([target, torch.full_like(target, 255)])
    per = per_image_miou(two, t2, 4)
    assert per[0] == pytest.approx((0.5 + 2 / 3 + 1) / 3) and math.isnan(float(per[1]))


def test_confusion_meter_streams_and_sums():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (6, 4, 4), generator=g)
    y[0, 0] = 255
    whole, a, b = ConfusionMeter(3), ConfusionMeter(3), ConfusionMeter(3)
    whole.update(out, y)
    a.update(out[:2], y[:2])
    b.update(out[2:].argmax(1), y[2:])
    a.confusion += b.confusion  # what all_reduce(SUM) does across processes
    assert torch.equal(a.confusion, whole.confusion)
    assert whole.miou() == pytest.approx(miou(out.argmax(1), y, 3))
    assert whole.accuracy() == pytest.approx(pixel_accuracy(out.argmax(1), y))
    assert whole.total == 6 * 16 - 4
    cls = ConfusionMeter(3)
    logits = torch.eye(3)[[0, 1, 2, 0]]
    cls.update(logits, torch.tensor([0, 1, 1, 0]))
    assert cls.accuracy() == 0.75 and accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.75


def test_task_loss_and_kind():
    out = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    assert is_segmentation(out) and not is_segmentation(out[:, :, 0, 0])
    y[1] = 255
    loss = task_loss(out, y)
    assert loss.shape == (2,) and loss[1] == 0
    ref = nn.functional.cross_entropy(out[:1], y[:1])
    assert torch.allclose(loss[0], ref)


# ---------------------------------------------------------------- defenses


class ToyDefense(nn.Module):
    """purify: gradient steps on a mirror-symmetry loss, plus noise when randomized."""

    def __init__(self, model: nn.Module, randomized: bool = False, steps: int = 2,
                 eta: float = 0.5, sigma: float = 0.05) -> None:
        super().__init__()
        self.model, self.randomized = model, randomized
        self.steps, self.eta, self.sigma = steps, eta, sigma

    def equivariance_loss(self, x: Tensor) -> Tensor:
        return ((x - x.flip(-1)) ** 2).flatten(1).sum(1)

    def purify(self, x: Tensor, generator=None, differentiable: bool = False) -> Tensor:
        z = x if differentiable else x.detach()
        if self.randomized:
            z = z + self.sigma * torch.randn(z.shape, generator=generator, device=z.device)
        for _ in range(self.steps):
            with torch.enable_grad():
                zr = z if differentiable else z.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.equivariance_loss(zr).sum(), zr,
                                           create_graph=differentiable)
            z = zr - self.eta * g
        z = z.clamp(0, 1)
        return z if differentiable else z.detach()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.purify(x))


def _grad(atk: IterativeAttack, x: Tensor, y: Tensor) -> Tensor:
    return atk._gradient(x, y, restart=0, step=0, check=True)


def test_bpda_is_straight_through():
    model = linear_classifier()
    d = ToyDefense(model)
    x = images()
    y = own_labels(model, x)
    g = _grad(BPDA(d, 0.1), x, y)
    p = d.purify(x).requires_grad_(True)
    (ref,) = torch.autograd.grad(task_loss(model(p), y).sum(), p)
    assert torch.allclose(g, ref)


def test_full_gradient_goes_through_the_purifier():
    model = linear_classifier()
    d = ToyDefense(model)
    x = images()
    y = own_labels(model, x)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(task_loss(model(d.purify(xr, differentiable=True)), y).sum(),
                                 xr)
    g = _grad(FullGradient(d, 0.1), x, y)
    assert torch.allclose(g, ref, atol=1e-6)
    assert not torch.allclose(g, _grad(BPDA(d, 0.1), x, y), atol=1e-3)
    adv = FullGradient(d, 0.1, steps=3)(x, y)
    assert in_ball(adv, x, 0.1, "linf") and all(p.grad is None for p in model.parameters())


def test_eot_averages_draws_and_reproduces():
    model = conv_segmenter()
    d = ToyDefense(model, randomized=True, sigma=0.2)
    x = images(3)
    y = own_labels(model, x)
    one = _grad(BPDA(d, 0.1, seed=0), x, y)
    other = _grad(BPDA(d, 0.1, seed=1), x, y)
    eot = _grad(BPDA(d, 0.1, seed=0, eot_samples=4), x, y)
    assert not torch.allclose(one, other)
    assert not torch.allclose(eot, one) and torch.equal(
        eot, _grad(BPDA(d, 0.1, seed=0, eot_samples=4), x, y))
    atk = BPDA(d, 0.1, seed=0, eot_samples=4)
    draws = []
    for k in range(4):  # draw k of step 0 of restart 0 has its own seeded generator
        p = d.purify(x, generator=atk._generator(x.device, 0, 0, k)).requires_grad_(True)
        draws.append(torch.autograd.grad(task_loss(model(p), y).sum(), p)[0])
    assert torch.allclose(eot, torch.stack(draws).mean(0), atol=1e-6)
    assert torch.allclose(draws[0], one)
    a = FullGradient(d, 0.05, steps=2, eot_samples=2, seed=5)(x, y)
    b = FullGradient(d, 0.05, steps=2, eot_samples=2, seed=5)(x, y)
    assert torch.equal(a, b) and in_ball(a, x, 0.05, "linf")


def test_adaptive_term_has_gradient_on_the_perturbed_input():
    model = linear_classifier()
    d = ToyDefense(model)
    x = images()
    y = own_labels(model, x)
    g0 = _grad(Adaptive(d, 0.1, lambda_e=0.0), x, y)
    g1 = _grad(Adaptive(d, 0.1, lambda_e=2.0), x, y)
    xr = x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(d.equivariance_loss(xr).sum(), xr)
    assert float(ge.abs().sum()) > 0
    assert torch.allclose(g1 - g0, -2.0 * ge, atol=1e-5)
    # with a huge weight the attack makes the input more symmetric, not less
    adv = Adaptive(d, 0.1, lambda_e=1e3, steps=5)(x, y)
    assert bool((d.equivariance_loss(adv) < d.equivariance_loss(x)).all())


def test_sweep_lambda_keeps_the_worst_case():
    model = linear_classifier()
    d = ToyDefense(model)
    x = images(12)
    y = own_labels(model, x)
    res = sweep_lambda(d, x, y, lambdas=(0.0, 10.0), eps=0.05, steps=3)
    assert res.images.shape == x.shape and set(res.lambda_e.tolist()) <= {0.0, 10.0}
    for s in res.scores.values():
        assert bool((res.score <= s).all())
    check, _ = Adaptive(d, 0.05).score(res.images, y)
    assert torch.equal(check, res.score)


# ---------------------------------------------------------------- bad input and wrappers


def test_bad_input():
    model, x = linear_classifier(), images()
    y = own_labels(model, x)
    with pytest.raises(ValueError, match="eps"):
        PGD(model, 0.0)
    with pytest.raises(ValueError, match="eps"):
        PGD(model, -1)
    with pytest.raises(ValueError, match="norm"):
        PGD(model, 0.1, norm="l1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD(model, 0.1)(x * 2, y)
    with pytest.raises(ValueError, match="do not match"):
        PGD(model, 0.1)(x, y[:3])
    with pytest.raises(ValueError, match="do not match"):
        PGD(conv_segmenter(), 0.1)(x, y)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        PGD(model, 0.1)(x, y + 5)
    nan_model = nn.Sequential(model, nn.Threshold(1e9, float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        PGD(nan_model, 0.1)(x, y)
    with pytest.raises(ValueError, match="needs a defense"):
        BPDA(model, 0.1)
    with pytest.raises(ValueError, match="needs a defense"):
        PGD(model, 0.1, lambda_e=1.0)
    with pytest.raises(ValueError, match="integer tensor"):
        check_output_labels(torch.zeros(2, 3), torch.zeros(2))


def test_normalize_wrapper():
    inner = linear_classifier()
    mean, std = [0.5, 0.4], [0.2, 0.3]
    wrapped = Normalize(inner, mean, std)
    x = images()
    ref = inner((x - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1))
    assert torch.allclose(wrapped(x), ref)
    adv = PGD(wrapped, 0.05, steps=2)(x, own_labels(wrapped, x))
    assert in_ball(adv, x, 0.05, "linf")
    with pytest.raises(ValueError, match="std"):
        Normalize(inner, [0.5, 0.5], [0.2, 0.0])
    with pytest.raises(ValueError, match="one value per channel"):
        Normalize(inner, [0.5, 0.5], [0.2, 0.2, 0.2])


def test_houdini_gradient_survives_confident_models():
    """Margins of hundreds of logits: the erf-based probit gave exactly zero gradient."""
    torch.manual_seed(0)
    lin = nn.Linear(2 * 6 * 6, 3)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = images(8)
    with torch.no_grad():
        lin.weight.mul_(10000.0)
        y = model(x).argmax(1)
    margins = -attack_objective(model(x), y, "cw")
    assert bool((margins > 15).all())  # float32 erf: exactly 0 gradient beyond ~13
    for targeted, labels in ((False, y), (True, (y + 1) % 3)):
        xr = x.clone().requires_grad_(True)
        obj = attack_objective(model(xr), labels, "houdini", targeted=targeted)
        (g,) = torch.autograd.grad(obj.sum(), xr)
        assert bool((g.flatten(1).abs().sum(1) > 0).all()) and bool(torch.isfinite(g).all())
    adv = Houdini(model, 0.5, steps=10)(x, y)
    pgd = PGD(model, 0.5, steps=10)(x, y)
    assert accuracy(model(adv), y) <= accuracy(model(pgd), y) + 1e-9
    assert accuracy(model(adv), y) < 0.5


def test_houdini_segmentation_gradient_survives_confident_models():
    model = pixel_segmenter()
    with torch.no_grad():
        model.weight.mul_(500.0)
    x = images(2).requires_grad_(True)
    y = model(x).argmax(1)
    y[0, 0, 0] = 255
    obj = attack_objective(model(x), y, "houdini")
    (g,) = torch.autograd.grad(obj.sum(), x)
    assert bool((g.flatten(1).abs().sum(1) > 0).all()) and bool(torch.isfinite(g).all())


def train_mode_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cls", ATTACKS)
def test_attacks_leave_train_mode_model_exactly_as_found(cls):
    model = train_mode_net()
    model[3].eval()  # a submodule in its own mode must get it back
    before = state_of(model)
    modes = [m.training for m in model.modules()]
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    cls(model, 0.1, steps=2)(x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers bit-identical
    assert [m.training for m in model.modules()] == modes
    # eval mode: deterministic despite Dropout (same seed, same result)
    model2 = train_mode_net()
    assert torch.equal(cls(model2, 0.1, steps=2)(x, y), cls(model2, 0.1, steps=2)(x, y))


def test_eval_mode_false_runs_the_model_as_it_is():
    model = train_mode_net()
    before = state_of(model)
    PGD(model, 0.1, steps=2, eval_mode=False)(images(4), torch.tensor([0, 1, 2, 0]))
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])
    assert model.training


def test_sweep_lambda_scores_in_eval_mode():
    model = train_mode_net()
    before = state_of(model)

    class Tiny(nn.Module):
        randomized = False

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Tensor) -> Tensor:
            return self.model(x)

        def purify(self, x: Tensor, generator=None, differentiable=False) -> Tensor:
            return x

        def equivariance_loss(self, x: Tensor) -> Tensor:
            return (x ** 2).flatten(1).sum(1)

    sweep_lambda(Tiny(), images(4), torch.tensor([0, 1, 2, 0]), lambdas=(0.0, 1.0), steps=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
