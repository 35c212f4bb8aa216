"""A small Vision Transformer whose [CLS] token enters only after block L.

SER (soft equivariance regularization) splits the encoder as ``f = f2 ∘ f1``: the
first ``cls_layer`` blocks (``f1``) see only patch tokens, so the token map leaving
block L is a clean spatial map ``(B, D, h, w)`` on which a geometric action can be
defined; the [CLS] token is inserted afterwards and blocks L+1..depth (``f2``)
produce the invariant embedding.  Positional embeddings are added to the patches
only; the token map at L gets its own LayerNorm (``norm_l``).

Inputs may be any patch-aligned size ``(H, W)`` (T_eq's resized canvases): the
positional embedding, learned on the ``image_size`` grid, is interpolated bicubically
to the ``(H/p, W/p)`` grid (unchanged at the native size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vit import ViTBlock
from ..transforms.layout import map_to_tokens, tokens_to_map

__all__ = ["SSLViT", "ViTOutput"]


@dataclass
class ViTOutput:
    """What :meth:`SSLViT.forward` returns.

    Attributes:
        cls: ``(B, D)`` final [CLS] after the final LayerNorm.
        tokens: ``(B, D, h, w)`` patch-token map leaving block ``cls_layer``, after
            ``norm_l`` (for ``cls_layer=0``: the normed patch embedding).
        last_cls: ``n_last`` tensors ``(B, D)``: [CLS] after each of the last
            ``n_last`` blocks (oldest first), each normed with the final LayerNorm.
        token_maps: with ``all_tokens=True``, ``depth`` raw (un-normed) patch-token
            maps ``(B, D, h, w)``, one after every block; else ``None``.
        parts: per-image outputs (batch 1 each) of views whose sizes differ (T_eq's
            resized canvases, first in the batch; ``cls`` covers them too), else ``None``.
    """

    cls: Tensor
    tokens: Tensor
    last_cls: list[Tensor] = field(default_factory=list)
    token_maps: list[Tensor] | None = None
    parts: list[ViTOutput] | None = None


class SSLViT(nn.Module):
    """ViT with [CLS] inserted after block ``cls_layer`` (1-based; 0 = standard ViT).

    Args:
        image_size: side of the square input images; a multiple of ``patch_size``.
        patch_size: side of the square patches (strided-conv patch embedding).
        in_channels: input channels.
        dim, depth, heads, mlp_ratio: transformer width, number of blocks, heads, MLP ratio.
        cls_layer: L; blocks 1..L see patch tokens only, [CLS] joins before block L+1.
            Needs ``0 <= L < depth`` (with L = depth the [CLS] would never be processed).
    """

    def __init__(
        self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, dim: int = 192,
        depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0, cls_layer: int = 4,
    ) -> None:
        super().__init__()
        if patch_size <= 0 or image_size <= 0:
            raise ValueError(f"image_size and patch_size must be positive, got "
                             f"{image_size} and {patch_size}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
                f"resize the images to {image_size // patch_size * patch_size} or "
                f"{(image_size // patch_size + 1) * patch_size} px or choose another patch size"
            )
        if not 0 <= cls_layer < depth:
            raise ValueError(
                f"cls_layer={cls_layer} must satisfy 0 <= cls_layer < depth={depth} "
                "(0 = [CLS] from the start, L = [CLS] inserted after block L)"
            )
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.dim, self.depth, self.heads = dim, depth, heads
        self.mlp_ratio, self.cls_layer = float(mlp_ratio), cls_layer
        side = image_size // patch_size
        self.grid = (side, side)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the same pre-norm block as the supervised ViT (models/vit.py)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_l = nn.LayerNorm(dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def config(self) -> dict:
        """Constructor keyword arguments (stored in checkpoints to rebuild the model)."""
        return {
            "image_size": self.image_size, "patch_size": self.patch_size,
            "in_channels": self.in_channels, "dim": self.dim, "depth": self.depth,
            "heads": self.heads, "mlp_ratio": self.mlp_ratio, "cls_layer": self.cls_layer,
        }

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images (B, C, H, W), got {shape}")
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"the model expects {self.in_channels} channel(s), got {c}")
        if h % self.patch_size or w % self.patch_size or not (h and w):
            hint = (f"{h}x{w} is not a multiple of the patch size {self.patch_size}; "
                    if h % self.patch_size or w % self.patch_size else "")
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {h}x{w}; {hint}"
                f"resize the images or build SSLViT(image_size=...) for this size"
            )

    def grid_of(self, x: Tensor) -> tuple[int, int]:
        """Token grid ``(H/p, W/p)`` of images ``x (B, C, H, W)``."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def positions(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding ``(1, h·w, D)`` for a ``grid = (h, w)`` token grid: the
        learned one at the native grid, else its bicubic interpolation."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        side = self.grid
        pos = self.pos_embed.reshape(1, side[0], side[1], -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def embed(self, x: Tensor, positions: bool = True) -> Tensor:
        """Patch embedding ``(B, C, H, W)`` -> tokens ``(B, N, D)`` (+ positions)."""
        t = map_to_tokens(self.patch_embed(x))
        return t + self.positions(self.grid_of(x)) if positions else t

    def forward(self, x: Tensor, n_last: int = 0, all_tokens: bool = False) -> ViTOutput:
        """Encode ``x (B, C, H, W)`` (``H, W`` multiples of the patch size; see
        :meth:`positions`); see :class:`ViTOutput` for what comes back.

        Raises:
            ValueError: wrong image size/channels, or ``n_last`` above the number of
                blocks that process the [CLS] token (``depth - cls_layer``).
        """
        self._check_input(x)
        if not 0 <= n_last <= self.depth - self.cls_layer:
            raise ValueError(
                f"n_last={n_last}: only the last {self.depth - self.cls_layer} blocks carry a "
                f"[CLS] token (cls_layer={self.cls_layer}, depth={self.depth})"
            )
        t = self.embed(x)
        b, grid = t.shape[0], self.grid_of(x)
        prefix = 0
        tokens: Tensor | None = None
        maps: list[Tensor] = []
        last: list[Tensor] = []
        for i in range(self.depth + 1):
            if i == self.cls_layer:  # tokens leaving block i (0 = the embedding)
                tokens = tokens_to_map(self.norm_l(t[:, prefix:]), grid)
                t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
                prefix = 1
            if i == self.depth:
                break
            t = self.blocks[i](t)
            if all_tokens:
                maps.append(tokens_to_map(t, grid, prefix))
            if prefix and i >= self.depth - n_last:
                last.append(self.norm(t[:, 0]))
        assert tokens is not None
        cls = last[-1] if n_last else self.norm(t[:, 0])
        return ViTOutput(cls=cls, tokens=tokens, last_cls=last,
                         token_maps=maps if all_tokens else None)
