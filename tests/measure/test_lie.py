"""The Lie derivative: exact zeros on isotropic CNNs, finite differences, both AD modes,
the layer-wise decomposition, models written the way others write them, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from others_models import MeanPoolCNN, TinyResNet, TinyViT
from torch import Tensor, nn

from equivision.gcnn.layers import P4ConvP4, P4ConvZ2
from equivision.measure.lie import OUTPUT, lie_derivative
from equivision.measure.lie_decompose import UNATTRIBUTED
from equivision.measure.lie_generators import GENERATORS, image_tangent, map_tangent
from equivision.measure.lie_validation import smooth_blobs, stencil_cnn
from equivision.registry import UnknownNameError
from equivision.transforms import Layout, Rotation, Scale, SubpixelShift


def cnn(isotropic: bool, relu: bool = True, seed: int = 0) -> nn.Sequential:
    return stencil_cnn(isotropic, relu, seed)


def blobs(n: int = 6, size: int = 32, seed: int = 0) -> Tensor:
    return smooth_blobs(n, size, seed)


def layer_values(report, generator: str) -> list[float]:
    return [r.value for r in report.layer_rows() if r.generator == generator]


def test_isotropic_linear_cnn_has_zero_rotation_lie_derivative():
    x = blobs()
    iso = lie_derivative(cnn(True, relu=False), x, "rotate", margin=4, decompose=False)
    rnd = lie_derivative(cnn(False, relu=False), x, "rotate", margin=4, decompose=False)
    assert max(layer_values(iso, "rotate")[:3]) < 1e-10  # the conv maps: exactly 0
    assert max(layer_values(iso, "rotate")) < 1e-7  # pooled: what the border leaves
    assert min(layer_values(rnd, "rotate")[:3]) > 0.05  # the three conv layers


def test_isotropic_relu_cnn_far_below_random_kernels():
    """With ReLU the discrete generator is not a derivation (kinks, aliasing), so the
    isotropic CNN is not at 0, but far below the same CNN with random kernels."""
    x = blobs()
    for seed in range(2):
        iso = layer_values(lie_derivative(cnn(True, seed=seed), x, "rotate", margin=4,
                                          decompose=False), "rotate")
        rnd = layer_values(lie_derivative(cnn(False, seed=seed), x, "rotate", margin=4,
                                          decompose=False), "rotate")
        assert iso[0] < 1e-8  # the first conv, before any nonlinearity
        assert sum(iso[:6]) < 0.6 * sum(rnd[:6])
        assert iso[-1] < 0.6 * rnd[-1]  # the invariant output


def _fd(f, x: Tensor, act, eps: float) -> Tensor:
    return (f(act(eps, x)) - f(act(-eps, x))) / (2 * eps)


@pytest.mark.parametrize("gen,act", [
    ("rotate", lambda e, x: Rotation(math.degrees(e))(x)),
    ("scale", lambda e, x: Scale(math.exp(e))(x)),
    ("tx", lambda e, x: SubpixelShift(e, 0.0)(x)),
    ("ty", lambda e, x: SubpixelShift(0.0, e)(x)),
    ("brightness", lambda e, x: x + e),
    ("contrast", lambda e, x: x * math.exp(e)),
])
def test_output_lie_derivative_agrees_with_finite_differences(gen, act):
    model = cnn(False).eval()
    x = blobs(3) + 0.05
    report = lie_derivative(model, x, gen, decompose=False)
    fd = _fd(model, x, act, 1e-4)
    expected = fd.norm(dim=1).mean().item()
    got = next(r.absolute for r in report.layer_rows() if r.layer == OUTPUT)
    assert got == pytest.approx(expected, rel=2e-2)


def test_strided_layer_lie_derivative_agrees_with_finite_differences():
    """``d/dt g_t^-1 f_l(g_t x)`` with the bilinear transforms acting on a stride-2 map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(4, 4, 3, 2, 1), nn.Tanh()).double().eval()
    x = blobs(2, 24)
    report = lie_derivative(model, x, "rotate,tx", layers=["3"], decompose=False)
    for gen, make in (("rotate", lambda e: Rotation(math.degrees(e))),
                      ("tx", lambda e: SubpixelShift(e, 0.0))):
        def back(e, xx, make=make):
            return make(e).inverse().apply_map(model(make(e)(xx)), 2)
        eps = 1e-4
        delta = (back(eps, x) - back(-eps, x)) / (2 * eps)
        rel = (delta.flatten(1).norm(dim=1) / model(x).flatten(1).norm(dim=1)).mean().item()
        assert report.value("3", gen) == pytest.approx(rel, rel=3e-2)


def test_map_generator_matches_the_transforms_and_scales_with_stride():
    h = blobs(1, 20)
    eps = 1e-5
    for stride in (1, 2):
        lay = Layout("map", (float(stride),) * 2)
        fd = (SubpixelShift(eps, 0).apply_map(h, stride)
              - SubpixelShift(-eps, 0).apply_map(h, stride)) / (2 * eps)
        torch.testing.assert_close(map_tangent(h, lay, GENERATORS.get("tx")), fd,
                                   rtol=0, atol=1e-6)
    assert torch.equal(image_tangent(h, GENERATORS.get("brightness")), torch.ones_like(h))
    assert not map_tangent(h, Layout("map"), GENERATORS.get("brightness")).any()
    with pytest.raises(ValueError, match="rotation axis"):
        map_tangent(torch.zeros(1, 2, 4, 5, 5), Layout("group", group="p4"),
                    GENERATORS.get("rotate"))


def test_generators_share_a_maps_central_differences_through_the_cache():
    h = blobs(2, 12).double()
    for lay in (Layout("map", (2.0, 2.0)), Layout("tokens", (4.0, 4.0), grid=(3, 4), prefix=1)):
        x = h[:1, :1].reshape(1, 1, 12, 12)
        if lay.kind == "tokens":  # 1 prefix token + a 3 x 4 grid, 5 channels
            x = torch.randn(2, 13, 5, dtype=torch.float64, generator=torch.Generator()
                            .manual_seed(1))
        cache: dict = {}
        for name in ("tx", "ty", "rotate", "scale"):
            g = GENERATORS.get(name)
            alone = map_tangent(x, lay, g)
            shared = map_tangent(x, lay, g, cache)
            torch.testing.assert_close(shared, alone, rtol=0, atol=0)
        assert sorted(cache) == [-2, -1]  # one difference per axis, reused four times
        before = {k: v.clone() for k, v in cache.items()}
        map_tangent(x, lay, GENERATORS.get("rotate"), cache)
        assert all(torch.equal(cache[k], before[k]) for k in cache)  # never scaled in place


def test_forward_and_double_backward_agree_on_a_torchvision_style_resnet():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.rand(4, 3, 16, 16)
    fwd = lie_derivative(model, x, "tx,rotate,brightness", mode="forward", decompose=False)
    dbl = lie_derivative(model, x, "tx,rotate,brightness", mode="double-backward",
                         decompose=False)
    assert fwd.meta["mode"] == "forward" and dbl.meta["mode"] == "double-backward"
    for a, b in zip(fwd.layer_rows(), dbl.layer_rows()):
        assert (a.layer, a.generator) == (b.layer, b.generator)
        assert a.value == pytest.approx(b.value, rel=1e-4, abs=1e-7)
    # the in-place ReLU after bn1 does not overwrite bn1's output
    rows = {(r.layer, r.generator): r for r in fwd.layer_rows()}
    assert rows["bn1", "tx"].absolute > 1.2 * rows["relu", "tx"].absolute


@pytest.mark.parametrize("make", [lambda: cnn(False).float(), TinyResNet])
def test_decomposition_sums_to_the_output_lie_derivative(make):
    """Chains and residual networks (in-place ReLU, ``+=``): the leaves' contributions add
    up to the output's Lie derivative; nothing is left unattributed."""
    torch.manual_seed(0)
    model = make()
    c = 1 if isinstance(model, nn.Sequential) else 3
    report = lie_derivative(model, torch.rand(5, c, 16, 16), "tx,rotate,brightness")
    for gen in ("tx", "rotate", "brightness"):
        total = next(r.absolute for r in report.layer_rows() if r.layer == OUTPUT
                     and r.generator == gen)
        rest = report.value(UNATTRIBUTED, gen, kind="contribution")
        assert total > 1e-5 and rest < 1e-4 * total
    # brightness acts on the image only: the first conv carries the whole error
    first = report.layer_rows("contribution")[0]
    assert report.value(first.layer, "brightness", "contribution") == pytest.approx(
        next(r.absolute for r in report.layer_rows() if r.layer == OUTPUT
             and r.generator == "brightness"), rel=1e-4)


def test_functional_pooling_is_unattributed_and_probes_estimate_the_norm():
    torch.manual_seed(0)
    model = MeanPoolCNN()
    x = torch.rand(4, 3, 12, 12)
    exact = lie_derivative(model, x, "scale")
    assert exact.value(UNATTRIBUTED, "scale", "contribution") > 1e-6  # x.mean((2, 3))
    probed = lie_derivative(model, x, "scale", max_outputs=1, probes=256)
    for a, b in zip(exact.layer_rows("contribution"), probed.layer_rows("contribution")):
        assert b.value == pytest.approx(a.value, rel=0.3, abs=1e-6)
        assert "probes" in b.note


class SDPAViT(TinyViT):
    """TinyViT whose attention is ``F.scaled_dot_product_attention`` (its fused CPU kernel
    has no forward-mode formula in PyTorch 2.x)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        q = self.blocks[0].norm1(x)[:, None]  # (B, 1, N, D): one head
        x = x + F.scaled_dot_product_attention(q, q, q)[:, 0]
        return self.head(self.norm(x)[:, 0])


def test_vits_tokens_attention_maps_and_fused_attention():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    report = lie_derivative(TinyViT(), x, "tx,rotate")
    skipped = report.meta["skipped"]
    assert any("softmax" in k and "tokens x tokens" in v for k, v in skipped.items())
    row = next(r for r in report.layer_rows() if r.layer == "blocks.0.norm1")
    assert row.shape == [16, 4, 4] and row.value > 0  # 17 tokens: [CLS] + a 4x4 grid
    model = SDPAViT()
    fallback = lie_derivative(model, x, "tx", mode="forward")
    assert fallback.meta["mode"] == "forward (math attention)"
    dbl = lie_derivative(model, x, "tx")
    assert dbl.meta["mode"] == "double-backward"
    out = [next(r.absolute for r in rep.layer_rows() if r.layer == OUTPUT)
           for rep in (fallback, dbl)]
    assert out[0] > 0 and out[0] == pytest.approx(out[1], rel=1e-4)


def test_report_files_and_bad_input(tmp_path):
    report = lie_derivative(cnn(False).float(), torch.rand(2, 1, 12, 12), "tx",
                            decompose=False, model_name="toy")
    files = report.save(tmp_path / "lie")
    data = json.loads(files["json"].read_text())
    assert data["model"] == "toy" and data["generators"] == ["tx"]
    assert files["csv"].read_text().startswith("layer,generator,kind")
    assert "tx" in report.table()
    with pytest.raises(UnknownNameError, match="rotate"):
        lie_derivative(cnn(False), torch.rand(2, 1, 8, 8), "rotat")
    with pytest.raises(ValueError, match="B, C, H, W"):
        lie_derivative(cnn(False), torch.rand(2, 8, 8), "tx")
    with pytest.raises(ValueError, match="mode"):
        lie_derivative(cnn(False), torch.rand(2, 1, 8, 8).double(), "tx", mode="reverse")


class TinyP4(nn.Module):
    """Lifting and group convolutions, pooling over the group axis and space."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = P4ConvZ2(1, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.gconv = P4ConvP4(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gconv(self.relu(self.lift(x)))  # (B, 3, 4, H, W)
        return self.fc(h.amax(2).mean((2, 3)))


def test_group_maps_translations_measured_rotations_said_why():
    torch.manual_seed(0)
    report = lie_derivative(TinyP4(), torch.rand(3, 1, 10, 10), "tx,rotate")
    assert report.value("lift", "tx") > 0 and report.value("gconv", "tx") > 0
    row = next(r for r in report.layer_rows() if r.layer == "lift" and r.generator == "rotate")
    assert row.value is None and "rotation axis" in report.meta["skipped"]["lift / rotate"]
    # the decomposition keeps each leaf's translation share and names what it cannot split
    assert report.value("gconv", "tx", "contribution") is not None
    notes = [r for r in report.layer_rows("contribution") if r.note.startswith("not attributed")]
    assert {(r.layer, r.generator) for r in notes} >= {("lift", "rotate"), ("gconv", "rotate")}
    assert report.value("gconv", "rotate", "contribution") is None
