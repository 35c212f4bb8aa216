"""Restricting p4m maps and layers to p4: the rotation elements (``restrict``), the coset
view, and ``GroupConv2d.restrict`` / ``GroupBatchNorm2d.restrict``, all p4-equivariant."""

from __future__ import annotations

import pytest
import torch
from test_gcnn import D, max_equivariance_error, rand, randomize

from equivision.gcnn import GroupBatchNorm2d, GroupConv2d, restrict
from equivision.transforms import group_elements

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cosets", [False, True])
def test_restricted_maps_are_p4_maps(cosets):
    """``restrict(g·x) == g·restrict(x)`` for every rotation g, acting on p4m then p4 maps."""
    x = rand(2, 3, 8, 5, 5)
    y = restrict(x, "p4m", "p4", cosets=cosets)
    assert y.shape == ((2, 6, 4, 5, 5) if cosets else (2, 3, 4, 5, 5))
    for g in group_elements("p4"):
        assert torch.equal(restrict(g.apply_group_map(x, "p4m"), "p4m", "p4", cosets=cosets),
                           g.apply_group_map(y, "p4"))
    if cosets:  # nothing dropped: a reordering of the entries
        assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
        assert torch.equal(y[:, 0::2], restrict(x, "p4m", "p4"))
    assert restrict(y, "p4", "p4") is y


@pytest.mark.parametrize("lifting", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_restricted_conv_is_the_p4m_conv_on_cosets(lifting, groups):
    layer = randomize(GroupConv2d(3, 6, 3, 1, 1, groups=groups, group="p4m",
                                  in_group=None if lifting else "p4m")).to(D)
    p4 = layer.restrict("p4")
    assert (p4.group, p4.in_group, p4.groups) == ("p4", None if lifting else "p4", groups)
    assert p4.out_channels == 12 and p4.in_channels == (3 if lifting else 6)
    x = rand(2, 3, 7, 7) if lifting else rand(2, 3, 8, 7, 7)
    x4 = x if lifting else restrict(x, "p4m", "p4", cosets=True)
    y = layer(x)
    assert torch.allclose(p4(x4), restrict(y, "p4m", "p4", cosets=True), atol=1e-12)
    if lifting:  # the rotation elements alone: the p4 lifting conv with the same weights
        assert torch.allclose(p4(x)[:, 0::2], restrict(y, "p4m", "p4"), atol=1e-12)
    assert max_equivariance_error(p4, x4, "p4") < 1e-12
    with torch.no_grad():
        layer.weight.add_(1.0)  # a copy
    assert not torch.allclose(p4(x4), restrict(layer(x), "p4m", "p4", cosets=True))


def test_restricted_batch_norm_and_a_restricted_network():
    bn = randomize(GroupBatchNorm2d(2, "p4m")).to(D).eval()
    bn4 = bn.restrict("p4")
    assert bn4.group == "p4" and bn4.num_features == 4 and not bn4.training
    x = rand(3, 2, 8, 5, 5)
    assert torch.allclose(bn4(restrict(x, "p4m", "p4", cosets=True)),
                          restrict(bn(x), "p4m", "p4", cosets=True), atol=1e-12)
    lift = randomize(GroupConv2d(1, 2, 3, group="p4m", in_group=None)).to(D)
    conv = randomize(GroupConv2d(2, 2, 3, group="p4m"), 1).to(D)
    net = torch.nn.Sequential(lift, bn, torch.nn.ReLU(), conv)
    net4 = torch.nn.Sequential(lift.restrict(), bn4, torch.nn.ReLU(), conv.restrict())
    img = rand(2, 1, 9, 9)
    assert torch.allclose(net4(img), restrict(net(img), "p4m", "p4", cosets=True), atol=1e-12)
    assert max_equivariance_error(net4, img, "p4") < 1e-12


def test_bad_restrictions():
    with pytest.raises(ValueError, match="can restrict 'p4m' to 'p4'"):
        restrict(rand(1, 1, 4, 3, 3), "p4", "p4m")
    with pytest.raises(ValueError, match=r"p4m feature map \(B, C, G=8, H, W\)"):
        restrict(rand(1, 1, 4, 3, 3), "p4m", "p4")
    with pytest.raises(ValueError, match="can restrict"):
        GroupConv2d(1, 1, 3, group="p4").restrict("p4m")
    same = GroupConv2d(1, 1, 3, group="p4")
    copy = same.restrict("p4")
    assert copy is not same and torch.equal(copy.weight, same.weight)
