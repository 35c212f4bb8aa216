"""The one place that knows how a tensor is laid out and what its stride is.

A captured tensor is one of

* a feature map ``(B, C, h, w)`` (``kind="map"``),
* a group feature map ``(B, C, G, h, w)`` with ``G = 4`` (p4) or ``8`` (p4m)
  (``kind="group"``),
* a ViT token sequence ``(B, N, C)`` whose last ``N - prefix`` tokens form an
  ``(h, w)`` grid (``kind="tokens"``),
* or a pooled vector ``(B, C)`` (``kind="vector"``).

:class:`Layout` records that, the map's stride relative to the input image and,
optionally, the spatial ``size`` an action must land on (used by
:class:`~equivision.transforms.Resize`, whose inverse cannot know whether the
network rounded ``S f / s`` up or down). :func:`infer_layout` derives a layout from
a raw output's shape; :func:`size_stride`, :func:`local_stride` and
:func:`infer_strides` give strides; :func:`tokens_to_map` / :func:`map_to_tokens`
are the one token <-> map reshape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from torch import Tensor, nn

Stride = tuple[float, float]
Size = tuple[int, int]
#: ``(h, w)`` or ``(h, w, prefix)`` of a token grid.
TokenGrid = tuple[int, int] | tuple[int, int, int]
#: Group-axis length -> group name.
GROUP_OF_AXIS = {4: "p4", 8: "p4m"}


class LayoutError(ValueError):
    """A tensor whose layout cannot be worked out; the message says what to pass."""


@dataclass(frozen=True)
class Layout:
    """How a captured tensor is laid out, so that a transformation can act on it.

    Attributes:
        kind: ``"map"`` for ``(B, C, h, w)``, ``"group"`` for ``(B, C, G, h, w)``,
            ``"tokens"`` for ``(B, N, C)`` on a ``grid``, ``"vector"`` for ``(B, C)``.
        stride: ``(sy, sx)``, input pixels per feature-map position.
        grid: ``(h, w)`` of the patch tokens (``kind="tokens"`` only).
        prefix: number of leading non-patch tokens, e.g. 1 for a [CLS] token.
        group: ``"p4"`` (G = 4) or ``"p4m"`` (G = 8) for ``kind="group"``.
        size: ``(h, w)`` the action must produce, when it changes the map's size
            (an undone :class:`~equivision.transforms.Resize` lands exactly on it);
            ``None``: the transformation's own rounding.
    """

    kind: Literal["map", "group", "tokens", "vector"] = "map"
    stride: Stride = (1.0, 1.0)
    grid: tuple[int, int] | None = None
    prefix: int = 0
    group: str | None = None
    size: Size | None = None

    def with_size(self, size: Sequence[int] | None) -> Layout:
        """The same layout with target spatial ``size`` ``(h, w)`` (or none)."""
        return replace(self, size=None if size is None else (int(size[0]), int(size[1])))


def as_stride(stride: float | Sequence[float]) -> Stride:
    """Normalise a scalar or pair stride to ``(sy, sx)`` floats."""
    if isinstance(stride, (int, float)):
        return (float(stride), float(stride))
    return (float(stride[0]), float(stride[1]))


def size_stride(input_hw: Sequence[int], hw: Sequence[int]) -> Stride:
    """Stride from sizes alone: input pixels per map position, ``round(H / h)`` per axis
    (at least 1; ``inf`` for an empty axis)."""
    return tuple(  # type: ignore[return-value]
        float(max(1, round(i / m))) if m else math.inf for i, m in zip(input_hw, hw))


def tokens_to_map(x: Tensor, grid: Sequence[int], prefix: int = 0) -> Tensor:
    """Patch tokens ``(B, N, C)`` (after ``prefix`` leading tokens) as a map ``(B, C, h, w)``.

    Raises:
        LayoutError: when ``N - prefix != h * w``.
    """
    if x.dim() != 3:
        raise LayoutError(f"expected tokens (B, N, C), got {tuple(x.shape)}")
    b, n, c = x.shape
    h, w = int(grid[0]), int(grid[1])
    if n - prefix != h * w:
        raise LayoutError(
            f"{n} tokens with {prefix} prefix token(s) do not fill a {h}x{w} grid; "
            "pass the right grid=(h, w) and prefix"
        )
    return x[:, prefix:].transpose(1, 2).reshape(b, c, h, w)


def map_to_tokens(x: Tensor) -> Tensor:
    """A map ``(B, C, h, w)`` as tokens ``(B, h w, C)`` (row-major), the inverse of
    :func:`tokens_to_map` without prefix."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def split_grid(token_grid: TokenGrid) -> tuple[tuple[int, int], int]:
    """``(h, w)`` or ``(h, w, prefix)`` -> ``((h, w), prefix)``."""
    prefix = int(token_grid[2]) if len(token_grid) == 3 else 0
    return (int(token_grid[0]), int(token_grid[1])), prefix


def infer_layout(
    out: Tensor,
    input_hw: Sequence[int] | None = None,
    token_grid: TokenGrid | None = None,
    stride: float | Sequence[float] | None = None,
) -> Layout:
    """The layout of a raw output from its shape.

    Args:
        out: ``(B, C)``, ``(B, N, C)``, ``(B, C, h, w)`` or ``(B, C, G, h, w)``.
        input_hw: ``(H, W)`` of the input image, for the stride from sizes
            (:func:`size_stride`) when ``stride`` is not given; None: stride 1.
        token_grid: ``(h, w[, prefix])`` of a token output (required for 3-D outputs).
        stride: the known stride of the output.

    Raises:
        LayoutError: unknown rank, a group axis other than 4 or 8, tokens without or
            with a wrong grid.
    """
    if out.dim() == 2:
        return Layout("vector")
    if out.dim() == 3:
        if token_grid is None:
            raise LayoutError(
                f"tokens of shape {tuple(out.shape)} need their grid: pass "
                "token_grid=(h, w) or (h, w, prefix) (CLI: --token-grid h,w[,prefix])")
        grid, prefix = split_grid(token_grid)
        if out.shape[1] - prefix != grid[0] * grid[1]:
            raise LayoutError(
                f"{out.shape[1]} tokens is not {prefix} prefix + {grid[0]}x{grid[1]} grid "
                "tokens; fix token_grid")
        s = _stride_for(grid, input_hw, stride)
        return Layout("tokens", s, grid=grid, prefix=prefix)
    if out.dim() in (4, 5):
        hw = (int(out.shape[-2]), int(out.shape[-1]))
        s = _stride_for(hw, input_hw, stride)
        if out.dim() == 4:
            return Layout("map", s)
        group = GROUP_OF_AXIS.get(int(out.shape[2]))
        if group is None:
            raise LayoutError(
                f"a 5-D tensor with a group axis of size {out.shape[2]}; only p4 (4) and "
                "p4m (8) group maps are understood")
        return Layout("group", s, group=group)
    raise LayoutError(
        f"a {out.dim()}-D tensor {tuple(out.shape)}; expected (B, C), (B, N, C), "
        "(B, C, H, W) or (B, C, G, H, W)")


def _stride_for(hw: Size, input_hw: Sequence[int] | None,
                stride: float | Sequence[float] | None) -> Stride:
    if stride is not None:
        return as_stride(stride)
    return (1.0, 1.0) if input_hw is None else size_stride(input_hw, hw)


def as_map(out: Tensor, layout: Layout) -> tuple[Tensor, Layout]:
    """A token output as its patch map ``(B, C, h, w)`` with a ``"map"`` layout; other
    layouts are returned as they are."""
    if layout.kind != "tokens":
        return out, layout
    assert layout.grid is not None
    return tokens_to_map(out, layout.grid, layout.prefix), replace(
        layout, kind="map", grid=None, prefix=0)


# ---- strides through a network -------------------------------------------------------------
_STRIDED = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
            nn.modules.pooling._AvgPoolNd)


def local_stride(module: nn.Module, hw_in: Sequence[int], hw_out: Sequence[int]) -> Stride:
    """Stride of one layer: its ``stride`` attribute for convolutions and pooling,
    otherwise 1 for small shrinks (valid convolutions), the rounded ratio for large
    ones and the exact ratio for upsampling."""
    own = getattr(module, "stride", None)
    if isinstance(module, _STRIDED) and own is not None:
        pair = own if isinstance(own, (tuple, list)) else (own, own)
        return (float(pair[0]), float(pair[-1]))
    out = []
    for i, o in zip(hw_in, hw_out):
        r = i / o if o else math.inf
        out.append(1.0 if 1.0 <= r < 1.5 else float(round(r)) if r >= 1.5 else r)
    return (out[0], out[1])


def infer_strides(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    in_hw: Mapping[str, Sequence[int] | None],
    out_hw: Mapping[str, Sequence[int] | None],
    image_hw: Sequence[int],
) -> dict[str, Stride]:
    """Cumulative stride of each spatial layer output relative to the input image.

    Layers are visited in forward order; a layer's input stride is looked up by the
    input's spatial size among the sizes seen so far (the image has stride 1), and
    multiplied by the layer's own stride (:func:`local_stride`). This gives 2, not
    3, for a valid 3x3 conv that maps 12 -> 10 after a 2x2 pool, and 2 for the
    1x1 stride-2 shortcut of a ResNet.
    """
    by_size: dict[tuple[int, ...], Stride] = {tuple(image_hw): (1.0, 1.0)}
    out: dict[str, Stride] = {}
    for name in order:
        hi, ho = in_hw.get(name), out_hw.get(name)
        if ho is None:
            continue
        if hi is None or tuple(hi) not in by_size:
            s = size_stride(image_hw, ho)
        else:
            base = by_size[tuple(hi)]
            local = local_stride(modules[name], hi, ho)
            s = (base[0] * local[0], base[1] * local[1])
        out[name] = s
        by_size.setdefault(tuple(ho), s)
    return out
