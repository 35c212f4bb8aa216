"""p4 / p4m group convolutions, group batch norm and pooling, and the group CNNs:
exact equivariance (float64), the filter bank against a naive reference, init, bad input,
exactness of the models at the input sizes of Edixhoven et al. (2023), and measurement."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from equivision.gcnn import (
    GroupAvgPool2d,
    GroupBatchNorm2d,
    GroupConv2d,
    GroupGlobalPool,
    GroupMaxPool2d,
    GroupPool,
    P4ConvP4,
    P4ConvZ2,
    P4MConvP4M,
    P4MConvZ2,
)
from equivision.measure import measure
from equivision.models import create_model, list_models
from equivision.models.cnn import CNN7
from equivision.transforms import group_elements, rot90

GROUPS = ("p4", "p4m")
D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random biases, batch-norm statistics and affine parameters, so that none is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, GroupConv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


def act(g, v: torch.Tensor, group: str) -> torch.Tensor:
    """``g`` acting on a group map (``apply_group_map``), a map or image (``apply_map``)
    or a vector (identity)."""
    if v.dim() == 5:
        return g.apply_group_map(v, group)
    return g.apply_map(v) if v.dim() == 4 else v


@torch.no_grad()
def max_equivariance_error(f, x, group, elements=None) -> float:
    """max over elements g of ``max |f(g x) - g·f(x)|`` relative to ``max |f(x)|``."""
    y = f(x)
    worst = 0.0
    for g in elements or group_elements(group):
        err = (f(act(g, x, group)) - act(g, y, group)).abs().max() / y.abs().max()
        worst = max(worst, float(err))
    return worst


# ---- group convolutions -----------------------------------------------------------------
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("k,pad,stride,dil,size", [
    (3, 1, 1, 1, 11), (5, 2, 1, 1, 9), (3, 0, 1, 2, 13), (3, 1, 2, 1, 11), (1, 0, 2, 1, 9),
    (2, 0, 1, 1, 8), (4, 1, 1, 1, 9),  # even kernels: exact too, for p4 and p4m
])
def test_lifting_and_group_conv_are_exactly_equivariant(group, k, pad, stride, dil, size):
    """Every size here fits ``(i + 2p - d(k-1) - 1) mod s == 0``."""
    torch.manual_seed(0)
    n = len(group_elements(group))
    lift = randomize(GroupConv2d(2, 3, k, stride, pad, dil, group=group, in_group=None)).to(D)
    gconv = randomize(GroupConv2d(3, 2, k, stride, pad, dil, group=group), 1).to(D)
    x = rand(2, 2, size, size)
    assert max_equivariance_error(lift, x, group) < 1e-12
    assert lift(x).shape[:3] == (2, 3, n)
    assert max_equivariance_error(gconv, rand(2, 3, n, size, size, seed=1), group) < 1e-12
    if stride == 1:
        assert max_equivariance_error(lambda v: gconv(lift(v)), x, group) < 1e-12
    else:  # one pixel more misaligns the strided sampling grid
        assert max_equivariance_error(lift, rand(2, 2, size + 1, size + 1), group) > 1e-3


@settings(max_examples=30, deadline=None)
@given(group=st.sampled_from(GROUPS), k=st.integers(1, 5), pad=st.integers(0, 2),
       dil=st.integers(1, 2), cin=st.integers(1, 3), cout=st.integers(1, 3),
       extra=st.integers(0, 4), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_group_conv_equivariance_property(group, k, pad, dil, cin, cout, extra, bias, seed):
    torch.manual_seed(seed)
    size = max(1, dil * (k - 1) + 1 - 2 * pad) + extra
    lift = GroupConv2d(cin, cout, k, 1, pad, dil, bias=bias, group=group, in_group=None).to(D)
    gconv = GroupConv2d(cout, cin, k, 1, pad, dil, bias=bias, group=group).to(D)
    x = rand(1, cin, size, size, seed=seed)
    h = lift(x)
    assert h.shape[-1] == size + 2 * pad - dil * (k - 1)
    assert max_equivariance_error(lift, x, group) < 1e-12
    if h.shape[-1] + 2 * pad - dil * (k - 1) >= 1:
        assert max_equivariance_error(gconv, h, group) < 1e-12


def naive_bank(weight: torch.Tensor, group: str, lifting: bool) -> torch.Tensor:
    """Reference filter bank from first principles, without the transforms module.

    Element ``(r, f) = R^r F^f`` (index ``4f + r``) acts on a kernel by flipping the width
    axis if ``f`` and then ``torch.rot90(., r)``; on the input group axis, output element
    ``g`` reads input element ``g^{-1} h`` at index ``h`` (for p4: a roll by ``r``).
    """
    n = 4 if group == "p4" else 8
    els = [(r, f) for f in range(n // 4) for r in range(4)]

    def mul(a, b):  # R^a F^fa R^b F^fb = R^(a + (-1)^fa b) F^(fa + fb)
        return ((a[0] + (-b[0] if a[1] else b[0])) % 4, (a[1] + b[1]) % 2)

    def inv(a):
        return a if a[1] else ((-a[0]) % 4, 0)

    def spatial(kernel, e):
        kernel = torch.flip(kernel, dims=(-1,)) if e[1] else kernel
        return torch.rot90(kernel, e[0], dims=(-2, -1))

    co, ci, gi, k, _ = weight.shape
    bank = torch.zeros(co, n, ci, gi, k, k, dtype=weight.dtype)
    for o in range(co):
        for gidx, g in enumerate(els):
            for i in range(ci):
                for h in range(gi):
                    src = 0 if lifting else els.index(mul(inv(g), els[h]))
                    bank[o, gidx, i, h] = spatial(weight[o, i, src], g)
    if group == "p4" and not lifting:  # the same, written as a cyclic roll
        rolled = torch.stack([torch.rot90(torch.roll(weight, r, dims=2), r, dims=(-2, -1))
                              for r in range(4)], 1)
        assert torch.equal(rolled, bank)
    return bank.reshape(co * n, ci * gi, k, k)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("lifting", [True, False])
@pytest.mark.parametrize("k", [3, 4])
def test_filter_bank_equals_naive_reference(group, lifting, k):
    layer = GroupConv2d(3, 2, k, group=group, in_group=None if lifting else group).to(D)
    ref = naive_bank(layer.weight.detach(), group, lifting)
    assert torch.equal(layer.filter_bank().detach(), ref)
    # gradients flow back through the gather exactly as through the naive construction
    grad = rand(*ref.shape, seed=3)
    layer.filter_bank().backward(grad)
    w = layer.weight.detach().clone().requires_grad_(True)
    naive_bank(w, group, lifting).backward(grad)
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-12)


def test_named_layers_and_weight_shapes():
    assert P4ConvZ2(3, 5, 3).weight.shape == (5, 3, 1, 3, 3)
    assert P4ConvP4(3, 5, 3).weight.shape == (5, 3, 4, 3, 3)
    assert P4MConvZ2(3, 5, 3).weight.shape == (5, 3, 1, 3, 3)
    assert P4MConvP4M(3, 5, 3).weight.shape == (5, 3, 8, 3, 3)
    x = torch.randn(2, 3, 9, 9)
    y = P4MConvZ2(3, 5, 3, padding=1)(x)
    assert y.shape == (2, 5, 8, 9, 9)
    assert P4MConvP4M(5, 4, 3, stride=2)(y).shape == (2, 4, 8, 4, 4)
    assert P4ConvP4(3, 5, (3, 3), stride=(2, 2), padding=(1, 1))(
        torch.randn(1, 3, 4, 8, 8)).shape == (1, 5, 4, 4, 4)


@pytest.mark.parametrize("lifting", [True, False])
def test_he_init(lifting):
    torch.manual_seed(0)
    layer = GroupConv2d(32, 64, 3, in_group=None if lifting else "p4")
    fan_in = 32 * (1 if lifting else 4) * 9
    assert layer.fan_in == fan_in
    w = layer.weight.detach()
    assert abs(float(w.std()) / math.sqrt(2 / fan_in) - 1) < 0.05
    assert abs(float(w.mean())) < 0.01
    assert torch.equal(layer.bias, torch.zeros(64))


def test_bias_is_one_per_channel_shared_over_the_group():
    layer = GroupConv2d(2, 3, 3, group="p4m")
    assert layer.bias.shape == (3,)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    y = layer(torch.randn(2, 2, 8, 5, 5))
    assert torch.equal(y, torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1, 1).expand_as(y))
    assert GroupConv2d(2, 3, 3, bias=False).bias is None


# ---- batch norm and pooling ----------------------------------------------------------------
@pytest.mark.parametrize("group", GROUPS)
def test_group_batch_norm_and_pooling_are_equivariant(group):
    n = len(group_elements(group))
    x = rand(3, 4, n, 10, 10)
    bn = randomize(GroupBatchNorm2d(4, group)).to(D)
    bn.train()
    assert max_equivariance_error(bn, x, group) < 1e-12  # batch statistics
    bn.eval()
    assert max_equivariance_error(bn, x, group) < 1e-12  # running statistics
    assert bn.running_mean.shape == (4,)
    assert max_equivariance_error(GroupMaxPool2d(2), x, group) < 1e-12  # (10 - 2) % 2 == 0
    assert max_equivariance_error(GroupAvgPool2d(3, 2, 1), rand(2, 2, n, 9, 9), group) < 1e-12
    assert max_equivariance_error(GroupMaxPool2d(3, 2, 1), rand(2, 2, n, 9, 9), group) < 1e-12
    # misaligned subsampling (10 + 2 - 3 = 9 is odd) breaks it
    assert max_equivariance_error(GroupMaxPool2d(3, 2, 1), x, group) > 1e-2
    assert GroupMaxPool2d(2)(x).shape == (3, 4, n, 5, 5)


@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("group", GROUPS)
def test_coset_pooling_gives_invariance(group, mode):
    n = len(group_elements(group))
    x = rand(2, 3, n, 7, 7)
    pool = GroupPool(mode)
    y = pool(x)
    assert y.shape == (2, 3, 7, 7)
    assert torch.equal(y, x.amax(2) if mode == "max" else x.mean(2))
    gpool = GroupGlobalPool(mode)
    assert isinstance(gpool, torch.nn.AdaptiveAvgPool2d)
    assert gpool(x).shape == (2, 3)
    for g in group_elements(group):
        gx = g.apply_group_map(x, group)
        # values no longer depend on the group axis: the map just moves spatially
        assert torch.allclose(pool(gx), g.apply_map(y), atol=1e-12)
        assert torch.allclose(gpool(gx), gpool(x), atol=1e-12)  # invariant vector
    # a lifted network with global group pooling is invariant
    net = torch.nn.Sequential(GroupConv2d(1, 4, 3, padding=1, group=group, in_group=None),
                              torch.nn.ReLU(), GroupGlobalPool(mode)).to(D)
    img = rand(2, 1, 9, 9)
    for g in group_elements(group):
        assert torch.allclose(net(g(img)), net(img), atol=1e-12)


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="G=4"):
        GroupConv2d(3, 2, 3, group="p4")(torch.randn(1, 3, 8, 9, 9))
    with pytest.raises(ValueError, match="G=8"):
        GroupConv2d(3, 2, 3, group="p4m")(torch.randn(1, 3, 4, 9, 9))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        GroupConv2d(3, 2, 3, in_group=None)(torch.randn(1, 3, 4, 9, 9))
    with pytest.raises(ValueError, match=r"2x2 pixels is too small for kernel_size=\(3, 3\)"):
        GroupConv2d(3, 2, 3, in_group=None)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="dilation=\\(2, 2\\)"):
        GroupConv2d(3, 2, 3, dilation=2)(torch.randn(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="square kernel"):
        GroupConv2d(3, 2, (3, 5))
    with pytest.raises(ValueError, match="in_group"):
        GroupConv2d(3, 2, 3, group="p4m", in_group="p4")
    with pytest.raises(ValueError, match="unknown group"):
        GroupConv2d(3, 2, 3, group="so2")
    with pytest.raises(ValueError, match="too small"):
        GroupMaxPool2d(2)(torch.randn(1, 2, 4, 1, 1))
    with pytest.raises(ValueError, match="G=4"):
        GroupBatchNorm2d(2, "p4")(torch.randn(2, 2, 8, 3, 3))
    with pytest.raises(ValueError, match="group feature map"):
        GroupGlobalPool()(torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="mode"):
        GroupPool("median")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_model("p4resnet44", depth=10)
    with pytest.raises(ValueError, match="group"):
        create_model("p4cnn", group="p6")
    with pytest.raises(ValueError, match="at least 28x28"):
        create_model("p4cnn")(torch.randn(1, 1, 27, 26))


# ---- models ------------------------------------------------------------------------------------
def test_models_are_registered_and_list_measurement_points():
    for name in ("z2cnn", "p4cnn", "resnet44", "p4resnet44", "resnet18", "p4resnet18"):
        assert name in list_models()
    assert isinstance(create_model("z2cnn"), CNN7)
    for name, kw in (("p4cnn", {}), ("p4resnet44", {"depth": 8, "width": 0.25}),
                     ("resnet44", {"depth": 8, "width": 0.25}), ("p4resnet18", {"width": 0.125}),
                     ("resnet18", {"width": 0.125})):
        model = create_model(name, **kw)
        modules = dict(model.named_modules())
        assert all(p in modules for p in model.equivision_layers), name
        assert model.equivision_layers[-2:] == ["pool", "fc"]
        assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d)


def test_parameter_counts_match_their_plain_counterparts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    z2, p4 = count(create_model("z2cnn")), count(create_model("p4cnn"))
    assert abs(p4 / z2 - 1) < 0.15, (z2, p4)
    assert create_model("p4cnn").width == 10 and create_model("p4cnn", group="p4m").width == 7
    r44, p44 = count(create_model("resnet44")), count(create_model("p4resnet44"))
    assert abs(p44 / r44 - 1) < 0.15, (r44, p44)
    t0 = time.perf_counter()
    full = create_model("p4resnet18")
    build = time.perf_counter() - t0
    assert build < 1.0, f"building P4ResNet-18 took {build:.2f} s"
    assert full.widths == [32, 64, 128, 256]
    r18 = count(create_model("resnet18", width=0.25))
    assert abs(count(create_model("p4resnet18", width=0.25)) / r18 - 1) < 0.15


def relative_error(model, size, dtype=D, batch=1, seed=0, elements=None) -> float:
    """max over rotations of ``|f(g x) - f(x)| / |f(x)|`` for the (invariant) logits."""
    model = randomize(model, seed).to(dtype).eval()
    x = rand(batch, model.in_channels, size, size, seed=seed, dtype=dtype)
    return max_equivariance_error(model, x, "p4", elements or [rot90(k) for k in (1, 2, 3)])


def test_p4cnn_exact_at_28_not_at_27_or_29():
    """28 -> 26, 24, (pool) 12, 10, 8, 6, 4, 1 at padding 0. At 29 the pool sees 25 px.
    At padding 0 a 27 px input leaves 3 px for the final 4x4 conv (too small), so 27 is
    checked with padding 1 (27 px before the pool), where 28 is exact as well."""
    torch.manual_seed(0)
    model = create_model("p4cnn")
    assert relative_error(model, 28) < 1e-12
    assert relative_error(model, 28, dtype=torch.float32, batch=4) < 1e-5
    assert relative_error(model, 29) > 1e-3
    with pytest.raises(ValueError, match="at least 28x28"):
        model(torch.randn(1, 1, 27, 27))
    padded = create_model("p4cnn", padding=1)
    assert relative_error(padded, 28) < 1e-12
    assert relative_error(padded, 27) > 1e-3
    assert relative_error(padded, 29) > 1e-3


def test_p4resnet44_exact_at_33_not_32():
    torch.manual_seed(0)
    model = create_model("p4resnet44", depth=8, width=0.25)
    assert relative_error(model, 33) < 1e-12
    assert relative_error(model, 32) > 1e-3


def test_p4resnet18_exact_at_225_not_224():
    torch.manual_seed(0)
    model = create_model("p4resnet18", width=0.125, num_classes=5)
    one = [rot90(1)]
    assert relative_error(model, 225, elements=one) < 1e-12
    assert relative_error(model, 224, elements=one) > 1e-3


def test_p4m_models_are_exact_under_flips():
    torch.manual_seed(0)
    model = randomize(create_model("p4cnn", group="p4m", width=3)).to(D).eval()
    assert max_equivariance_error(model, rand(1, 1, 28, 28), "p4m") < 1e-12


def test_measure_p4cnn_is_equivariant_and_invariant_at_every_layer():
    torch.manual_seed(0)
    model = randomize(create_model("p4cnn"))
    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.zeros(8).long())
    rep = measure(model, data, "rot90", progress=False)
    assert rep.meta["pool_layer"] == "pool"
    assert len(rep.results) == 3 * len(model.equivision_layers)
    for r in rep.results:
        assert r.exact, (r.transform, r.layer, r.note)
        assert r.metrics["equivariance"] > 1 - 1e-4, (r.transform, r.layer)
        assert r.metrics["invariance"] > 1 - 1e-4, (r.transform, r.layer)
    group_layers = [r for r in rep.results if len(r.shape) == 4]  # (C, G, h, w)
    assert len(group_layers) == 3 * 7
    # at 29 (odd size before the max pool) equivariance is broken after the pool: the
    # pool's grid is off centre, so rot90 there is flagged inexact (issue 11), not measured
    bad = measure(model, TensorDataset(torch.rand(8, 1, 29, 29)), "rot90:1", progress=False)
    last = model.equivision_layers[6]  # block 7's output: features.bn7 in the paper's layout
    assert not bad.get("rot90", last).exact
    assert "(i + 2p - k_eff) mod s != 0" in bad.get("rot90", last).note
