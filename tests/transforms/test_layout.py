"""transforms/layout.py: the one place that knows a tensor's layout and stride."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch import nn

from equivision.robust.defenses import default_transforms
from equivision.robust.views import FeatureExtractor, align_view
from equivision.transforms import (
    Layout,
    LayoutError,
    Resize,
    Translation,
    infer_layout,
    infer_strides,
    local_stride,
    map_to_tokens,
    rot90,
    size_stride,
    tokens_to_map,
)
from equivision.transforms.layout import as_map


def test_infer_layout_of_each_kind():
    assert infer_layout(torch.rand(2, 5)) == Layout("vector")
    assert infer_layout(torch.rand(2, 3, 7, 7), (28, 28)) == Layout("map", (4.0, 4.0))
    assert infer_layout(torch.rand(2, 3, 7, 7)) == Layout("map", (1.0, 1.0))
    assert infer_layout(torch.rand(2, 3, 7, 7), (28, 28), stride=2) == Layout("map", (2.0, 2.0))
    assert infer_layout(torch.rand(2, 3, 4, 5, 5), (10, 10)) == Layout(
        "group", (2.0, 2.0), group="p4")
    assert infer_layout(torch.rand(2, 3, 8, 5, 5)).group == "p4m"
    tok = infer_layout(torch.rand(2, 1 + 16, 6), (16, 16), token_grid=(4, 4, 1))
    assert tok == Layout("tokens", (4.0, 4.0), grid=(4, 4), prefix=1)
    with pytest.raises(LayoutError, match="token_grid"):
        infer_layout(torch.rand(2, 16, 6))
    with pytest.raises(LayoutError, match="token_grid"):
        infer_layout(torch.rand(2, 17, 6), token_grid=(4, 4))
    with pytest.raises(LayoutError, match="group axis of size 3"):
        infer_layout(torch.rand(2, 3, 3, 5, 5))
    with pytest.raises(LayoutError, match="6-D"):
        infer_layout(torch.rand(1, 1, 1, 1, 1, 1))


def test_layout_carries_target_size():
    lay = Layout("map", (4.0, 4.0)).with_size((7, 7))
    assert lay.size == (7, 7) and lay.stride == (4.0, 4.0)
    assert lay.with_size(None).size is None
    # the size makes an undone resize land on it; other transformations ignore it
    f = torch.rand(1, 2, 5, 5)
    assert Resize(1 / 0.6).act(f, lay).shape[-2:] == (7, 7)
    assert Resize(1 / 0.6).act(f, Layout("map", (4.0, 4.0))).shape[-2:] == (8, 8)
    assert torch.equal(rot90().act(f, lay), rot90().apply_map(f))
    g = torch.rand(1, 2, 4, 5, 5)
    assert Resize(2.0).act(g, Layout("group", group="p4", size=(9, 9))).shape == (1, 2, 4, 9, 9)


def test_token_map_round_trip_and_token_action():
    x = torch.rand(2, 1 + 12, 5)
    m = tokens_to_map(x, (3, 4), prefix=1)
    assert m.shape == (2, 5, 3, 4)
    assert torch.equal(m[:, :, 1, 2], x[:, 1 + 1 * 4 + 2])  # row-major grid
    assert torch.equal(map_to_tokens(m), x[:, 1:])
    lay = infer_layout(x, token_grid=(3, 4, 1))
    mapped, map_lay = as_map(x, lay)
    assert torch.equal(mapped, m) and map_lay.kind == "map" and map_lay.prefix == 0
    shift = Translation(1, 0)
    moved = shift.act(x, lay)
    assert torch.equal(moved[:, :1], x[:, :1])  # [CLS] left as it is
    assert torch.equal(tokens_to_map(moved, (3, 4), 1), shift.apply_map(m))
    with pytest.raises(LayoutError, match="grid"):
        tokens_to_map(x, (3, 3), prefix=1)


def test_strides_from_sizes_and_layers():
    assert size_stride((28, 28), (7, 7)) == (4.0, 4.0)
    assert size_stride((26, 26), (7, 7)) == (4.0, 4.0)
    # an enlargement (functional upsampling) has the exact ratio, as an upsampling layer
    # has (it was rounded up to 1, so a whole shift of the input looked whole on the map)
    assert size_stride((10, 10), (20, 20)) == (0.5, 0.5)
    assert size_stride((28, 28), (32, 32)) == (0.875, 0.875)
    assert size_stride((28, 28), (26, 26)) == (1.0, 1.0)  # a valid conv shrink
    conv = nn.Conv2d(1, 1, 3, stride=2)
    assert local_stride(conv, (12, 12), (5, 5)) == (2.0, 2.0)
    assert local_stride(nn.ReLU(), (12, 12), (10, 10)) == (1.0, 1.0)  # valid conv shrink
    assert local_stride(nn.Upsample(scale_factor=2), (6, 6), (12, 12)) == (0.5, 0.5)
    # a 2x2 pool then a valid 5x5 conv: 12 -> 6 -> 2 has stride 2, not the size ratio 6
    modules = {"pool": nn.MaxPool2d(2), "conv": nn.Conv2d(1, 1, 5)}
    strides = infer_strides(["pool", "conv"], modules, {"pool": (12, 12), "conv": (6, 6)},
                            {"pool": (6, 6), "conv": (2, 2)}, (12, 12))
    assert strides == {"pool": (2.0, 2.0), "conv": (2.0, 2.0)}
    assert size_stride((12, 12), (2, 2)) == (6.0, 6.0)


def _two_stride2_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1),
                         nn.ReLU()).eval()


@pytest.mark.parametrize("px, side", [(26, 7), (28, 7), (36, 9)])
def test_resize_undone_lands_on_the_reference_map(px, side):
    net = FeatureExtractor(_two_stride2_convs(), "3")
    x = torch.rand(1, 3, px, px)
    ref = net(x)
    assert ref.shape[-2:] == (side, side)
    missed = 0
    for g in default_transforms():
        if not isinstance(g, Resize):
            continue
        feat = net(g(x))
        undone = align_view(g, feat, (side, side), (px, px))
        assert undone.shape == ref.shape, g
        plain = g.inverse().act(feat, Layout("map", size_stride((px, px), (side, side))))
        missed += plain.shape[-2:] != (side, side)
    if px == 28:
        assert missed > 0  # without the layout's size the inverse rounds to another size


def test_no_function_local_import_in_transforms():
    root = pathlib.Path(__file__).resolve().parents[2] / "src" / "equivision" / "transforms"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.name}:{node.name} imports inside a function"
