"""A model whose forward fails on one transformed input: that transformation gets a line
per layer saying so, the others are still measured."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from equivision.measure import measure
from equivision.transforms import Resize, hflip


class WidthBound(nn.Module):
    """Written the way a user might: a linear head that needs exactly 12 columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 12:
            raise ValueError(f"expected width 12, got {x.shape[-1]}")
        y = self.act(self.conv(x))
        return self.fc(y.mean(2).flatten(1))


def test_forward_failure_is_a_line_per_layer_not_a_crash():
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(6, 1, 10, 12), torch.zeros(6, dtype=torch.long))
    report = measure(WidthBound(), data, [Resize(2.0), hflip()], batch_size=3, progress=False,
                     ci_groups=0)
    names = {r.transform for r in report.results}
    rot = [r for r in report.results if r.transform.startswith("resize")]
    flip = [r for r in report.results if r.transform == "hflip"]
    assert rot and flip, names
    assert all(not r.exact and "forward failed on the transformed input" in r.note
               and "expected width 12" in r.note for r in rot)
    assert all(r.exact for r in flip if r.layer == "conv")
    conv_flip = next(r for r in flip if r.layer == "conv")
    assert conv_flip.metrics["equivariance"] is not None
