"""Square attack: no gradients, the p schedule, ball and box, per-image stopping."""

import pytest
import torch
from conftest import accuracy, seg_batch, segmenter
from torch import Tensor, nn

from equivision.metrics import per_image_miou
from equivision.robust.square import Square, square_l2_update, square_p, square_pattern

pytestmark = pytest.mark.usefixtures("one_thread")


class NoGradient(nn.Module):
    """Runs the wrapped model under ``torch.no_grad()`` on quantized inputs: no gradient
    reaches the input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(torch.round(x * 255) / 255)


def test_p_schedule():
    assert square_p(0.8, 0, 10000) == 0.8
    assert square_p(0.8, 10, 10000) == 0.8
    assert square_p(0.8, 11, 10000) == 0.4
    assert square_p(0.8, 51, 10000) == 0.2
    assert square_p(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    assert square_p(0.8, 5, 100) == pytest.approx(0.8 / 8)  # rescaled: 500 is in (200, 500]
    assert square_p(0.8, 6, 100) == pytest.approx(0.8 / 16)


def test_square_needs_no_gradient_and_lowers_accuracy(trained):
    model, x, y = trained
    wrapped = NoGradient(model)
    xq = torch.round(x * 255) / 255
    attack = Square(wrapped, 0.15, queries=200, seed=1)
    with torch.no_grad():
        adv = attack(xq, y)
    assert accuracy(wrapped, adv, y) < accuracy(wrapped, xq, y) - 0.2
    assert (adv - xq).abs().max() <= 0.15 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv, Square(wrapped, 0.15, queries=200, seed=1)(xq, y))


def test_square_stops_querying_fooled_images(trained):
    model, x, y = trained
    attack = Square(model, 0.2, queries=100)
    adv = attack(x, y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert attack.queries is not None
    assert int(attack.queries.max()) <= 100
    assert bool((attack.queries[fooled] < 100).any())
    assert bool((attack.queries[~fooled] == 100).all())


def test_square_segmentation():
    model = segmenter()
    x, labels = seg_batch(model)
    adv = Square(model, 0.1, queries=50)(x, labels)
    with torch.no_grad():
        after = per_image_miou(model(adv).argmax(1), labels, 4)
    assert float(after.mean()) < 1.0


def test_square_bad_settings():
    with pytest.raises(ValueError, match="p_init"):
        Square(nn.Linear(2, 3), 0.1, p_init=0.0)
    with pytest.raises(ValueError, match="eps"):
        Square(nn.Linear(2, 3), -1.0)


def test_l2_patterns_by_hand():
    bump = square_pattern(3, 3)
    want = torch.full((3, 3), 0.25)
    want[1, 1] = 1.25
    assert torch.allclose(bump, want / want.norm())
    wide = square_pattern(2, 5)  # centre (1, 2); distances 0..2
    assert wide.argmax().item() == 1 * 5 + 2 and torch.isclose(wide.norm(), torch.tensor(1.0))
    update = square_l2_update(5)
    assert torch.isclose(update.norm(), torch.tensor(1.0))
    assert bool((update[:2] > 0).all()) and bool((update[2:] < 0).all())
    assert torch.equal(square_l2_update(5, flip=True), update.T)


def test_square_l2_in_ball_and_lowers_accuracy(trained):
    model, x, y = trained
    eps = 1.5
    attack = Square(model, eps, queries=200, norm="l2", seed=2)
    adv = attack(x, y)
    assert bool(((adv - x).flatten(1).norm(dim=1) <= eps + 1e-4).all())
    assert adv.min() >= 0 and adv.max() <= 1
    assert accuracy(model, adv, y) < accuracy(model, x, y) - 0.2
    assert torch.equal(adv, Square(model, eps, queries=200, norm="l2", seed=2)(x, y))
