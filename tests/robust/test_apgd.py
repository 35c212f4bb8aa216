"""APGD and APGD-T: losses, the step-size schedule, budget, determinism, segmentation."""

import math

import pytest
import torch
from conftest import accuracy, seg_batch, segmenter
from torch import nn

from equivision.metrics import per_image_miou
from equivision.robust.apgd import (
    APGD,
    APGDT,
    StepSizeSchedule,
    apgd_checkpoints,
    apgd_objective,
    dlr_loss,
    evaluating,
    keep_worst,
    segpgd_loss,
)
from equivision.robust.attacks import PGD
from equivision.robust.defenses import RandomNoiseDefense

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dlr_loss_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 4.0]])
    y = torch.tensor([0, 1])
    # sorted: [3, 1, .5, -1] and [4, 2, 1, 0]
    want = torch.tensor([-(3.0 - 1.0) / (3.0 - 0.5), -(2.0 - 4.0) / (4.0 - 1.0)])
    assert torch.allclose(dlr_loss(z, y), want)
    t = torch.tensor([2, 0])
    want_t = torch.tensor([-(3.0 - 0.5) / (3.0 - (0.5 - 1.0) / 2),
                           -(2.0 - 0.0) / (4.0 - (1.0 + 0.0) / 2)])
    assert torch.allclose(dlr_loss(z, y, t), want_t)


def test_dlr_needs_classes_and_is_shift_scale_invariant():
    z = torch.randn(5, 6)
    y = torch.randint(0, 6, (5,))
    assert torch.allclose(dlr_loss(3 * z + 7, y), dlr_loss(z, y), atol=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        dlr_loss(torch.randn(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least 4"):
        dlr_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))


def test_segmentation_losses_ignore_pixels():
    out = torch.randn(2, 4, 3, 3)
    labels = out.argmax(1)
    labels[0, 0, 0] = 255
    changed = out.clone()
    changed[0, :, 0, 0] = torch.tensor([9.0, -9.0, 3.0, 1.0])  # an ignored pixel
    for loss in ("ce", "dlr", "segpgd"):
        a = apgd_objective(out, labels, loss, progress=0.5)
        b = apgd_objective(changed, labels, loss, progress=0.5)
        assert a.shape == (2,) and torch.allclose(a, b), loss


def test_segpgd_weights_wrong_pixels_by_progress():
    out = torch.tensor([[[[2.0]], [[0.0]]], [[[0.0]], [[2.0]]]])  # (2, 2, 1, 1)
    labels = torch.zeros(2, 1, 1, dtype=torch.long)  # image 0 right, image 1 wrong
    ce = nn.functional.cross_entropy(out, labels, reduction="none").flatten(1).mean(1)
    for progress in (0.0, 0.5, 1.0):
        lam = progress / 2
        got = segpgd_loss(out, labels, progress)
        assert torch.allclose(got, ce * torch.tensor([1 - lam, lam]))


def test_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 5, 10, 37):
        w = apgd_checkpoints(n)
        assert w == sorted(set(w)) and 0 < w[0] and w[-1] <= n


def test_schedule_halves_on_oscillation_and_on_stall():
    schedule = StepSizeSchedule(100, torch.full((3,), 0.2))
    schedule.record(torch.zeros(3))
    # image 0 rises every step, image 1 at 10 of 22 steps (< 0.75 * 22), image 2 every step
    for step in range(1, 23):
        loss = torch.tensor([float(step), float(min(step, 10)), float(step)])
        schedule.record(loss)
    halved = schedule.checkpoint(22, torch.tensor([22.0, 10.0, 22.0]))
    assert halved.tolist() == [False, True, False]
    assert torch.allclose(schedule.eta, torch.tensor([0.2, 0.1, 0.2]))
    # next span (19 steps): image 0 keeps rising; image 2 rises often enough but its best
    # loss does not improve (and it was not halved last time): halved; image 1 was halved
    # last time and stalls without oscillating -> not halved by condition 2
    for step in range(23, 42):
        schedule.record(torch.tensor([float(step), 10.0 + (step % 2) * 1e-3 * step,
                                      float(step % 2)]))
    halved = schedule.checkpoint(41, torch.tensor([41.0, 10.05, 22.0]))
    assert halved.tolist() == [False, True, True]
    assert torch.allclose(schedule.eta, torch.tensor([0.2, 0.05, 0.1]))


def test_keep_worst_prefers_lower_score_then_higher_objective():
    x = torch.zeros(3, 1, 1, 1)
    best = keep_worst((x, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])),
                      (x + 1, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 5.0, 1.0])))
    assert best[0].flatten().tolist() == [1.0, 0.0, 1.0]
    assert best[1].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_in_ball_and_box_and_deterministic(trained, norm):
    model, x, y = trained
    eps = 0.15 if norm == "linf" else 1.0
    adv = APGD(model, eps, steps=10, norm=norm, seed=3)(x, y)
    again = APGD(model, eps, steps=10, norm=norm, seed=3)(x, y)
    assert torch.equal(adv, again)
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((size <= eps + 1e-5).all())
    assert accuracy(model, adv, y) < accuracy(model, x, y)


def test_apgd_at_least_as_strong_as_pgd(trained):
    model, x, y = trained
    for eps in (0.1, 0.15):
        apgd = accuracy(model, APGD(model, eps, steps=20, loss="ce")(x, y), y)
        pgd = accuracy(model, PGD(model, eps, steps=20)(x, y), y)
        assert apgd <= pgd


def test_apgd_restarts_keep_worst_case(trained):
    model, x, y = trained
    one = accuracy(model, APGD(model, 0.12, steps=5, restarts=1)(x, y), y)
    three = accuracy(model, APGD(model, 0.12, steps=5, restarts=3)(x, y), y)
    assert three <= one


def test_apgdt_targets_are_the_top_classes(trained):
    model, x, y = trained
    attack = APGDT(model, 0.15, steps=10, n_targets=3)
    with torch.no_grad():
        order = model(x).sort(1, descending=True).indices
    assert torch.equal(attack.targets(x)[:, 1], order[:, 1])
    assert torch.equal(attack.targets(x)[:, 3], order[:, 3])
    adv = attack(x, y)
    assert accuracy(model, adv, y) <= accuracy(model, APGD(model, 0.15, steps=10)(x, y), y) + 0.1
    assert (adv - x).abs().max() <= 0.15 + 1e-6


def test_apgdt_reaches_a_target_when_run_on_one():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.full((4, 1, 2, 2), 0.5)
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = APGDT(model, 0.5, steps=20, n_targets=1)
    target = attack.targets(x)[:, 1]
    adv = attack(x, y)
    with torch.no_grad():
        assert bool((model(adv).argmax(1) != y).all())
        assert float((model(adv).argmax(1) == target).float().mean()) >= 0.5


@pytest.mark.parametrize("loss", ["ce", "dlr", "segpgd"])
def test_apgd_segmentation_with_ignore_index(loss):
    model = segmenter()
    x, labels = seg_batch(model)
    adv = APGD(model, 0.1, steps=10, loss=loss)(x, labels)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        before = per_image_miou(model(x).argmax(1), labels, 4)
        after = per_image_miou(model(adv).argmax(1), labels, 4)
    assert bool((after <= before).all()) and float(after.mean()) < float(before.mean())


def test_apgdt_segmentation():
    model = segmenter()
    x, labels = seg_batch(model)
    adv = APGDT(model, 0.1, steps=5, n_targets=2)(x, labels)
    with torch.no_grad():
        after = per_image_miou(model(adv).argmax(1), labels, 4)
    assert float(after.mean()) < 1.0


def test_apgd_bad_settings():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="loss"):
        APGD(model, 0.1, loss="nope")
    with pytest.raises(ValueError, match="eps"):
        APGD(model, 0.0)
    with pytest.raises(ValueError, match="rho"):
        APGD(model, 0.1, rho=1.5)
    with pytest.raises(ValueError, match="n_targets"):
        APGDT(model, 0.1, n_targets=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        APGD(model, 0.1)(torch.full((1, 1, 1, 2), 2.0), torch.tensor([0]))


def test_apgd_with_a_randomized_defense_is_seeded():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 4)).eval()
    defense = RandomNoiseDefense(model)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    a = APGD(defense, 0.1, steps=4, through="bpda", eot_samples=2, seed=1)(x, y)
    b = APGD(defense, 0.1, steps=4, through="bpda", eot_samples=2, seed=1)(x, y)
    assert torch.equal(a, b)
    assert not math.isnan(float(a.sum()))


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


def test_evaluating_restores_each_submodule_mode():
    model = bn_model().train()
    model[2].eval()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[1].training and not model[2].training
    with evaluating(model, enabled=False):
        assert model.training


def test_attacks_leave_a_training_model_as_found(trained):
    _, x, y = trained
    model = bn_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adv = APGD(model, 0.1, steps=3)(x, y)
    adv_t = APGDT(model, 0.1, steps=3, n_targets=2)(x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    eval_model = bn_model().eval()
    assert torch.equal(adv, APGD(eval_model, 0.1, steps=3)(x, y))
    assert torch.equal(adv_t, APGDT(eval_model, 0.1, steps=3, n_targets=2)(x, y))
    APGD(model, 0.1, steps=1, eval_mode=False)(x, y)  # asked: BatchNorm statistics move
    assert not torch.equal(state["1.running_mean"], model.state_dict()["1.running_mean"])
