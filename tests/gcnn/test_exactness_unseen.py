"""The exactness analyzer on models it was not written for: written the way other people
write models (functional calls in ``forward``, in-place ReLU, positional tensors, a
torchvision-style ResNet). It must never say "exact" where the measured error is not ~0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels import symmetric
from others_models import BasicBlock  # tests/others_models.py: torchvision-style blocks
from torch import Tensor, nn

from equivision.gcnn import P4ConvZ2
from equivision.gcnn.exactness import (
    ALIGNED,
    CANNOT_VERIFY,
    CONSTRAINED,
    EXACT,
    MISALIGNED,
    NOT_EXACT,
    UNCONSTRAINED,
    analyze_exactness,
    empirical_equivariance_error,
    exact_sizes,
)
from equivision.models import create_model

DT = torch.float64
TOL = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")



def error(model: nn.Module, size, group: str = "p4", in_channels: int | None = None) -> float:
    return empirical_equivariance_error(model, size, group=group, in_channels=in_channels)


# ---- fix 3: the two-part verdict --------------------------------------------------------------
class ResNet18(nn.Module):
    """resnet18 as torchvision writes it (narrow): stem 7x7/2, max pool 3/2, 4 stages."""

    def __init__(self, width: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans, blocks = width, []
        for i, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            blocks.append(nn.Sequential(BasicBlock(chans, c, stride), BasicBlock(c, c, 1)))
            chans = c
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(chans, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("name,size", [("cnn7", 28), ("resnet18", 225)])
def test_plain_cnn_is_aligned_but_unconstrained(name, size):
    torch.manual_seed(0)
    model = create_model("cnn7") if name == "cnn7" else ResNet18()
    report = analyze_exactness(model, size)
    assert report.geometry == ALIGNED, report.table()
    assert report.weights == UNCONSTRAINED and report.verdict == NOT_EXACT
    assert any("not p4-symmetric" in r.weights_reason for r in report.breaking)
    assert "weights: unconstrained" in report.table()
    assert 1e-3 < error(model, size) < 1.5        # far from the ~1e-15 of an exact network
    assert exact_sizes(model, size - 1, size + 1) == []


def test_symmetric_kernels_and_group_layers_are_constrained():
    conv = nn.Conv2d(2, 3, 3, 2, 1, dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(symmetric(conv.weight))
    report = analyze_exactness(nn.Sequential(conv, nn.ReLU(inplace=True)), 9)
    assert (report.geometry, report.weights, report.verdict) == (ALIGNED, CONSTRAINED, EXACT)
    assert error(nn.Sequential(conv), 9) < TOL
    # symmetric under flips only: constrained for "flip", not for p4
    flip = nn.Conv2d(2, 3, 3, 1, 1, dtype=DT)
    with torch.no_grad():
        flip.weight.copy_((flip.weight + flip.weight.flip(-1)) / 2)
    assert analyze_exactness(flip, 9, group="flip").verdict == EXACT
    assert analyze_exactness(flip, 9).weights == UNCONSTRAINED
    # a p4 group convolution is constrained for p4 but not for reflections
    p4 = create_model("p4cnn")
    assert analyze_exactness(p4, 28).verdict == EXACT
    assert analyze_exactness(p4, 28, group="flip").weights == UNCONSTRAINED


# ---- fix 1: a leaf module's functions are watched ---------------------------------------------
class DownUp(nn.Module):
    """One module, no children: a stride-2 conv followed by nearest x2 upsampling."""

    def __init__(self, sym: bool = True) -> None:
        super().__init__()
        w = torch.randn(3, 2, 3, 3, dtype=DT)
        self.weight = nn.Parameter(symmetric(w) if sym else w)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(F.conv2d(x, self.weight, stride=2, padding=1), inplace=True)
        return F.interpolate(y, scale_factor=2, mode="nearest")


@pytest.mark.parametrize("wrap", [False, True])
def test_conv_and_upsampling_in_one_module_is_not_exact(wrap):
    for size in range(8, 14):
        net = nn.Sequential(nn.Identity(), DownUp()) if wrap else DownUp()
        report = analyze_exactness(net, size, in_channels=2)
        assert any(r.name.endswith(":conv2d()") for r in report.layers)
        err = error(net, size, in_channels=2)
        if size % 2 == 0:                     # (i + 2 - 3) mod 2 = 1: misaligned
            assert report.geometry == MISALIGNED and report.verdict == NOT_EXACT
            assert err >= 0.1
        else:                                 # aligned conv, symmetric kernels, x2 nearest
            assert report.verdict == EXACT and err < TOL, report.table()
    report = analyze_exactness(DownUp(sym=False), 9, in_channels=2)
    assert report.weights == UNCONSTRAINED and report.verdict == NOT_EXACT


# ---- fix 2: same-size spatial operations -----------------------------------------------------
class Roll(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.roll(x, 1, dims=-1)


class Transpose(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2).contiguous()


class CoordConv(nn.Module):
    """Concatenates (y, x) coordinate channels, CoordConv style."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, ys, xs], dim=1)


class Positional(nn.Module):
    """Adds a learned positional map."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 2, size, size, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pos


class ChannelOnly(nn.Module):
    """Same-size operations that are exact: channel permutation, a per-channel scale and a
    constant map."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, 2, 1, 1, dtype=DT))
        self.register_buffer("bias", torch.full((1, 2, 9, 9), 0.5, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 1, 2, 3)[:, [1, 0]] * self.scale + self.bias


@pytest.mark.parametrize("layer,expected", [
    (Roll(), CANNOT_VERIFY), (Transpose(), CANNOT_VERIFY), (CoordConv(), NOT_EXACT),
    (Positional(9), NOT_EXACT)])
def test_same_size_spatial_operations_are_not_waved_through(layer, expected):
    net = nn.Sequential(layer, nn.AdaptiveAvgPool2d(3))
    report = analyze_exactness(net, 9, in_channels=2)
    assert report.verdict == expected, report.table()
    row = next(r for r in report.layers if r.exact is not True)
    assert row.reason
    assert error(net, 9, in_channels=2) > 0.1


def test_channel_operations_stay_exact():
    net = nn.Sequential(ChannelOnly(), nn.AdaptiveAvgPool2d(3))
    assert analyze_exactness(net, 9, in_channels=2).verdict == EXACT
    assert error(net, 9, in_channels=2) < TOL


# ---- fix 4: padding and stride judged together; non-square inputs -----------------------------
class BlurPool(nn.Module):
    """antialiased-cnns' BlurPool: reflection padding [1, 2, 1, 2], then a stride-2 depthwise
    4x4 binomial filter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=DT)
        filt = (a[:, None] * a[None, :]) / (a.sum() ** 2)
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))
        self.pad = nn.ReflectionPad2d([1, 2, 1, 2])
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=self.channels)


@pytest.mark.parametrize("size", [8, 9, 10, 11, 12, 13])
def test_blurpool_is_exact_at_even_sizes(size):
    net = nn.Sequential(BlurPool(2), nn.ReLU(inplace=True))
    report = analyze_exactness(net, size, in_channels=2)
    assert report.verdict == (EXACT if size % 2 == 0 else NOT_EXACT), report.table()
    assert report.weights == CONSTRAINED
    assert (error(net, size, in_channels=2) < TOL) == (size % 2 == 0)


def test_fully_convolutional_net_on_a_non_square_input():
    convs = []
    for cin, cout, stride in ((2, 4, 1), (4, 4, 2), (4, 3, 1)):
        conv = nn.Conv2d(cin, cout, 3, stride, 1, dtype=DT)
        with torch.no_grad():
            conv.weight.copy_(symmetric(conv.weight))
        convs += [conv, nn.ReLU(inplace=True)]
    net = nn.Sequential(*convs)
    report = analyze_exactness(net, (15, 17))
    assert report.verdict == EXACT and report.notes, report.table()
    assert error(net, (15, 17)) < TOL
    assert analyze_exactness(net, (15, 16)).verdict == NOT_EXACT
    assert error(net, (15, 16)) > 1e-3


# ---- fix 5: upsampling and transposed convolutions ---------------------------------------------
def sym_tconv(cin: int, cout: int, k: int, stride: int, padding: int = 0,
              output_padding: int = 0) -> nn.ConvTranspose2d:
    tconv = nn.ConvTranspose2d(cin, cout, k, stride, padding, output_padding, dtype=DT)
    with torch.no_grad():
        tconv.weight.copy_(symmetric(tconv.weight))
    return tconv


@pytest.mark.parametrize("size", [4, 5, 6, 7])
@pytest.mark.parametrize("k,s,p,op", [(2, 2, 0, 0), (3, 2, 1, 0), (3, 2, 1, 1), (4, 2, 1, 0),
                                      (3, 3, 0, 0), (3, 2, 0, 1)])
def test_transposed_conv_rule_matches_the_measured_error(size, k, s, p, op):
    net = nn.Sequential(sym_tconv(2, 3, k, s, p, op), nn.Tanh())
    report = analyze_exactness(net, size)
    assert report.verdict == (EXACT if op == 0 else NOT_EXACT), report.table()
    assert (error(net, size) < TOL) == (op == 0)


@pytest.mark.parametrize("size", [4, 5, 7])
@pytest.mark.parametrize("mode,factor,exact", [
    ("nearest", 2, True), ("bilinear", 2, True), ("bicubic", 3, True),
    ("nearest-exact", 2, True), ("nearest", 1.5, None), ("bilinear", 2.5, None)])
def test_upsampling_rule_matches_the_measured_error(size, mode, factor, exact):
    class Up(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.interpolate(x, scale_factor=factor, mode=mode)

    report = analyze_exactness(nn.Sequential(Up()), size, in_channels=2)
    assert report.exact is exact, report.table()
    err = error(Up(), size, in_channels=2)
    if exact:
        assert err < TOL
    module = nn.Upsample(scale_factor=factor, mode=mode)
    assert analyze_exactness(module, size, in_channels=2).exact is exact


class TinyUNet(nn.Module):
    """Encoder (stride-2 convs), decoder (nearest or transposed upsampling), skip concat."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        c = 4

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            layer = nn.Conv2d(cin, cout, 3, stride, 1, dtype=DT)
            with torch.no_grad():
                layer.weight.copy_(symmetric(layer.weight))
            return layer

        self.inc, self.down1, self.down2 = conv(2, c), conv(c, c, 2), conv(c, c, 2)
        self.up1 = sym_tconv(c, c, 2, 2) if transposed else nn.Upsample(scale_factor=2)
        self.up2 = sym_tconv(2 * c, c, 2, 2) if transposed else nn.Upsample(scale_factor=2,
                                                                            mode="bilinear")
        self.dec1, self.out = conv(2 * c if not transposed else 2 * c, 2 * c), conv(
            c if transposed else 2 * c + c, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = F.relu(self.inc(x))
        x2 = F.relu(self.down1(x1))
        x3 = F.relu(self.down2(x2))
        y = F.relu(self.dec1(torch.cat([self.up1(x3), x2], 1)))
        y = self.up2(y)
        if not isinstance(self.up2, nn.ConvTranspose2d):
            y = torch.cat([y, x1], 1)
        return self.out(y)


@pytest.mark.parametrize("transposed", [False, True])
def test_small_unet_gets_a_verdict(transposed):
    net = TinyUNet(transposed)
    # stride-2 3x3 convs with padding 1 are aligned at 4m + 1 only after both steps; the
    # decoder needs even maps to concatenate, so sizes 4m work: 8 -> 4 -> 2 is misaligned
    for size in (8, 12, 16):
        report = analyze_exactness(net, size)
        assert report.verdict in (EXACT, NOT_EXACT), report.table()
        assert (error(net, size) < TOL) == (report.verdict == EXACT)


class FlatHead(nn.Module):
    """A p4 group map flattened to (B, C·4, H, W), then a plain 1x1 conv mixing the group
    channels: its kernels are trivially symmetric, the layer is not equivariant."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = P4ConvZ2(2, 3, 3).double()
        self.mix = nn.Conv2d(12, 4, 1, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lift(x)
        return self.mix(y.reshape(y.shape[0], -1, y.shape[-2], y.shape[-1]))


def test_plain_weights_on_a_flattened_group_map_are_not_vouched_for():
    torch.manual_seed(0)
    net = FlatHead()
    report = analyze_exactness(net, 9)
    assert report.weights == CANNOT_VERIFY and report.verdict == CANNOT_VERIFY, report.table()
    assert error(net, 9) > 1e-3
