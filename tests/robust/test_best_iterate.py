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
