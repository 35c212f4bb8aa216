"""measure(grid_offsets=...): off-centre grids are flagged by default and can be measured
about each map's own centre on request (the error of an approximate network)."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from equivision.measure import MeasureError, measure


def _data(size: int) -> TensorDataset:
    torch.manual_seed(0)
    return TensorDataset(torch.rand(4, 1, size, size), torch.zeros(4, dtype=torch.long))


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU())


def test_off_centre_grid_is_flagged_by_default_and_measured_on_request():
    flagged = measure(_net(), _data(28), "rot90", progress=False, ci_groups=0)
    row = flagged.get("rot90", "0")
    assert not row.exact and "off the image's centre" in row.note
    forced = measure(_net(), _data(28), "rot90", progress=False, ci_groups=0,
                     grid_offsets="ignore")
    row = forced.get("rot90", "0")
    assert row.exact and row.metrics["nmse"] is not None and row.metrics["nmse"] > 1e-3
    centred = measure(_net(), _data(29), "rot90", progress=False, ci_groups=0)
    assert centred.get("rot90", "0").exact  # 29 px: the grid stays centred


def test_unknown_grid_offsets_option_is_refused():
    with pytest.raises(MeasureError, match="grid_offsets must be"):
        measure(_net(), _data(28), "rot90", progress=False, grid_offsets="maybe")
