"""Sub-pixel shifts: values, strided maps, the spec entry, and the comparison core."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from equivision.measure import measure
from equivision.measure.compare import align, align_back
from equivision.transforms import (
    Layout,
    SubpixelShift,
    Translation,
    as_transforms,
)
from equivision.transforms.subpixel import linear_shift


def test_half_pixel_shift_averages_neighbours():
    x = torch.arange(5.0).reshape(1, 1, 1, 5)
    out = SubpixelShift(0.5, 0.0)(x)
    # content moves right by half a pixel: out[j] = (x[j - 1] + x[j]) / 2, zero outside
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5]))
    up = SubpixelShift(0.0, -0.25)(torch.arange(4.0).reshape(1, 1, 4, 1))
    torch.testing.assert_close(up[0, 0, :, 0], torch.tensor([0.25, 1.25, 2.25, 2.25]))


@pytest.mark.parametrize("dx,dy", [(2.0, -1.0), (0.0, 3.0), (-3.0, 3.0)])
def test_whole_shifts_equal_translation(dx, dy):
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(SubpixelShift(dx, dy)(x), Translation(int(dx), int(dy))(x))


def test_strided_map_moves_by_shift_over_stride():
    m = torch.randn(1, 2, 6, 6)
    g = SubpixelShift(1.0, 1.0)
    # 1 px at stride 2 is half a position; 2 px at stride 2 is one whole position
    torch.testing.assert_close(g.apply_map(m, 2), linear_shift(m, 0.5, 0.5))
    assert torch.equal(SubpixelShift(2.0, 2.0).apply_map(m, 2), Translation(2, 2).apply_map(m, 2))
    assert g.map_exact((6, 6), 2) and not g.exact  # defined at every stride, interpolated
    # the comparison core goes through the transform's own methods in both directions
    lay = Layout("map", (2.0, 2.0), size=(6, 6))
    _, gm = align(g.apply_map(m, 2), m, g, lay)
    back = align_back(g, gm, lay)
    torch.testing.assert_close(back, linear_shift(linear_shift(m, 0.5, 0.5), -0.5, -0.5))
    assert back.shape == m.shape


def test_valid_mask_drops_partly_outside_positions():
    mask = SubpixelShift(0.5, 0.0).valid_mask((4, 4))
    assert not mask[:, 0].any() and mask[:, 1:].all()
    assert SubpixelShift(1.0, 0.0).valid_mask((4, 4), stride=2)[:, 0].logical_not().all()


def test_spec_entry_and_errors():
    assert as_transforms("subshift:0.5") == [SubpixelShift(0.5, 0.5)]
    assert as_transforms("subshift") == [SubpixelShift(0.5, 0.5)]
    assert as_transforms("subshift:0.5x0/1") == [SubpixelShift(0.5, 0.0), SubpixelShift(1, 1)]
    with pytest.raises(ValueError, match="subshift:0.5x0"):
        as_transforms("subshift:half")
    with pytest.raises(ValueError, match="finite"):
        SubpixelShift(float("nan"), 0)
    assert SubpixelShift(0.5, 0) @ Translation(1, 2) == SubpixelShift(1.5, 2)
    assert SubpixelShift(0.25, 0).inverse() == SubpixelShift(-0.25, 0)


def test_measure_sees_aliasing_that_whole_shifts_hide():
    """A stride-2 conv without blur: a 2 px shift is one whole position (exact up to the
    border), a 1 px shift is half a position and loses equivariance to aliasing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
    x = torch.rand(8, 1, 16, 16)
    report = measure(model, [x], "shift:2,subshift:1", layers=["2"], margin=2, progress=False)
    whole = report.get("shift(2,2)", "2").metrics["equivariance"]
    half = report.get("subshift(1,1)", "2").metrics["equivariance"]
    assert whole > 0.999 and half < 0.9
