"""The 7-layer Z2CNN / P4CNN block layouts (issue 13): Edixhoven et al.'s "ReLU and then
batch norm, dropout after layers 1-5" as the default of ``z2cnn`` and ``p4cnn``, the
original "batch norm, ReLU, dropout after all 7" as ``cnn7``'s; measurement points,
exactness, export and measurement in both layouts."""

from __future__ import annotations

import pytest
import torch
from test_gcnn import randomize
from torch import nn
from torch.utils.data import TensorDataset

from equivision.gcnn import GroupBatchNorm2d, GroupConv2d
from equivision.gcnn.exactness import (
    EXACT,
    NOT_EXACT,
    analyze_exactness,
    empirical_equivariance_error,
)
from equivision.gcnn.export import export
from equivision.measure import measure
from equivision.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = {"order": "relu-bn", "dropout_layers": 5}
ORIGINAL = {"order": "bn-relu", "dropout_layers": 7}
LAYOUTS = {"paper": PAPER, "bn-relu": ORIGINAL}
CONV = (nn.Conv2d, GroupConv2d)
NORM = (nn.BatchNorm2d, GroupBatchNorm2d)


def kinds(model: nn.Module) -> str:
    """The features as one letter per module: c conv, b batch norm, r ReLU, d dropout,
    m max pool; e.g. ``"crbd"`` per block in the paper's layout."""
    letters = []
    for m in model.features:
        letters.append("c" if isinstance(m, CONV) else "b" if isinstance(m, NORM) else
                       "r" if isinstance(m, nn.ReLU) else "d" if isinstance(m, nn.Dropout)
                       else "m")
    return "".join(letters)


def block_outputs(model: nn.Module) -> list[str]:
    """The last module of each conv block before any dropout / max pool: the block's
    output in eval mode."""
    names = [n for n, _ in model.features.named_children()]
    outs = []
    for i, name in enumerate(names):
        nxt = names[i + 1] if i + 1 < len(names) else None
        if name.startswith(("bn", "relu")) and (nxt is None or nxt.startswith(
                ("conv", "drop", "maxpool"))):
            outs.append(f"features.{name}")
    return outs


@pytest.mark.parametrize("name", ["z2cnn", "p4cnn"])
def test_z2cnn_and_p4cnn_default_to_the_papers_layout(name):
    model = create_model(name)
    assert (model.order, model.dropout_layers) == ("relu-bn", 5)
    # conv, ReLU, batch norm; dropout after layers 1-5 only; the max pool after layer 2
    assert kinds(model) == "crbd" + "crbdm" + "crbd" * 3 + "crb" * 2
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)] == [
        f"features.drop{i}" for i in range(1, 6)]
    assert all(m.p == pytest.approx(0.3) for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.equivision_layers == [f"features.bn{i}" for i in range(1, 8)] + ["pool", "fc"]
    assert model.equivision_layers[:7] == block_outputs(model)


def test_cnn7_keeps_its_layout_and_names():
    model = create_model("cnn7")
    assert (model.order, model.dropout_layers) == ("bn-relu", 7)
    assert kinds(model) == "cbrd" + "cbrdm" + "cbrd" * 5
    assert model.equivision_layers == [f"features.relu{i}" for i in range(1, 8)] + ["pool", "fc"]
    # the same parameters as before the option, drawn in the same order
    torch.manual_seed(0)
    a = create_model("cnn7")
    torch.manual_seed(0)
    b = create_model("z2cnn", **ORIGINAL)
    assert kinds(b) == kinds(a) and b.equivision_layers == a.equivision_layers
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


@pytest.mark.parametrize("name", ["cnn7", "z2cnn", "p4cnn"])
@pytest.mark.parametrize("order", ["relu-bn", "bn-relu"])
@pytest.mark.parametrize("k", [0, 3, 7])
def test_every_layout_names_its_block_outputs(name, order, k):
    model = create_model(name, width=2, order=order, dropout_layers=k)
    assert model.equivision_layers[:7] == block_outputs(model)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == k


@pytest.mark.parametrize("name", ["z2cnn", "p4cnn"])
def test_the_papers_layout_computes_relu_then_batch_norm(name):
    """In eval mode block 1's output is bn(relu(conv(x))): it has negative values (a
    ReLU output has none) and equals the composition computed by hand."""
    torch.manual_seed(0)
    model = randomize(create_model(name, width=4)).eval()
    x = torch.randn(2, 1, 28, 28)
    seen = {}
    hook = model.features.bn1.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(x)
        f = model.features
        ref = f.bn1(torch.relu(f.conv1(x)))
    hook.remove()
    assert torch.equal(seen["out"], ref) and (ref < 0).any()


@pytest.mark.parametrize("bad, match", [
    ({"order": "relu_bn"}, r"order must be 'relu-bn' .* or 'bn-relu' .*got 'relu_bn'"),
    ({"order": None}, "order must be"),
    ({"dropout_layers": 8}, r"dropout_layers must be an integer from 0 to 7 .*got 8"),
    ({"dropout_layers": -1}, "dropout_layers must be"),
    ({"dropout_layers": True}, "dropout_layers must be"),
    ({"dropout_layers": 5.0}, "dropout_layers must be"),
])
@pytest.mark.parametrize("name", ["cnn7", "z2cnn", "p4cnn"])
def test_bad_layout_arguments_give_one_line(name, bad, match):
    with pytest.raises(ValueError, match=match) as err:
        create_model(name, **bad)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(("cnn7:", "p4cnn:"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_p4cnn_exact_at_28_not_29_in_both_layouts(layout):
    model = randomize(create_model("p4cnn", width=3, **LAYOUTS[layout]))
    assert analyze_exactness(model, 28).verdict == EXACT
    assert analyze_exactness(model, 29).verdict == NOT_EXACT
    assert empirical_equivariance_error(model, 28) < 1e-12
    assert empirical_equivariance_error(model, 29) > 1e-3
    assert analyze_exactness(create_model("z2cnn", width=3), 28).verdict != EXACT


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_equals_p4cnn_in_both_layouts(layout):
    torch.manual_seed(0)
    model = randomize(create_model("p4cnn", **LAYOUTS[layout])).eval()
    x = torch.randn(3, 1, 28, 28)
    plain = export(model, x)
    assert not any(isinstance(m, (GroupConv2d, GroupBatchNorm2d)) for m in plain.modules())
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max() <= 1e-6


def test_measure_p4cnn_paper_layout_is_exact_at_every_block():
    torch.manual_seed(0)
    model = randomize(create_model("p4cnn", width=3))
    data = TensorDataset(torch.rand(4, 1, 28, 28), torch.zeros(4).long())
    rep = measure(model, data, "rot90:1", progress=False)
    assert [r.layer for r in rep.results] == model.equivision_layers
    for r in rep.results:
        assert r.exact and r.metrics["mse"] < 1e-9, (r.layer, r.note)
