"""Translation mode (:mod:`equivision.gcnn.translation`) against measured shifts: circular
padding and circular shifts, so that exactness holds over the whole map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equivision.gcnn.exactness import CANNOT_VERIFY, EXACT, NOT_EXACT
from equivision.gcnn.translation import analyze_translation

DT = torch.float64
TOL = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")


def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, padding_mode="circular", dtype=DT)


class Blur(nn.Module):
    """Circular BlurPool: a [1, 2, 1] binomial filter, stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0], dtype=DT)
        self.register_buffer("filt", ((a[:, None] * a) / 16)[None, None].repeat(channels, 1,
                                                                                  1, 1))
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), self.filt, stride=2,
                        groups=self.channels)


def best_shift_error(net: nn.Module, t: int, size: int = 16) -> float:
    """min over output shifts u of ||f(roll(x, t)) - roll(f(x), u)|| / ||f(x)|| (W axis)."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, size, size, dtype=DT)
    with torch.no_grad():
        y, ys = net(x), net(torch.roll(x, t, -1))
    n = y.shape[-1]
    return min(float((ys - torch.roll(y, u, -1)).norm() / y.norm()) for u in range(n))


def test_cumulative_stride_and_aliasing_match_measured_shifts():
    torch.manual_seed(0)
    net = nn.Sequential(conv(2, 4), nn.ReLU(inplace=True), conv(4, 4, 2), nn.ReLU(),
                        nn.MaxPool2d(2), conv(4, 3))
    report = analyze_translation(net, 16)
    assert report.verdict == EXACT and report.shifts == (4, 4), report.table()
    assert [r.name for r in report.aliasing] == ["2", "4"]
    assert [r.shifts for r in report.layers if r.kind != "pointwise"] == [
        (1, 1), (2, 2), (4, 4), (4, 4)]
    for t in (4, 8, 12):
        assert best_shift_error(net, t) < TOL
    for t in (1, 2, 3, 6):
        assert best_shift_error(net, t) > 1e-3
    assert "aliasing at 2, 4" in report.table()


def test_blur_pool_does_not_alias_and_upsampling_does_not_restore_shifts():
    torch.manual_seed(0)
    net = nn.Sequential(conv(2, 4), Blur(4), nn.Upsample(scale_factor=2), conv(4, 3))
    report = analyze_translation(net, 16)
    assert report.verdict == EXACT and not report.aliasing, report.table()
    assert report.shifts == (2, 2)          # subsampled once: odd shifts stay lost
    assert report.layers[-1].cumulative == (1, 1)
    assert best_shift_error(net, 2) < TOL and best_shift_error(net, 1) > 1e-3


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 2, 16, 16, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos


class Flip(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.flip(x, (-1,))


def test_position_dependent_and_unknown_layers():
    report = analyze_translation(nn.Sequential(Positional(), conv(2, 2)), 16)
    assert report.verdict == NOT_EXACT and report.shifts is None
    assert best_shift_error(nn.Sequential(Positional(), conv(2, 2)), 1) > 1e-3
    # symmetric under flips, yet position-dependent: still not exact under shifts
    sym = Positional()
    with torch.no_grad():
        sym.pos.copy_(sym.pos + sym.pos.flip(-1))
    assert analyze_translation(nn.Sequential(sym, conv(2, 2)), 16).verdict == NOT_EXACT
    assert analyze_translation(nn.Sequential(Flip(), conv(2, 2)), 16).verdict == CANNOT_VERIFY
