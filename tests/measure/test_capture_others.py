"""Capture on models the project did not write (issue 11): in-place ops, 1 x 1 pooled
maps, scale-free constant channels, attention maps."""

import copy

import pytest
import torch
from others_models import MeanPoolCNN, ScaledConv, TinyResNet, TinyViT
from torch.utils.data import TensorDataset

from equivision.measure import LayerCapture, measure
from equivision.measure.capture import MeasureError, unknown_layout
from equivision.measure.lie import lie_derivative


def noise(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n).long())


def resnet():
    torch.manual_seed(0)
    return TinyResNet().eval()


def test_bn_before_inplace_relu_keeps_its_own_output():
    model = resnet()
    x = noise()[:][0]
    with LayerCapture(model, ["bn1", "layer1.bn2", "layer1.conv2"]) as cap:
        got = cap.run(x)
    with torch.no_grad():
        pre = model.bn1(model.conv1(x))
        bn2 = model.layer1.bn2(got["layer1.conv2"])
    assert (pre < 0).any()  # the ReLU would have changed it
    torch.testing.assert_close(got["bn1"], pre)
    torch.testing.assert_close(got["layer1.bn2"], bn2)  # not the residual sum


def test_pooled_1x1_output_is_a_vector_measurable_under_every_shift():
    rep = measure(resnet(), noise(), "shift:1-3", ["conv1", "layer2.bn2", "avgpool", "fc"],
                  progress=False)
    for t in rep.transforms:
        r = rep.get(t, "avgpool")
        assert r.exact, r.note
        assert r.part == "Pool"
        assert r.shape == [16]
        assert rep.get(t, "fc").part == "Final"
    assert "Pool" in rep.part_summary()
    assert rep.part_summary()["Pool"]["invariance"] is not None


def test_attention_maps_of_a_token_model_are_skipped_with_a_note():
    torch.manual_seed(0)
    rep = measure(TinyViT(), noise(), "rot90:1", token_grid=(4, 4, 1), progress=False)
    skipped = rep.meta["skipped"]
    assert set(skipped) == {"blocks.0.attn.softmax", "blocks.1.attn.softmax"}
    assert not any("softmax" in layer for layer in rep.layers)
    assert {"patch_embed", "blocks.0.norm1", "blocks.1.mlp.2", "head"} <= set(rep.layers)
    assert rep.get("rot90", "blocks.0.norm1").shape == [16, 4, 4]  # [CLS] dropped
    assert all(r.exact for r in rep.results)
    assert rep.table().count("not measured") == 2


def test_inplace_relu_after_conv_in_a_functional_pool_model():
    torch.manual_seed(0)
    model = MeanPoolCNN().eval()
    x = noise()[:][0]
    with LayerCapture(model, ["conv2"]) as cap:
        got = cap.run(x)["conv2"]
    with torch.no_grad():
        ref = model.conv2(torch.relu(model.conv1(x)))
    assert (ref < 0).any()
    torch.testing.assert_close(got, ref)
    rep = measure(model, noise(), "shift:1-2", progress=False)
    assert all(r.exact for r in rep.results)


@pytest.mark.parametrize("shape, counts, skip", [
    ((2, 2, 17, 17), {17}, True),
    ((2, 2, 17, 16), {17, 16}, True),
    ((2, 2, 4, 4), {17}, False),   # a map in a token model
    ((2, 17, 8), {17}, False),     # the tokens themselves
    ((2, 8, 17, 17), set(), False),  # no token model: a 17 x 17 map
])
def test_unknown_layout_rule(shape, counts, skip):
    assert (unknown_layout(torch.zeros(shape), counts) is not None) == skip


def scaled_net(scale):
    torch.manual_seed(0)
    conv1, conv2 = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1)
    return torch.nn.Sequential(conv1, torch.nn.ReLU(), ScaledConv(conv2, scale)).eval()


def test_constant_channels_do_not_depend_on_the_layers_scale():
    one = measure(scaled_net(1.0), noise(), "rot90:1,shift:1", ["2"], progress=False)
    tiny = measure(scaled_net(1e-5), noise(), "rot90:1,shift:1", ["2"], progress=False)
    for a, b in zip(one.results, tiny.results, strict=True):
        assert b.n_constant == a.n_constant == 0
        for k in ("invariance", "equivariance", "cosine", "nmse"):
            assert b.metrics[k] == pytest.approx(a.metrics[k], rel=1e-4, abs=1e-6), k
        assert b.metrics["mse"] == pytest.approx(a.metrics["mse"] * 1e-10, rel=1e-3)
        assert b.metrics["l1"] == pytest.approx(a.metrics["l1"] * 1e-5, rel=1e-3)
        assert b.metrics["activation"] == pytest.approx(a.metrics["activation"] * 1e-5, rel=1e-3)


def test_torchscript_models_are_refused_with_what_to_pass():
    """A scripted or traced model runs compiled code: hooks on its layers never fire, so
    measuring it would report every layer 'never called' (traced) or fail inside torch
    (scripted); both get one line asking for the nn.Module."""
    model = TinyResNet().eval()
    for compiled in (torch.jit.script(model), torch.jit.trace(model, torch.rand(1, 3, 16, 16))):
        with pytest.raises(MeasureError, match="TorchScript module.*original nn.Module"):
            measure(compiled, noise(), "rot90", progress=False)
        with pytest.raises(MeasureError, match="TorchScript module"):
            lie_derivative(compiled, torch.rand(2, 3, 16, 16), "tx")


def test_a_float64_or_bfloat16_model_is_fed_its_own_dtype():
    """Images arrive as float32; a float64 model (exactness checks) or a bfloat16 one is
    measured on images cast to its dtype, with the float32 twin's numbers (bfloat16's 8
    bits of mantissa: the first convolutions only)."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    ref = measure(model, noise(), "rot90,shift:1", progress=False, ci_groups=0)
    for dtype, tol in ((torch.float64, 1e-4), (torch.bfloat16, 0.03)):
        got = measure(copy.deepcopy(model).to(dtype), noise(), "rot90,shift:1", progress=False,
                      ci_groups=0)
        for r in ref.results:
            g = got.get(r.transform, r.layer)
            if r.exact and (dtype == torch.float64 or r.layer in ("conv1", "layer1.conv1")):
                assert g.metrics["equivariance"] == pytest.approx(
                    r.metrics["equivariance"], abs=tol), (dtype, r.layer)
        lie = lie_derivative(copy.deepcopy(model).to(dtype), noise()[:][0], "tx")
        assert lie.value("fc", "tx") == pytest.approx(
            lie_derivative(model, noise()[:][0], "tx").value("fc", "tx"), rel=10 * tol)
