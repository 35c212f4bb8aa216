"""``export``: group layers and every registered p4 / p4m model as plain ``nn.Conv2d`` /
``nn.BatchNorm2d`` layers, equal outputs (float32 and float64), eval mode, traceable,
independent weights, and clear errors naming the layers it cannot export."""

from __future__ import annotations

import pytest
import torch
from test_gcnn import GROUPS, D, rand, randomize
from torch import nn

from equivision.gcnn import (
    GroupAvgPool2d,
    GroupBatchNorm2d,
    GroupConv2d,
    GroupGlobalPool,
    GroupMaxPool2d,
    GroupPool,
)
from equivision.gcnn.export import (
    CosetGlobalPool,
    CosetPool,
    ExportError,
    export,
    export_batch_norm,
    export_conv,
    export_pool,
)
from equivision.gcnn.layers import PADDING_MODES
from equivision.models import create_model, list_models, model_defaults

pytestmark = pytest.mark.usefixtures("one_thread")

#: every registered group model: small settings and an input size
SMALL = {"p4cnn": ({}, 28), "p4resnet44": ({"depth": 8, "width": 0.5}, 33),
         "p4resnet18": ({"width": 0.125, "num_classes": 5}, 33)}
GROUP_TYPES = (GroupConv2d, GroupBatchNorm2d, GroupMaxPool2d, GroupAvgPool2d, GroupPool,
               GroupGlobalPool)


def test_every_registered_group_model_is_covered():
    assert {n for n in list_models() if "group" in model_defaults(n)} == set(SMALL)


def assert_plain(model: nn.Module) -> None:
    """Eval mode; every layer (module without children) from ``torch.nn`` or a coset pool;
    containers keep their classes."""
    for m in model.modules():
        assert not isinstance(m, GROUP_TYPES), type(m)
        assert not m.training
        if not list(m.children()):
            assert type(m).__module__.startswith("torch.nn") or isinstance(
                m, (CosetPool, CosetGlobalPool)), type(m)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_exported_models_equal_the_originals(name, group):
    kwargs, size = SMALL[name]
    torch.manual_seed(0)
    model = randomize(create_model(name, group=group, **kwargs)).train()
    x = torch.randn(2, model.in_channels, size, size)
    plain = export(model, x)
    assert model.training and any(isinstance(m, GroupConv2d) for m in model.modules())
    assert_plain(plain)
    with torch.no_grad():
        ref = model.eval()(x)
        out = plain(x)
        assert (out - ref).abs().max() <= 1e-6
        traced = torch.jit.trace(plain, x, check_trace=False)
        assert (traced(x) - ref).abs().max() <= 1e-6
    # the weights are a copy: changing them leaves the original as it was
    originals = {p.data_ptr() for p in model.parameters()} | {
        b.data_ptr() for b in model.buffers()}
    assert not originals & {p.data_ptr() for p in plain.parameters()}
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
        assert torch.equal(model(x), ref)
    model64 = model.to(D)
    x64 = x.to(D)
    with torch.no_grad():
        assert torch.allclose(export(model64)(x64), model64(x64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("lifting", [True, False])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_exported_conv_equals_the_group_conv(group, lifting, mode):
    layer = randomize(GroupConv2d(4, 6, 3, 2, 1, 1, 2, padding_mode=mode, group=group,
                                  in_group=None if lifting else group)).to(D)
    x = rand(2, 4, 9, 9) if lifting else rand(2, 4, layer.group_size, 9, 9)
    conv = export(layer, x)
    assert isinstance(conv, nn.Conv2d) and conv.groups == 2 and conv.padding_mode == mode
    assert conv.weight.shape == (6 * layer.group_size, 2 * layer.in_group_size, 3, 3)
    with torch.no_grad():
        flat = x if lifting else x.flatten(1, 2)
        assert torch.allclose(conv(flat), layer(x).flatten(1, 2), rtol=0, atol=1e-12)
        layer.weight.zero_()  # a copy: the exported weights stay
    assert conv.weight.abs().sum() > 0
    assert export_conv(GroupConv2d(1, 1, 3, bias=False, group=group)).bias is None


@pytest.mark.parametrize("group", GROUPS)
def test_exported_batch_norm_and_pools(group):
    n = 4 if group == "p4" else 8
    x = rand(2, 3, n, 8, 8)
    bn = randomize(GroupBatchNorm2d(3, group)).to(D).eval()
    plain_bn = export_batch_norm(bn)
    assert isinstance(plain_bn, nn.BatchNorm2d) and plain_bn.num_features == 3 * n
    for layer, plain in ((bn, plain_bn), (GroupMaxPool2d(3, 2, 1), None),
                         (GroupAvgPool2d(2), None), (GroupPool("mean"), CosetPool(n, "mean")),
                         (GroupPool("max"), export_pool(GroupPool(), n)),
                         (GroupGlobalPool(), export_pool(GroupGlobalPool(), n))):
        plain = plain or export(layer)
        y = layer(x)
        assert torch.allclose(plain(x.flatten(1, 2)), y.flatten(1, 2) if y.dim() == 5 else y,
                              rtol=0, atol=1e-12), type(layer)
    assert isinstance(export_pool(GroupGlobalPool(), n), nn.AdaptiveAvgPool2d)


def test_shared_layers_stay_shared():
    conv = GroupConv2d(2, 2, 3, padding=1)
    model = nn.Sequential(GroupConv2d(1, 2, 3, padding=1, in_group=None), conv, nn.ReLU(), conv)
    plain = export(model, torch.randn(1, 1, 7, 7))
    assert plain[1] is plain[3] and isinstance(plain[1], nn.Conv2d)


class Flip(GroupConv2d):
    def forward(self, x):
        return super().forward(x).flip(2)


class GroupMean(nn.Module):
    def forward(self, x):
        return x.mean(2, keepdim=True).expand_as(x)


class Reshaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = GroupConv2d(1, 2, 3, in_group=None)

    def forward(self, x):
        return self.conv(x).amax(2)


def test_layers_it_cannot_export_are_named():
    lift = GroupConv2d(1, 2, 3, padding=1, in_group=None)
    x = torch.randn(1, 1, 7, 7)
    with pytest.raises(ExportError, match=r"1 \(Flip\) .* overrides forward"):
        export(nn.Sequential(lift, Flip(2, 2, 3)))
    with pytest.raises(ExportError, match=r"1 \(Conv3d\) is a 3-D layer in a group network"):
        export(nn.Sequential(lift, nn.Conv3d(2, 2, 1)))
    with pytest.raises(ExportError, match=r"^export: 1 \(GroupMean\) receives a group feature "
                                          r"map"):
        export(nn.Sequential(lift, GroupMean()), x)
    with pytest.raises(ExportError, match=r"^export: 0 \(Reshaping\) gives different outputs"):
        export(nn.Sequential(Reshaping(), nn.ReLU()), x)
    bn = GroupBatchNorm2d(2, track_running_stats=False)
    with pytest.raises(ExportError, match=r"1 \(GroupBatchNorm2d\) keeps no running statistics"):
        export(nn.Sequential(lift, bn))
    with pytest.raises(ExportError, match=r"GroupPool \(GroupPool\) .* group size is unknown"):
        export(GroupPool())
    with pytest.raises(ExportError, match="mixes group sizes"):
        export(nn.Sequential(lift, GroupConv2d(2, 2, 3, group="p4m")))
    assert isinstance(ExportError("x"), ValueError)
