"""The exactness analyzer on channels-last blocks (ConvNeXt, Swin): a permute of a map to
``(B, H, W, C)`` is a change of layout, and ``Linear`` / ``LayerNorm`` / activations on such a
map act pixel by pixel; any other reading of a permuted map stays "cannot verify". Every
verdict here is checked against the measured float64 error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels import symmetric
from others_models import PermutingNet, TinyConvNeXt
from torch import Tensor, nn

from equivision.gcnn.exactness import (
    ALIGNED,
    CANNOT_VERIFY,
    EXACT,
    NOT_EXACT,
    analyze_exactness,
    empirical_equivariance_error,
    exact_sizes,
)
from equivision.gcnn.translation import analyze_translation

DT = torch.float64
TOL = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")



def pointwise_convnext(seed: int = 0) -> TinyConvNeXt:
    """TinyConvNeXt with 1x1 depthwise kernels, a D4-symmetric stem and random affine
    LayerNorms: exactly p4m-equivariant wherever the stem's grid is aligned."""
    torch.manual_seed(seed)
    model = TinyConvNeXt(kernel=1, in_channels=1).to(DT).eval()
    with torch.no_grad():
        model.stem.weight.copy_(symmetric(model.stem.weight, "p4m"))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


def error(model: nn.Module, size: int, group: str = "p4", in_channels: int = 1) -> float:
    return empirical_equivariance_error(model, size, group=group, in_channels=in_channels)


def test_convnext_rows_read_the_channels_last_layers_pixel_by_pixel():
    torch.manual_seed(0)
    report = analyze_exactness(TinyConvNeXt(in_channels=1), 32, in_channels=1)
    rows = {r.name: r for r in report.layers}
    for i in range(2):
        for name in (f"stages.{i}.norm:layer_norm()", f"stages.{i}.pwconv1:linear()",
                     f"stages.{i}.act", f"stages.{i}.pwconv2:linear()"):
            row = rows[name]
            assert (row.input_size, row.output_size, row.exact) == ((8, 8), (8, 8), True), name
            assert "pixel by pixel" in row.reason
    permutes = [r for r in report.layers if r.name.endswith(":permute()")]
    assert len(permutes) == 4 and all(r.exact is True and "layout change" in r.reason
                                      and r.input_size == (8, 8) for r in permutes)
    assert report.geometry == ALIGNED, report.table()
    assert "cannot verify" not in report.table()
    assert analyze_translation(TinyConvNeXt(in_channels=1), 32, 1).verdict == EXACT


@pytest.mark.parametrize("group", ["p4", "p4m"])
def test_pointwise_convnext_with_symmetric_stem_is_exact_where_the_stem_is_aligned(group):
    model = pointwise_convnext()
    aligned = analyze_exactness(model, 32, in_channels=1, group=group)
    assert aligned.verdict == EXACT, aligned.table()
    assert error(model, 32, group) < TOL
    misaligned = analyze_exactness(model, 34, in_channels=1, group=group)
    assert misaligned.verdict == NOT_EXACT
    assert [r.name for r in misaligned.breaking] == ["stem"]
    assert error(model, 34, group) > 1e-3
    assert exact_sizes(model, 28, 36, in_channels=1, group=group) == [28, 32, 36]


class SwapNet(nn.Module):
    """A symmetric conv, then its map permuted with H and W swapped (channels-last with
    ``permute(0, 3, 2, 1)``, or channels-first with ``transpose(2, 3)``), then a plain conv."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.conv = nn.Conv2d(1, 4, 3, padding=1, dtype=DT)
        self.fc = nn.Linear(4, 4, dtype=DT)
        self.head = nn.Conv2d(4, 2, 3, padding=1, dtype=DT)
        with torch.no_grad():
            self.conv.weight.copy_(symmetric(self.conv.weight, "p4m"))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        y = self.fc(y.permute(0, 3, 2, 1)).permute(0, 3, 1, 2) if self.last else y.transpose(2, 3)
        return self.head(y)


@pytest.mark.parametrize("last", [True, False])
def test_a_permute_that_swaps_h_and_w_cannot_be_verified(last):
    torch.manual_seed(0)
    net = SwapNet(last)
    report = analyze_exactness(net, 9, in_channels=1)
    assert report.geometry == CANNOT_VERIFY, report.table()
    unread = [r for r in report.layers if r.exact is None]
    assert unread and ("(B, W, H, C)" in unread[0].reason or "(B, C, W, H)" in unread[0].reason)
    assert error(net, 9) > 1e-3


class TransposePairs(nn.Module):
    """ConvNeXt's pointwise part reached by other moves than one permute: a transpose pair
    (through ``(B, W, H, C)``) or ``movedim``, and back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1, dtype=DT)
        self.norm = nn.LayerNorm(4, dtype=DT)
        self.fc = nn.Linear(4, 3, dtype=DT)
        self.scale = nn.Parameter(torch.randn(3, dtype=DT))
        with torch.no_grad():
            self.conv.weight.copy_(symmetric(self.conv.weight, "p4m"))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        y = y.transpose(1, 3).transpose(1, 2) if self.how == "pair" else y.movedim(1, -1)
        y = torch.relu(self.fc(self.norm(y))) * self.scale
        y = torch.cat([y[..., 1:], y[:, :, :, :1]], -1)  # channels split and swapped
        return y.transpose(1, 2).transpose(1, 3) if self.how == "pair" else y.movedim(-1, 1)


@pytest.mark.parametrize("how", ["pair", "movedim"])
def test_transpose_pairs_and_movedim_are_layout_changes(how):
    torch.manual_seed(0)
    net = TransposePairs(how)
    report = analyze_exactness(net, 9, in_channels=1)
    assert report.verdict == EXACT, report.table()
    assert error(net, 9) < TOL


class ChannelsLastMisuse(nn.Module):
    """A channels-last map read by something that does not act pixel by pixel on it."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.conv = nn.Conv2d(1, 9, 3, padding=1, dtype=DT)
        self.bn = nn.BatchNorm2d(9, dtype=DT)   # normalises axis 1: H of a channels-last map
        self.pos = nn.Parameter(torch.randn(9, 9, 9, dtype=DT))   # (H, W, C)
        with torch.no_grad():
            self.conv.weight.copy_(symmetric(self.conv.weight, "p4m"))
            self.bn.running_mean.normal_()

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv(x)
        y = c.permute(0, 2, 3, 1)
        if self.what == "gate":  # a (B, C, 1, 1) gate of the channels-first map: scales rows
            y = y * torch.sigmoid(c.mean((2, 3), keepdim=True))
        elif self.what == "batchnorm":
            y = self.bn(y)
        elif self.what == "positional":
            y = y + self.pos
        elif self.what == "output":
            return torch.relu(y)
        return y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("what,verdict,blamed", [
    ("batchnorm", CANNOT_VERIFY, "bn"), ("positional", NOT_EXACT, "model:add()"),
    ("output", CANNOT_VERIFY, "model output"), ("gate", CANNOT_VERIFY, "model:mul()")])
def test_other_readings_of_a_channels_last_map_are_not_waved_through(what, verdict, blamed):
    torch.manual_seed(0)
    net = ChannelsLastMisuse(what)
    report = analyze_exactness(net, 9, in_channels=1)
    assert report.verdict == verdict, report.table()
    first = next(r for r in report.layers if r.exact is not True)
    assert first.name == blamed, report.table()  # not the permute before it
    assert error(net, 9) > 1e-3


def test_layer_norm_over_the_width_of_a_channels_first_map_is_not_pixel_by_pixel():
    conv = nn.Conv2d(1, 3, 3, padding=1, dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(symmetric(conv.weight, "p4m"))
    net = nn.Sequential(conv, nn.LayerNorm(9, elementwise_affine=False, dtype=DT))
    report = analyze_exactness(net, 9, in_channels=1)
    assert report.verdict == CANNOT_VERIFY, report.table()
    assert error(net, 9) > 1e-3
    whole = nn.Sequential(conv, nn.LayerNorm((9, 9), elementwise_affine=False, dtype=DT))
    assert analyze_exactness(whole, 9, in_channels=1).verdict == EXACT
    assert error(whole, 9) < TOL


def test_a_module_that_permutes_to_channels_last_is_read():
    torch.manual_seed(0)
    report = analyze_exactness(PermutingNet(), 16)
    assert report.geometry == ALIGNED, report.table()
    assert report.layers[-1].kind == "global pool"


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of a (B, C, H, W) map, permuting
    to channels-last and back inside its forward."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return y.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """ConvNeXt V2's global response normalisation on a channels-last map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, 1, 1, dim, dtype=DT))
        self.beta = nn.Parameter(torch.randn(1, 1, 1, dim, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)) + self.beta + x


class ConvNeXtV2Pointwise(nn.Module):
    """A pointwise ConvNeXt V2 block as timm writes it (LayerNorm2d, GRN, layer scale), or
    Swin's patch merging (four stride-2 slices of the channels-last map, concatenated)."""

    def __init__(self, merge: bool = False) -> None:
        super().__init__()
        self.merge = merge
        self.stem = nn.Conv2d(1, 4, 3, padding=1, dtype=DT)
        self.norm = LayerNorm2d(4, dtype=DT)
        self.fc = nn.Linear(16 if merge else 4, 4, dtype=DT)
        self.grn = GRN(4)
        self.scale = nn.Parameter(torch.randn(4, dtype=DT))
        with torch.no_grad():
            self.stem.weight.copy_(symmetric(self.stem.weight, "p4m"))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.stem(x)).permute(0, 2, 3, 1)
        if self.merge:
            y = torch.cat([y[:, i::2, j::2, :] for j in range(2) for i in range(2)], -1)
        return self.grn(F.gelu(self.fc(y))).mul(self.scale).permute(0, 3, 1, 2)


@pytest.mark.parametrize("merge", [False, True])
def test_timm_style_channels_last_blocks_agree_with_the_measured_error(merge):
    torch.manual_seed(0)
    net = ConvNeXtV2Pointwise(merge)
    report = analyze_exactness(net, 8, in_channels=1)
    if merge:  # Swin's patch merging: the four sub-grids trade places under a rotation
        assert report.verdict == NOT_EXACT and report.geometry != CANNOT_VERIFY
        assert all(":__getitem__()" in r.name for r in report.breaking)
        assert error(net, 8) > 1e-3
    else:
        assert report.verdict == EXACT, report.table()
        assert error(net, 8) < TOL
