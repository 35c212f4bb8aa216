"""Models whose layers return channels-last maps (B, H, W, C) (ConvNeXt's LayerNorm and
Linear on a permuted map) and models with modules their forward never calls
(nn.TransformerEncoderLayer's out_proj): measured, and measured right, not refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from others_models import ConvNeXtBlock, PermutingNet, TinyConvNeXt, TorchEncoderViT
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from equivision.measure import measure
from equivision.measure.capture import MeasureError, trace_layers
from equivision.measure.lie import lie_derivative

CL_LEAVES = ["norm", "pwconv1", "act", "pwconv2"]


def noise(n: int = 8, size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n).long())


def convnext(kernel: int = 7, seed: int = 0) -> TinyConvNeXt:
    torch.manual_seed(seed)
    model = TinyConvNeXt(kernel=kernel).eval()
    with torch.no_grad():  # random affine LayerNorms, so that they are not near identity
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


class ChannelNorm(nn.Module):
    """The LayerNorm over channels of a (B, C, H, W) map, without permuting modules."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight[:, None, None] \
            + self.bias[:, None, None]


class Pointwise(nn.Module):
    """A Linear layer as a 1x1 convolution on a (B, C, H, W) map."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class TwinBlock(nn.Module):
    """:class:`ConvNeXtBlock` computed channels-first, with the same weights and names."""

    def __init__(self, block: ConvNeXtBlock) -> None:
        super().__init__()
        self.dwconv, self.act = block.dwconv, block.act
        self.norm = ChannelNorm(block.norm)
        self.pwconv1, self.pwconv2 = Pointwise(block.pwconv1), Pointwise(block.pwconv2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


def twin(model: TinyConvNeXt) -> TinyConvNeXt:
    out = convnext()
    out.load_state_dict(model.state_dict())
    out.stages = nn.Sequential(*[TwinBlock(b) for b in out.stages])
    return out.eval()


def test_channels_last_leaves_are_found_with_their_inputs():
    trace = trace_layers(convnext(), noise()[:][0])
    want = {f"stages.{i}.{n}" for i in range(2) for n in CL_LEAVES}
    assert trace.channels_last == want
    assert trace.channels_last_input == want
    assert not trace.looks_channels_last
    assert trace.strides["stages.1.pwconv2"].stride == (4.0, 4.0)


def test_channels_last_layers_measure_as_their_channels_first_twin():
    model = convnext()
    x = noise()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:][0]), twin(model)(x[:][0]), rtol=1e-5, atol=1e-5)
    names = [f"stages.0.{n}" for n in CL_LEAVES] + ["stages.1.pwconv2"]
    got = measure(model, x, "rot90,flip,shift:4", names, progress=False, ci_groups=0)
    ref = measure(twin(model), x, "rot90,flip,shift:4", names, progress=False, ci_groups=0)
    for r in ref.results:
        g = got.get(r.transform, r.layer)
        assert g.shape == r.shape == [32 if r.layer.endswith(("pwconv1", "act")) else 8, 4, 4]
        assert g.stride == r.stride == [4.0, 4.0]
        assert g.exact and r.exact
        for k, v in r.metrics.items():
            if v is not None:
                assert g.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (r.layer, k)


def test_pointwise_convnext_with_symmetric_stem_is_exactly_rotation_equivariant():
    model = convnext(kernel=1)
    with torch.no_grad():  # a D4-symmetric stem: every layer commutes with rot90 and flips
        w = model.stem.weight
        w.copy_(sum(torch.rot90(v, k, (2, 3)) for v in (w, w.flip(3)) for k in range(4)) / 8)
    rep = measure(model, noise(), "rot90,flip", progress=False, ci_groups=0)
    spatial = [r for r in rep.results if len(r.shape) == 3]
    assert {r.layer for r in spatial} >= {f"stages.1.{n}" for n in CL_LEAVES}
    for r in spatial:
        assert r.exact and r.metrics["equivariance"] > 1 - 1e-5, (r.transform, r.layer)


def test_output_that_only_looks_channels_last_is_skipped_with_a_reason():
    torch.manual_seed(0)
    rep = measure(PermutingNet().eval(), noise(), "rot90,shift:1", progress=False,
                  ci_groups=0)
    assert "looks channels-last" in rep.meta["skipped"]["to_last"]
    assert "to_last" not in rep.layers
    assert rep.get("rot90", "norm").shape == [5, 16, 16]  # the LayerNorm after it is read


def test_modules_the_forward_never_calls_are_skipped_and_said():
    torch.manual_seed(0)
    model = TorchEncoderViT().eval()
    rep = measure(model, noise(), "rot90,shift:4", progress=False, ci_groups=0)
    for i in range(2):
        assert "never called" in rep.meta["skipped"][f"blocks.{i}.self_attn.out_proj"]
    assert rep.get("shift(4,4)", "patch_embed").metrics["equivariance"] == pytest.approx(1.0)
    pool = rep.meta["pool_layer"]
    assert pool == "head:input" and rep.get("rot90", pool).part == "Pool"
    with pytest.raises(MeasureError, match="never called"):
        measure(model, noise(), "rot90", ["blocks.0.self_attn.out_proj"], progress=False)


def test_lie_derivative_of_channels_last_layers_equals_their_twin():
    model, x = convnext(), noise(4)[:][0]
    names = [f"stages.0.{n}" for n in CL_LEAVES]
    got = lie_derivative(model, x, "tx,rotate", names, decompose=False)
    ref = lie_derivative(twin(model), x, "tx,rotate", names, decompose=False)
    a = {(r.layer, r.generator): r.value for r in got.layer_rows()}
    b = {(r.layer, r.generator): r.value for r in ref.layer_rows()}
    assert set(a) == set(b) and len(a) == 2 * len(names) + 2
    for k, v in b.items():
        assert a[k] == pytest.approx(v, rel=1e-3, abs=1e-6), k


def test_lie_decomposition_attributes_channels_last_leaves_as_their_twin():
    """Every channels-last leaf gets the contribution its channels-first twin gets; what
    stays unattributed (the mean in ``forward``, the residual add) is the same."""
    model, x = convnext(), noise(3)[:][0]
    got = lie_derivative(model, x, "tx,rotate")
    ref = lie_derivative(twin(model), x, "tx,rotate")
    a = {(r.layer, r.generator): r for r in got.layer_rows("contribution")}
    b = {(r.layer, r.generator): r for r in ref.layer_rows("contribution")}
    assert set(a) == set(b)
    for n in CL_LEAVES:
        for gen in ("tx", "rotate"):
            r = a[f"stages.0.{n}", gen]
            assert not r.note and r.value is not None and r.value > 0, (n, gen)
    for k, r in b.items():
        assert a[k].value == pytest.approx(r.value, rel=1e-3, abs=1e-6), k


def test_sequence_first_tokens_measure_as_their_batch_first_twin():
    """A ``batch_first=False`` transformer's blocks return (N, B, C): measured as the same
    weights with ``batch_first=True``; the attention's inner outputs whose first axis is
    not the batch are skipped with their reason."""
    torch.manual_seed(0)
    first = TorchEncoderViT().eval()
    seq = TorchEncoderViT(batch_first=False).eval()
    seq.load_state_dict(first.state_dict())
    x = noise(6)
    with torch.no_grad():
        torch.testing.assert_close(seq(x[:][0]), first(x[:][0]))
    trace = trace_layers(seq, x[:][0])
    assert "blocks.0" in trace.sequence_first and "blocks.1.norm2" in trace.sequence_first
    names = ["patch_embed", "blocks.0", "blocks.1", "blocks.1.linear1", "head"]
    got = measure(seq, x, "rot90,shift:4", names, progress=False, ci_groups=0)
    ref = measure(first, x, "rot90,shift:4", names, progress=False, ci_groups=0)
    assert got.layers == ref.layers
    for r in ref.results:
        g = got.get(r.transform, r.layer)
        assert g.shape == r.shape and g.exact == r.exact
        for k, v in r.metrics.items():
            if v is not None:
                assert g.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (r.layer, k)


def test_an_output_whose_first_axis_is_not_the_batch_is_skipped():
    class HeadsFirst(nn.Module):
        """Folds its channel groups into the batch axis: (B * 2, 2, H, W)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fold = nn.Identity()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            heads = self.fold(y.reshape(-1, 2, *y.shape[-2:]))
            return self.fc(heads.reshape(len(x), 4, -1).mean(-1))

    model = HeadsFirst()
    rep = measure(model.eval(), noise(), "rot90", progress=False, ci_groups=0,
                  layers=["conv", "fold", "fc"])
    assert "first axis is not the batch" in rep.meta["skipped"]["fold"]
    assert rep.get("rot90", "conv").exact
