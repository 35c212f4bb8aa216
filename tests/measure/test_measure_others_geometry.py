"""Issue 11 on models written the way other people write them: container strides from
the leaves' geometry, the pool point however it was computed, per-layer token grids and
layer-name patterns."""

import pytest
import torch
from others_models import MeanPoolCNN, StagedResNet, TinyEffNet, TinyResNet, TinyViT, TokenViT
from torch.utils.data import TensorDataset

from equivision.measure import MeasureError, measure, select_layers
from equivision.measure.capture import trace_layers
from equivision.transforms.layout import infer_token_grid


def noise(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n).long())


def staged():
    torch.manual_seed(0)
    return StagedResNet().eval()


def test_container_strides_come_from_the_leaves_not_the_rounded_size_ratio():
    trace = trace_layers(staged(), noise(size=28)[:][0])
    assert trace.strides["layer4.0.conv1"].stride == (8.0, 8.0)
    assert trace.strides["layer4"].stride == (8.0, 8.0)  # 28 / 4 rounds to 7
    assert trace.strides["layer4.0"].stride == (8.0, 8.0)
    assert trace.strides["layer3"].stride == (4.0, 4.0)
    rep = measure(staged(), noise(size=28), "shift:7,shift:8", ["layer3", "layer4"],
                  progress=False)
    assert rep.get("shift(8,8)", "layer4").stride == [8.0, 8.0]
    assert rep.get("shift(8,8)", "layer4").exact  # one whole position
    assert not rep.get("shift(7,7)", "layer4").exact  # not a whole number of positions
    assert "stride (8, 8)" in rep.get("shift(7,7)", "layer4").note


def test_pool_point_computed_in_forward_is_the_next_modules_input():
    torch.manual_seed(0)
    rep = measure(MeanPoolCNN().eval(), noise(), "rot90:1", progress=False)
    assert rep.layers == ["conv1", "act", "conv2", "fc:input", "fc"]
    parts = {n: rep.get("rot90", n).part for n in rep.layers}
    assert parts == {"conv1": "Early", "act": "Middle", "conv2": "Late", "fc:input": "Pool",
                     "fc": "Final"}
    assert rep.meta["pool_layer"] == "fc:input"
    pool = rep.get("rot90", "fc:input")
    assert pool.module == "FunctionalPool" and pool.shape == [8] and pool.exact
    assert set(rep.part_summary()) == {"Early", "Middle", "Late", "Pool", "Final"}


def test_pool_point_of_a_vit_taking_the_cls_token():
    torch.manual_seed(0)
    rep = measure(TinyViT().eval(), noise(), "hflip", token_grid=(4, 4, 1), progress=False)
    assert rep.layers[-2:] == ["head:input", "head"]
    assert rep.meta["pool_layer"] == "head:input"
    assert [rep.get("hflip", n).part for n in rep.layers[-3:]] == ["Late", "Pool", "Final"]


def test_pool_point_keeps_pooling_modules_and_1x1_maps_before_a_pool():
    torch.manual_seed(0)
    rep = measure(TinyResNet().eval(), noise(), "rot90:1", progress=False)
    assert "fc:input" not in rep.layers  # avgpool's flattened output, already measured
    assert rep.meta["pool_layer"] == "avgpool"
    explicit = measure(TinyResNet().eval(), noise(), "rot90:1", ["conv1", "fc:input", "fc"],
                       progress=False)
    assert explicit.meta["pool_layer"] == "fc:input"


@pytest.mark.parametrize("linear_se", [False, True])
def test_squeeze_excitation_vectors_inside_blocks_are_not_the_pool_point(linear_se):
    """EfficientNet-style blocks pool a gate (a vector) and go back to maps: the pool point
    is the first vector after the *last* map (the pooled input of the head), so the blocks
    stay in Early / Middle / Late and only the head is Final."""
    torch.manual_seed(0)
    rep = measure(TinyEffNet(linear_se=linear_se).eval(), noise(size=17), "rot90:1",
                  progress=False)
    assert rep.meta["pool_layer"] == "head:input"
    parts = {n: rep.get("rot90", n).part for n in rep.layers}
    assert parts["head:input"] == "Pool" and parts["head"] == "Final"
    assert {p for n, p in parts.items() if n.startswith(("stem", "blocks"))} == {
        "Early", "Middle", "Late"}
    assert ("blocks.0.se.fc1:input" in rep.layers) == linear_se  # a pooled vector, measured


def test_layer_patterns_stay_within_one_dotted_part():
    vit = TinyViT()
    assert select_layers(vit, ["blocks.*"]) == ["blocks.0", "blocks.1"]
    assert select_layers(vit, ["blocks.*.attn"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert "blocks.0.attn.qkv" in select_layers(vit, ["blocks.**"])
    assert select_layers(vit, ["**.qkv"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert select_layers(vit, ["blocks.[01].norm?"]) == [
        "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"]
    with pytest.raises(MeasureError, match=r"'\*\*' crosses"):
        select_layers(vit, ["blocks.*.qkv"])


@pytest.mark.parametrize("grid", [None, (4, 4, 1), (4, 4),
                                  {"patch_embed": (4, 4), "blocks.**": (4, 4, 1),
                                   "norm": (4, 4, 1)}])
def test_patch_layer_with_n_tokens_and_blocks_with_n_plus_one(grid):
    rep = measure(_same_vit(), noise(), "rot90:1", ["patch_embed", "blocks.*", "norm"],
                  token_grid=grid, progress=False)
    for name in ("patch_embed", "blocks.0", "blocks.1", "norm"):
        r = rep.get("rot90", name)
        assert r.exact and r.shape == [16, 4, 4], (name, r.note)
    # the patch tokens equal the conv's map: the same invariance as measuring patch_embed.proj
    ref = measure(_same_vit(), noise(), "rot90:1",
                  ["patch_embed.proj"], progress=False)
    assert rep.get("rot90", "patch_embed").metrics["invariance"] == pytest.approx(
        ref.get("rot90", "patch_embed.proj").metrics["invariance"], abs=1e-6)


def _same_vit():
    torch.manual_seed(0)
    return TokenViT().eval()


def test_token_grid_inference_and_its_errors():
    assert infer_token_grid(17, (16, 16)) == (4, 4, 1)
    assert infer_token_grid(16, (16, 16)) == (4, 4, 0)
    assert infer_token_grid(16, (16, 16), (4, 4, 1)) == (4, 4, 0)
    assert infer_token_grid(21, (16, 16), (4, 4, 1)) is None  # 5 extra tokens, 1 declared
    assert infer_token_grid(21, (16, 16), (4, 4)) == (4, 4, 5)
    torch.manual_seed(0)
    with pytest.raises(MeasureError, match=r"'blocks.0'.*17 tokens.*\(3, 3, 1\).*per layer"):
        measure(TokenViT().eval(), noise(), "rot90:1", ["blocks.0"], token_grid=(3, 3, 1),
                progress=False)


class ResizeFirst(torch.nn.Module):
    """Resizes its input to 32 px in ``forward`` (``F.interpolate``), then convolves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                            align_corners=False)
        return self.fc(torch.relu(self.conv1(x)).mean((2, 3)))


def test_a_map_enlarged_in_forward_has_the_exact_size_ratio_as_stride():
    """28 -> 32 px: a 7 px shift is 8 map positions, a 2 px shift no whole number of them
    (the rounded ratio, 1, measured it as a 2-position shift)."""
    torch.manual_seed(0)
    rep = measure(ResizeFirst().eval(), noise(size=28), "shift:2,shift:7", progress=False,
                  ci_groups=0)
    assert rep.get("shift(7,7)", "conv1").stride == [0.875, 0.875]
    assert rep.get("shift(7,7)", "conv1").exact
    assert not rep.get("shift(2,2)", "conv1").exact
