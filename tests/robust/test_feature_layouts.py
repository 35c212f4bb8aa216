"""The defenses' feature layer on models with channels-last maps (ConvNeXt / Swin
style) and on ViTs (token grids, attention maps): read as (B, C, h, w), never as a map
of the wrong axes."""

from __future__ import annotations

import pytest
import torch
from others_models import PermutingNet, TinyConvNeXt, TinyViT, TorchEncoderViT
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


@pytest.mark.parametrize("make", [TinyViT, TorchEncoderViT])
def test_auto_feature_layer_of_a_vit_is_its_last_token_grid_as_a_map(make):
    """A timm-style ViT (a ``Softmax`` module on the attention scores, [CLS] head) and an
    ``nn.TransformerEncoderLayer`` ViT: the default feature layer is the last token grid,
    given to the purifier as ``(B, C, 4, 4)`` without the [CLS] token; the attention map
    ``(B, heads, N, N)``, which is not a map of the image, is never chosen."""
    torch.manual_seed(0)
    model = make().eval()
    x = images()
    name = last_spatial_layer(model, x)
    assert name == ("norm" if make is TinyViT else "blocks")
    feat = FeatureExtractor(model, "auto")(x)
    assert feat.shape == (2, 16, 4, 4)
    if make is TinyViT:
        with torch.no_grad():
            t = model.patch_embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([model.cls_token.expand(2, -1, -1), t], 1) + model.pos_embed
            tokens = model.norm(model.blocks(t))
        torch.testing.assert_close(feat, tokens[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))


def test_an_attention_map_as_feature_layer_is_refused():
    with pytest.raises(ValueError, match="tokens x tokens.*choose a layer"):
        FeatureExtractor(TinyViT().eval(), "blocks.1.attn.softmax")(images())
