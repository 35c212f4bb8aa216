"""Issue 11: flips and 90° rotations of maps whose sampling grid is off the image's centre,
maps with no valid positions, and bad input that gets a line naming the layer and why."""

import re

import pytest
import torch
from others_models import StagedResNet, TokenViT
from torch import nn
from torch.utils.data import TensorDataset

from equivision.gcnn import analyze_exactness
from equivision.measure import measure
from equivision.measure.capture import trace_layers, unknown_layout
from equivision.measure.compare import NoInverse, align
from equivision.transforms import Layout, Resize, rot90
from equivision.transforms.layout import grid_shift


def noise(n=4, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, channels, size, size, generator=g), torch.zeros(n).long())


def isotropic_net():
    """A 3x3 stride-2 pad-1 convolution with a kernel invariant under D4, then ReLU."""
    conv = nn.Conv2d(1, 4, 3, 2, 1)
    with torch.no_grad():
        w = torch.randn(4, 1, 1, 1)
        ring = torch.tensor([[0.5, 1.0, 0.5], [1.0, 2.0, 1.0], [0.5, 1.0, 0.5]])
        conv.weight.copy_(w * ring)
    return nn.Sequential(conv, nn.ReLU()).eval()


@pytest.mark.parametrize("size, exact", [(28, False), (29, True)])
def test_rot90_and_flips_on_a_misaligned_strided_grid_are_inexact(size, exact):
    torch.manual_seed(0)
    rep = measure(isotropic_net(), noise(size=size, channels=1), "rot90:1,hflip,vflip,shift:2",
                  progress=False)
    for t in ("rot90", "hflip", "vflip"):
        r = rep.get(t, "0")
        assert r.exact == exact, (t, r.note)
        if exact:
            assert r.metrics["equivariance"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert "(i + 2p - k_eff) mod s != 0" in r.note and "'0'" in r.note
            assert "-0.5 px" in r.note
    assert rep.get("shift(2,2)", "0").exact  # a whole position at any grid offset
    if not exact:  # and the part means leave the flagged pairs out
        assert rep.part_summary(transforms=["rot90"])["Early"]["equivariance"] is None


@pytest.mark.parametrize("size, wrong", [(28, True), (29, False)])
def test_the_flag_hides_a_wrong_number(size, wrong):
    """What the pair gives without the flag: not equivariant at 28 px, exactly at 29 px."""
    torch.manual_seed(0)
    net = isotropic_net()
    x = noise(size=size, channels=1)[:][0]
    with torch.no_grad():
        fx, fgx = net(x), net(rot90(1)(x))
    a, b = align(fgx, fx, rot90(1), Layout("map", (2.0, 2.0)))
    rel = float((a - b).norm() / b.norm())
    assert (rel > 0.1) if wrong else (rel < 1e-5)


@pytest.mark.parametrize("size", [28, 29])
def test_misaligned_maps_agree_with_the_exactness_analyzer(size):
    torch.manual_seed(0)
    model = StagedResNet().eval()
    analyzed = analyze_exactness(model, size, in_channels=3)
    flagged = {r.name for r in analyzed.layers if "misaligned" in (r.reason or "")}
    modules = dict(model.named_modules())
    shifted = {r.name for r in analyzed.layers if r.name in modules and r.output_size
               and grid_shift(modules[r.name], r.input_size, r.output_size) != (0.0, 0.0)}
    assert shifted == flagged and flagged  # the same rule, layer by layer
    trace = trace_layers(model, noise(1, size=size)[:][0])
    assert {g.offset_from for g in trace.strides.values() if g.offset_from} <= flagged
    rep = measure(model, noise(size=size), "rot90:1", ["layer1", "layer2", "layer3", "layer4"],
                  progress=False)
    off = {n for n in rep.layers if not rep.get("rot90", n).exact}
    assert off == ({"layer2", "layer3", "layer4"} if size == 28 else {"layer4"})


def test_a_one_position_map_under_a_shift_has_no_valid_positions():
    torch.manual_seed(0)
    vit = TokenViT(size=4, patch=4).eval()  # one patch token, then [CLS] + 1
    rep = measure(vit, noise(size=4), "shift:4,shift:2", ["patch_embed", "blocks.0"],
                  progress=False)
    for t in rep.transforms:
        for name in rep.layers:
            r = rep.get(t, name)
            assert not r.exact and r.note.startswith("no valid positions"), (t, name, r.note)
            assert "margin" not in r.note and "inexact" not in r.note


def test_a_shift_past_the_map_and_a_margin_past_it_say_which():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 4, 4)).eval()  # 16 px -> 4x4 at stride 4
    rep = measure(net, noise(), "shift:16", progress=False)
    assert rep.get("shift(16,16)", "0").note.startswith("no valid positions: shift(16,16)")
    wide = measure(net, noise(), "shift:4", margin=8, progress=False)
    assert "lower the margin" in wide.get("shift(4,4)", "0").note


class FixedSize(nn.Module):
    """A conv, then a resampling to a fixed 6x6 whatever the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.resample = nn.Upsample(size=(6, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.resample(self.conv(x)))


def test_a_size_changing_transform_on_a_fixed_size_layer_is_not_a_silent_number():
    torch.manual_seed(0)
    rep = measure(FixedSize().eval(), noise(), [Resize(0.5)], progress=False)
    conv, fixed = rep.get("resize(0.5)", "conv"), rep.get("resize(0.5)", "resample")
    assert conv.metrics and conv.shape == [4, 16, 16]
    assert not fixed.exact and "does not follow the image" in fixed.note
    assert "resample" not in {r.layer for r in rep.results if r.metrics}
    with pytest.raises(NoInverse):
        align(torch.zeros(1, 4, 6, 6), torch.zeros(1, 4, 6, 6), Resize(0.5), Layout())


class NeedsItsSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_a_forward_that_fails_on_the_transformed_input_says_so():
    """The error names the model, the input shape and the cause, as a line per layer for
    that transformation (the others are still measured: see
    test_measure_forward_failure.py)."""
    report = measure(NeedsItsSize(), noise(), [Resize(0.5)], progress=False)
    assert report.results
    for r in report.results:
        assert not r.exact
        assert re.search(r"forward pass of NeedsItsSize failed on an input of "
                         r"shape \(4, 3, 8, 8\): RuntimeError", r.note), r.note


@pytest.mark.parametrize("out, why", [
    (torch.zeros(2, 3, dtype=torch.long), "int64"),
    (torch.zeros(2), "1-D output"),
    (torch.zeros(2, 3, 2, 4, 4, 1), "6-D output"),
    (torch.zeros(2, 3, 3, 4, 4), "group axis has 3"),
])
def test_outputs_of_no_known_layout_are_skipped_with_their_reason(out, why):
    assert why in unknown_layout(out, set())


class ArgmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.pick = ArgMax()

    def forward(self, x):
        return self.pick(self.conv(x))


class ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(1)


def test_an_integer_output_is_listed_as_skipped_not_an_error():
    rep = measure(ArgmaxHead(), noise(), "hflip", progress=False)
    assert rep.layers == ["conv"]
    assert "int64" in rep.meta["skipped"]["pick"]


def test_attention_is_skipped_when_the_token_count_equals_the_image_size():
    torch.manual_seed(0)
    vit = TokenViT(size=16, patch=4, cls=False).eval()  # 16 tokens on a 16 px image
    rep = measure(vit, noise(), "rot90:1", progress=False)
    assert set(rep.meta["skipped"]) == {"blocks.0.attn.softmax", "blocks.1.attn.softmax"}
    assert rep.meta["pool_layer"] == "head:input"  # the mean of the tokens
    assert all(r.exact for r in rep.results)


@pytest.mark.parametrize("size, aligned", [(28, True), (30, False)])
def test_token_layers_take_the_grid_offset_of_their_patch_layer(size, aligned):
    torch.manual_seed(0)
    vit = TokenViT(size=size, patch=4).eval()  # 30 px: the 4x4 patches leave 2 px over
    rep = measure(vit, noise(2, size=size), "rot90:1,hflip", ["patch_embed", "blocks.1"],
                  progress=False)
    for t in rep.transforms:
        for name in rep.layers:
            r = rep.get(t, name)
            assert r.exact == aligned, (t, name, r.note)
            assert r.shape == [16, 7, 7] and r.stride == [4.0, 4.0]
            if not aligned:
                assert "-1 px" in r.note and "'patch_embed.proj'" in r.note
