"""``GroupConv2d``'s ``padding_mode`` and ``groups``: exact equivariance for every padding
mode on square inputs, the per-block structure of ``groups``, and clear errors."""

from __future__ import annotations

import pytest
import torch
from test_gcnn import GROUPS, D, max_equivariance_error, rand, randomize

from equivision.gcnn import GroupConv2d
from equivision.gcnn.layers import PADDING_MODES

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(group: str, mode: str, groups: int, k: int = 3, stride: int = 1, pad: int = 1):
    """A lifting conv (2 -> 4 channels) and a group conv (4 -> 2), both with ``mode``."""
    lift = GroupConv2d(2, 4, k, stride, pad, groups=groups, padding_mode=mode, group=group,
                       in_group=None)
    gconv = GroupConv2d(4, 2, k, stride, pad, groups=groups, padding_mode=mode, group=group)
    return randomize(lift).to(D), randomize(gconv, 1).to(D)


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("k,stride,pad,size", [(3, 1, 1, 7), (3, 1, 2, 6), (3, 2, 1, 9),
                                               (4, 1, 1, 7)])
def test_every_padding_mode_is_exactly_equivariant(mode, group, groups, k, stride, pad, size):
    """Reflect, replicate and circular padding commute with rot90 and flips of a square
    map, so the size rule of zero padding decides exactness for them too."""
    lift, gconv = pair(group, mode, groups, k, stride, pad)
    x = rand(2, 2, size, size)
    assert max_equivariance_error(lift, x, group) < 1e-12
    h = lift(x)
    if h.shape[-1] > pad:  # reflect needs an input side larger than the padding
        assert max_equivariance_error(gconv, h, group) < 1e-12


@pytest.mark.parametrize("mode", PADDING_MODES[1:])
def test_padding_mode_is_applied(mode):
    """The border differs from zero padding; the interior does not."""
    zeros = randomize(GroupConv2d(2, 3, 3, padding=1, group="p4", in_group=None)).to(D)
    other = GroupConv2d(2, 3, 3, padding=1, padding_mode=mode, group="p4", in_group=None).to(D)
    other.load_state_dict(zeros.state_dict())
    x = rand(1, 2, 6, 6)
    a, b = zeros(x), other(x)
    assert torch.equal(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])
    assert (a - b).abs().max() > 1e-3
    assert f"padding_mode={mode!r}" in repr(other)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("lifting", [True, False])
def test_groups_split_the_channels_into_independent_blocks(group, lifting):
    """With ``groups=2`` the layer is two layers side by side: block j of the output is the
    group convolution of block j of the input with block j of the weights."""
    g_in = None if lifting else group
    layer = randomize(GroupConv2d(4, 6, 3, padding=1, groups=2, group=group,
                                  in_group=g_in)).to(D)
    n = layer.group_size
    assert layer.weight.shape == (6, 2, 1 if lifting else n, 3, 3)
    assert layer.fan_in == 2 * (1 if lifting else n) * 9
    x = rand(2, 4, 7, 7) if lifting else rand(2, 4, n, 7, 7)
    y = layer(x)
    for j in range(2):
        half = GroupConv2d(2, 3, 3, padding=1, group=group, in_group=g_in).to(D)
        with torch.no_grad():
            half.weight.copy_(layer.weight[3 * j:3 * j + 3])
            half.bias.copy_(layer.bias[3 * j:3 * j + 3])
        assert torch.allclose(y[:, 3 * j:3 * j + 3], half(x[:, 2 * j:2 * j + 2]), atol=1e-12)
    moved = x.clone()
    moved[:, :2] += 1.0  # only block 0 of the input changes
    z = layer(moved)
    assert torch.equal(z[:, 3:], y[:, 3:]) and not torch.allclose(z[:, :3], y[:, :3])
    assert "groups=2" in repr(layer)


def test_invalid_options_give_clear_errors():
    with pytest.raises(ValueError, match="groups=2 must divide in_channels=3"):
        GroupConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=3 must divide .* out_channels=4"):
        GroupConv2d(3, 4, 3, groups=3)
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        GroupConv2d(3, 4, 3, groups=0)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        GroupConv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="'reflect' needs an input side larger than the "
                                         "padding"):
        GroupConv2d(1, 1, 3, padding=2, padding_mode="reflect", in_group=None)(
            torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="'circular' needs an input side at least"):
        GroupConv2d(1, 1, 1, padding=3, padding_mode="circular")(torch.randn(1, 1, 4, 2, 2))
    # at the limit both work
    GroupConv2d(1, 1, 3, padding=2, padding_mode="reflect", in_group=None)(
        torch.randn(1, 1, 3, 3))
    GroupConv2d(1, 1, 1, padding=2, padding_mode="circular")(torch.randn(1, 1, 4, 2, 2))
