"""Best-iterate tracking of the iterative attacks (attacks.py): an image fooled midway
stays fooled even when the last step undoes it."""

import pytest
import torch
from torch import nn

from equivision.metrics import per_image_score
from equivision.robust.attacks import CW, IFGSM, MIM, PGD, Houdini

pytestmark = pytest.mark.usefixtures("one_thread")


class Wavy(nn.Module):
    """Two classes; the class-0 logit is ``2 cos(30 (mean(x) - 0.5))``: sign steps of 0.1
    from 0.51 jump between a correct point (0.51) and a fooled one (0.61)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z0 = 2 * torch.cos(30 * (x.flatten(1).mean(1) - 0.5))
        return torch.stack([z0, torch.zeros_like(z0)], 1)


# (CW clamps its margin at kappa = 0: once fooled its gradient is 0 and it stays)
@pytest.mark.parametrize("cls", [PGD, IFGSM, Houdini])
def test_fooled_midway_stays_fooled(cls):
    model, x, y = Wavy(), torch.full((1, 1, 2, 2), 0.51), torch.zeros(1, dtype=torch.long)
    kw = dict(alpha=0.1, steps=4, random_start=False)
    with torch.no_grad():
        assert model(x).argmax(1).item() == 0
        last = cls(model, 0.3, best_iterate=False, **kw)(x, y)
        assert model(last).argmax(1).item() == 0  # the 4th step went back
        best = cls(model, 0.3, **kw)(x, y)
        assert model(best).argmax(1).item() == 1
    assert float((best - x).abs().max()) <= 0.3 + 1e-6


def test_best_iterate_never_worse_than_the_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    for cls in (PGD, MIM, CW):
        kw = dict(alpha=0.08, steps=6, seed=2)
        last = cls(model, 0.1, best_iterate=False, **kw)(x, y)
        best = cls(model, 0.1, **kw)(x, y)
        with torch.no_grad():
            s_last, s_best = per_image_score(model(last), y), per_image_score(model(best), y)
        assert bool((s_best <= s_last).all()), cls.__name__


def test_in_place_steps_give_the_same_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 3, (8,))
    atk = PGD(model, 0.1, steps=3, best_iterate=False)
    g = torch.randn_like(x)
    a = atk._step(x.clone(), x, g.clone())
    b = atk._step(x.clone(), x, g.clone(), inplace=True)
    assert torch.equal(a, b)
    assert "best_iterate=True" in repr(PGD(model, 0.1)) and atk(x, y).shape == x.shape


class Counting(nn.Module):
    """A linear classifier that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


def _reference_best(model, x, y, steps, **kw):
    """Per image the best of the iterates ``0..steps-1`` (lowest score, ties the higher
    cross-entropy, later on full ties) and the last iterate only where none of them was
    fooled; iterates from last-iterate runs of 0..steps steps."""
    iterates = [x] + [PGD(model, 0.3, steps=k, best_iterate=False, **kw)(x, y)
                      for k in range(1, steps + 1)]
    best = iterates[0].clone()
    with torch.no_grad():
        rows = [(per_image_score(model(it), y), nn.functional.cross_entropy(
            model(it), y, reduction="none")) for it in iterates]
    for i in range(x.shape[0]):
        fooled_early = any(rows[t][0][i] == 0 for t in range(steps))
        candidates = range(steps) if fooled_early else range(steps + 1)
        t = max(candidates, key=lambda t: (-rows[t][0][i], rows[t][1][i], t))
        best[i] = iterates[t][i]
    return best


def test_last_forward_runs_only_on_images_not_yet_fooled():
    model = Counting().eval()
    x = torch.rand(24, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    kw = dict(alpha=0.03, random_start=False)
    for steps in (2, 5):
        model.sizes.clear()
        adv = PGD(model, 0.3, steps=steps, **kw)(x, y)
        assert model.sizes[:steps] == [24] * steps
        assert torch.equal(adv, _reference_best(model, x, y, steps, **kw)), steps
    # some images still right before the last step: the last pass sees only those
    model.sizes.clear()
    PGD(model, 0.3, steps=5, **kw)(x, y)
    assert len(model.sizes) == 6 and 0 < model.sizes[-1] < 24
    # every image fooled (here: from the start): no last forward pass at all
    model.sizes.clear()
    PGD(model, 0.3, steps=4, **kw)(x, (y + 1) % 3)
    assert model.sizes == [24] * 4
