"""The invariance defense pools each view over its valid positions (issue 14: the rotated
views' zero corners entered the average)."""

import torch
from torch import nn

from equivision.robust import InvarianceDefense
from equivision.transforms import Rotation, hflip


class TwoChannels(nn.Module):
    """Features ``[x, 1 - x]``: zero-filled corners give ``(0, 1)``, far from the image's
    ``(x, 1 - x)``, so averaging them in changes the pooled direction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1 - x], 1)


def test_rotated_views_pool_only_valid_positions():
    x = torch.full((2, 1, 24, 24), 0.8)
    d = InvarianceDefense(TwoChannels(), steps=1, feature_layer="output",
                          transforms=[Rotation(45.0), Rotation(-15.0), hflip()])
    cos = -d.equivariance_loss(x)
    # a constant image is invariant: every valid position has the same features
    torch.testing.assert_close(cos, torch.ones(2), atol=1e-5, rtol=0)
    # the unmasked mean over the 45-degree view's whole grid is off by far more
    view = Rotation(45.0).apply_image(x)
    f = TwoChannels()(view).mean(dim=(-2, -1))
    ref = TwoChannels()(x).mean(dim=(-2, -1))
    assert float(torch.cosine_similarity(f, ref)[0]) < 0.98
