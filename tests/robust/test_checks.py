"""Automatic evaluation checks: each flags a constructed positive case, passes a negative."""

import pytest
import torch
from torch import Tensor, nn

from equivision.robust.apgd import APGD
from equivision.robust.checks import (
    CheckResult,
    accuracy_curve,
    check_black_box,
    check_convergence,
    check_eps_growth,
    check_gradients,
    check_randomness,
    check_transfer,
    ensemble_checks,
    run_checks,
)
from equivision.robust.defenses import RandomNoiseDefense
from equivision.robust.ensemble import AutoAttackEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()


def batch() -> tuple[Tensor, Tensor]:
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0, 1, 2, 0])


class Quantized(nn.Module):
    """Rounds its input to 4 levels: the input gradient is exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * 3) / 3)


class NaNGradient(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) + 0.0 * torch.sqrt(x - 2.0).nan_to_num(0.0).sum()


def test_randomness():
    x, _ = batch()
    flagged = check_randomness(RandomNoiseDefense(linear()), x)
    assert isinstance(flagged, CheckResult) and flagged.flagged
    assert flagged.details["max_abs_diff"] > 0 and "EOT" in flagged.message
    assert not check_randomness(linear(), x).flagged


def test_gradients():
    x, y = batch()
    zero = check_gradients(Quantized(linear()), x, y)
    assert zero.flagged and zero.details["zero"] == 4
    nan = check_gradients(NaNGradient(linear()), x, y)
    assert nan.flagged and nan.details["nonfinite"] == 4
    ok = check_gradients(linear(), x, y)
    assert not ok.flagged and ok.details == {"zero": 0, "nonfinite": 0, "images": 4}


def test_gradients_through_a_defense():
    x, y = batch()
    assert not check_gradients(RandomNoiseDefense(linear()), x, y, through="bpda").flagged


def test_black_box_and_transfer():
    white = torch.tensor([True, True, False, True])
    assert check_black_box(white, torch.tensor([True, False, False, True])).flagged
    assert not check_black_box(white, torch.tensor([True, True, False, False]) | white).flagged
    result = check_transfer(white, torch.tensor([False, False, False, True]))
    assert result.flagged and result.details["extra_fooled"] == 2
    assert not check_transfer(white, white, tol=0.0).flagged
    assert not check_transfer(white, torch.tensor([True, False, False, True]), tol=0.3).flagged
    with pytest.raises(ValueError, match="length"):
        check_black_box(white, white[:2])


def test_eps_growth():
    assert not check_eps_growth({0.01: 0.5, 0.1: 0.2, 0.5: 0.0}).flagged
    rising = check_eps_growth({0.01: 0.5, 0.1: 0.6, 0.5: 0.0})
    assert rising.flagged and "rises" in rising.message
    stuck = check_eps_growth({0.01: 0.5, 0.5: 0.3})
    assert stuck.flagged and "still" in stuck.message
    with pytest.raises(ValueError):
        check_eps_growth({0.1: 0.5})


def test_convergence():
    assert check_convergence({10: 0.5, 100: 0.3}).flagged
    assert not check_convergence({10: 0.5, 50: 0.31, 100: 0.305}).flagged
    with pytest.raises(ValueError):
        check_convergence({10: 0.5})


def test_run_checks_puts_warnings_first():
    lines = run_checks([check_convergence({10: 0.3, 20: 0.3}),
                        check_convergence({10: 0.5, 20: 0.3})])
    assert lines[0].startswith("[WARNING] convergence") and lines[1].startswith("[ok]")


class Fool:
    """A stand-in attack that fools the images whose first pixel is above ``level``."""

    def __init__(self, level: float) -> None:
        self.level = level

    def __call__(self, x: Tensor, labels: Tensor) -> Tensor:
        out = x.clone()
        out[x[:, 0, 0, 0] > self.level] = 0.0
        return out


class FirstPixel(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        v = x[:, 0, 0, 0]
        return torch.stack([(v > 0).float(), (v <= 0).float(), torch.zeros_like(v)], 1)


def test_ensemble_checks_flag_square_beating_apgd():
    x = torch.linspace(0.1, 0.9, 5).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    y = torch.zeros(5, dtype=torch.long)
    flagged = AutoAttackEnsemble(FirstPixel(), 0.5, attacks=[("apgd-ce", Fool(0.7)),
                                                              ("square", Fool(0.3))])(x, y)
    (result,) = ensemble_checks(flagged)
    assert result.flagged and result.details["extra_fooled"] == 2
    fine = AutoAttackEnsemble(FirstPixel(), 0.5, attacks=[("apgd-ce", Fool(0.3)),
                                                           ("square", Fool(0.7))])(x, y)
    assert not ensemble_checks(fine)[0].flagged
    assert ensemble_checks(fine, black_box="nothing") == []


def test_eps_and_steps_curves_end_to_end(trained):
    model, x, y = trained
    curve = accuracy_curve(model, lambda e: APGD(model, e, steps=10), [0.05, 0.15, 0.4], x, y)
    assert list(curve) == [0.05, 0.15, 0.4] and curve[0.4] == 0.0
    assert not check_eps_growth(curve).flagged
    masked = Quantized(model)  # zero gradients: APGD cannot move
    stuck = accuracy_curve(masked, lambda e: APGD(masked, e, steps=5), [0.05, 0.4], x, y)
    assert check_eps_growth(stuck).flagged
    steps = accuracy_curve(model, lambda n: APGD(model, 0.12, steps=n), [1, 20, 40], x, y)
    assert check_convergence({1: steps[1], 20: steps[20]}).flagged  # 1 step is too few
    assert not check_convergence(steps).flagged  # 20 -> 40 steps: no further drop
