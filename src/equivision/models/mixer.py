"""A small MLP-Mixer (Tolstikhin et al. 2021) for 28-32 px images.

``mixer-small``: non-overlapping ``patch_size`` x ``patch_size`` patches embedded by a
strided convolution (no [CLS] token, no positional embedding: the token-mixing MLP is
position-specific), ``depth`` Mixer blocks, a final LayerNorm + global average pooling over
the tokens, and a linear head.

Measurement: the blocks ``blocks.0``, ``blocks.1``, ... return tokens (B, h*w, C);
``model.token_grid = (h, w, 0)``; ``pool`` (output (B, C)) is the global pooling
(``model.equivision_pool_layer = "pool"``) and ``head`` gives the logits.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model
from .vit import MLP, PatchEmbed, _check_ratio, _check_tokens_input, _init_token_model

__all__ = ["MixerBlock", "TokenAvgPool", "Mixer", "mixer_small"]


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each pre-norm with a residual connection.

    ``x + token_mlp(norm1(x)ᵀ)ᵀ`` mixes the ``num_tokens`` positions (one MLP shared by the
    channels), then ``x + channel_mlp(norm2(x))`` mixes the channels (shared by positions).

    Shapes: (B, num_tokens, dim) -> (B, num_tokens, dim).
    """

    def __init__(
        self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = MLP(num_tokens, token_hidden, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = MLP(dim, channel_hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TokenAvgPool(nn.Module):
    """Final LayerNorm, then the mean over tokens: (B, N, dim) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, dim)."""
        return self.norm(x).mean(dim=1)


class Mixer(nn.Module):
    """An MLP-Mixer classifier.

    Modules: ``patch_embed``, ``blocks.0`` .. ``blocks.{depth-1}`` (:class:`MixerBlock`,
    output (B, h*w, dim)), ``pool`` (:class:`TokenAvgPool`, output (B, dim)), ``head``.

    Attributes:
        token_grid: ``(h, w, 0)``: the patch grid and no prefix token.
        equivision_layers: the blocks, ``pool`` and ``head``.
        equivision_pool_layer: ``"pool"``.

    Shapes: (B, in_channels, image_size, image_size) -> (B, num_classes); other sizes raise
    ``ValueError``.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 6,
        token_mlp_ratio: float = 0.5,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        name: str = "mixer-small",
    ) -> None:
        super().__init__()
        side = _init_token_model(self, name, image_size, patch_size, in_channels, num_classes,
                                 dim, depth, dropout)
        self.token_mlp_ratio = _check_ratio(name, "token_mlp_ratio", token_mlp_ratio)
        self.mlp_ratio = _check_ratio(name, "mlp_ratio", mlp_ratio)
        n = side * side
        token_hidden = max(1, round(dim * self.token_mlp_ratio))
        channel_hidden = max(1, round(dim * self.mlp_ratio))
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.blocks = nn.ModuleList(
            MixerBlock(n, dim, token_hidden, channel_hidden, dropout) for _ in range(depth)
        )
        self.pool = TokenAvgPool(dim)
        self.head = nn.Linear(dim, num_classes)
        #: (h, w, prefix) of the blocks' token sequences
        self.token_grid = (side, side, 0)
        #: measurement points: each block's tokens, the pooled vector, the logits
        self.equivision_layers = [f"blocks.{i}" for i in range(depth)] + ["pool", "head"]
        self.equivision_pool_layer = "pool"
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens after the last block (B, h*w, dim)."""
        _check_tokens_input(self.model_name, x, self.in_channels, self.image_size)
        t = self.patch_embed(x)
        for block in self.blocks:
            t = block(t)
        return t

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, image_size, image_size) -> logits (B, num_classes)."""
        return self.head(self.pool(self.tokens(x)))


@register_model("mixer-small")
def mixer_small(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 4,
    dim: int = 128,
    depth: int = 6,
    token_mlp_ratio: float = 0.5,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
) -> Mixer:
    """A small MLP-Mixer for 28-32 px images (patch 4); token-mixing hidden width
    ``token_mlp_ratio * dim``, channel-mixing hidden width ``mlp_ratio * dim`` (the paper's
    D_S = C / 2, D_C = 4C). ``image_size`` must match the data. See :class:`Mixer`."""
    return Mixer(image_size, patch_size, in_channels, num_classes, dim, depth,
                 token_mlp_ratio, mlp_ratio, dropout, name="mixer-small")
