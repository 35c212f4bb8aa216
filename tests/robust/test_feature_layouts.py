"""The defenses' feature layer on models with channels-last maps (ConvNeXt / Swin
style): read as (B, C, h, w), never as a map of the wrong axes."""

from __future__ import annotations

import pytest
import torch
from others_models import PermutingNet, TinyConvNeXt
from torch import Tensor, nn

from equivision.robust.views import FeatureExtractor, last_spatial_layer


class SwinLike(nn.Module):
    """Patch embedding, then every layer channels-last: the last map is ``(B, h, w, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.norm = nn.LayerNorm(6)
        self.mlp = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm(self.bn(self.patch(x)).permute(0, 2, 3, 1)))
        return self.head(y.mean((1, 2)))


def images(n: int = 2, size: int = 16) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_auto_feature_layer_of_a_swin_like_model_is_its_channels_last_map_as_bchw():
    torch.manual_seed(0)
    model = SwinLike().train()  # train mode: resolving must not touch BatchNorm statistics
    stats = model.bn.running_mean.clone()
    ext = FeatureExtractor(model, "auto")
    x = images()
    assert ext.resolve(x) == "mlp"
    assert model.training and torch.equal(model.bn.running_mean, stats)
    model.eval()
    feat = ext(x)
    with torch.no_grad():
        ref = model.mlp(model.norm(model.bn(model.patch(x)).permute(0, 2, 3, 1)))
    torch.testing.assert_close(feat.detach(), ref.permute(0, 3, 1, 2))
    assert feat.shape == (2, 6, 8, 8)


def test_a_named_channels_last_layer_is_read_as_bchw_and_auto_keeps_the_container():
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    x = images()
    assert last_spatial_layer(model, x) == "stages"  # the container's map is (B, C, h, w)
    feat = FeatureExtractor(model, "stages.1.pwconv2")(x)
    assert feat.shape == (2, 8, 4, 4)


def test_a_layer_that_only_looks_channels_last_is_refused():
    with pytest.raises(ValueError, match="looks channels-last"):
        FeatureExtractor(PermutingNet().eval(), "to_last")(images())
