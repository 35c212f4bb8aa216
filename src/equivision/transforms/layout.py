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
network rounded ``S f / s`` up or down) and the ``offset`` of its sampling grid from
the image's centre. :func:`infer_layout` derives a layout from a raw output's shape;
:func:`size_stride`, :func:`local_stride` and :func:`trace_geometry` (strides and
grid offsets traced through the leaves of a network, containers included) give
strides; :func:`subsampling_remainder` is the one rule for whether a strided layer's
grid stays centred; :func:`infer_token_grid` reads a token output's grid from the
image size; :func:`tokens_to_map` / :func:`map_to_tokens` are the one token <-> map
reshape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from torch import Tensor, nn

Stride = tuple[float, float]
Size = tuple[int, int]
#: ``(h, w)`` or ``(h, w, prefix)`` of a token grid.
TokenGrid = tuple[int, int] | tuple[int, int, int]
#: Group-axis length -> group name.
GROUP_OF_AXIS = {4: "p4", 8: "p4m"}
#: The most leading non-patch tokens ([CLS], registers) :func:`infer_token_grid` assumes.
MAX_PREFIX = 8


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
        offset: ``(dy, dx)``, input pixels from the image's centre to the centre of
            the map's sampling grid (:func:`trace_geometry`); not ``0`` on an axis when
            a strided layer before it had ``(i + 2p - k_eff) mod s != 0`` there, and
            then a flip of that axis (or a 90° rotation) has no exact action on the map.
        offset_from: the first layer that moved the grid off centre (for messages).
    """

    kind: Literal["map", "group", "tokens", "vector"] = "map"
    stride: Stride = (1.0, 1.0)
    grid: tuple[int, int] | None = None
    prefix: int = 0
    group: str | None = None
    size: Size | None = None
    offset: Stride = (0.0, 0.0)
    offset_from: str = field(default="", compare=False)

    def with_size(self, size: Sequence[int] | None) -> Layout:
        """The same layout with target spatial ``size`` ``(h, w)`` (or none)."""
        return replace(self, size=None if size is None else (int(size[0]), int(size[1])))


def as_stride(stride: float | Sequence[float]) -> Stride:
    """Normalise a scalar or pair stride to ``(sy, sx)`` floats."""
    if isinstance(stride, (int, float)):
        return (float(stride), float(stride))
    return (float(stride[0]), float(stride[1]))


def _ratio_stride(size_in: int, size_out: int) -> float:
    """Input positions per output position from sizes alone: 1 for small shrinks (valid
    convolutions), the rounded ratio for large ones (strided layers, floor pooling), the
    exact ratio for enlargements (``28 -> 32`` is 0.875: no whole shift of the input is a
    whole shift of the map, unless it is a multiple of 7); ``inf`` for an empty axis."""
    if not size_out:
        return math.inf
    r = size_in / size_out
    return 1.0 if 1.0 <= r < 1.5 else float(round(r)) if r >= 1.5 else r


def size_stride(input_hw: Sequence[int], hw: Sequence[int]) -> Stride:
    """Stride from sizes alone: input pixels per map position per axis
    (:func:`_ratio_stride`: 1 for small shrinks, ``round(H / h)`` for large ones, the exact
    ratio for enlargements)."""
    return (_ratio_stride(int(input_hw[0]), int(hw[0])),
            _ratio_stride(int(input_hw[1]), int(hw[1])))


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


def infer_token_grid(n_tokens: int, image_hw: Sequence[int],
                     given: TokenGrid | None = None) -> TokenGrid | None:
    """The ``(h, w, prefix)`` of a token output ``(B, n_tokens, C)``, per layer.

    With a ``given`` grid ``(h, w)`` the grid is kept and the prefix is what the token
    count leaves: ``n_tokens - h w``, which must be 0 (a patch layer before the [CLS]
    token is added) or the given prefix (``(h, w, prefix)``), or any count up to
    :data:`MAX_PREFIX` when none was given. Without one, the grid is the ``(h, w)`` with
    the fewest prefix tokens (at most :data:`MAX_PREFIX`) whose cells are whole,
    equal-sided patches of the image ``image_hw`` (``H / h == W / w``, an integer).
    ``None`` when no grid fits.
    """
    if given is not None:
        (h, w), prefix = split_grid(given)
        left = n_tokens - h * w
        allowed = {0, prefix} if len(given) == 3 else set(range(MAX_PREFIX + 1))
        return (h, w, left) if left in allowed else None
    big, wide = int(image_hw[0]), int(image_hw[1])
    for whole in (True, False):  # then patches that do not tile the image exactly
        for prefix in range(min(MAX_PREFIX, n_tokens - 1) + 1):
            cells = n_tokens - prefix
            for h in (h for h in range(1, min(cells, big) + 1) if cells % h == 0):
                w = cells // h
                fits = (big % h == 0 and wide % w == 0 and big // h == wide // w) if whole \
                    else (w <= wide and round(big / h) == round(wide / w))
                if fits:
                    return (h, w, prefix)
    return None


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


def subsampling_remainder(size: int, kernel: int, stride: int, padding: int = 0,
                          dilation: int = 1) -> int:
    """``(size + 2 padding - k_eff) mod stride`` with ``k_eff = dilation (kernel - 1) + 1``.

    0 means the layer's sampling grid is symmetric about the centre of its input along
    this axis (exact under flips of the axis, and under 90° rotations when both axes give
    0); otherwise the output grid's centre sits ``remainder / 2`` input positions before
    the input's centre. The exactness analyzer (:mod:`equivision.gcnn.rules`) and
    :func:`trace_geometry` both use this rule.
    """
    k_eff = dilation * (kernel - 1) + 1
    return (size + 2 * padding - k_eff) % stride


def _last_pair(value: object, neutral: int) -> tuple[int, int]:
    """The (height, width) entries of an int or tuple layer argument (last two of three)."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return (int(value[-2]), int(value[-1])) if len(value) >= 2 else (value[0], value[0])
    return (neutral, neutral)


def _is_transposed(module: nn.Module) -> bool:
    return getattr(module, "transposed", False) is True


def local_stride(module: nn.Module, hw_in: Sequence[int], hw_out: Sequence[int]) -> Stride:
    """Stride of one layer: its ``stride`` attribute for convolutions and pooling,
    otherwise 1 for small shrinks (valid convolutions), the rounded ratio for large
    ones and the exact ratio for upsampling (transposed convolutions included)."""
    own = getattr(module, "stride", None)
    if isinstance(module, _STRIDED) and own is not None and not _is_transposed(module):
        pair = own if isinstance(own, (tuple, list)) else (own, own)
        return (float(pair[-2] if len(pair) > 1 else pair[0]), float(pair[-1]))
    return size_stride(hw_in, hw_out)


def grid_shift(module: nn.Module, hw_in: Sequence[int], hw_out: Sequence[int]) -> Stride:
    """How far one layer moves the centre of the sampling grid, in positions of its input
    ``(dy, dx)``: ``-r / 2`` for a convolution or pooling with remainder ``r``
    (:func:`subsampling_remainder`; ``(s - r) / 2`` in ceil mode when its extra window is
    used), ``(after - before) / 2`` for a padding layer, else 0."""
    if hasattr(module, "kernel_size") and hasattr(module, "stride") \
            and not _is_transposed(module):
        kernel, stride = _last_pair(module.kernel_size, 1), _last_pair(module.stride, 1)
        dilation = _last_pair(getattr(module, "dilation", 1), 1)
        pad = getattr(module, "padding", 0)
        padding = (0, 0) if isinstance(pad, str) else _last_pair(pad, 0)
        out = []
        for a in range(2):
            r = subsampling_remainder(int(hw_in[a]), kernel[a], stride[a], padding[a],
                                      dilation[a])
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            floor_out = (int(hw_in[a]) + 2 * padding[a] - k_eff) // stride[a] + 1
            ceil_extra = r and int(hw_out[a]) > floor_out
            out.append((stride[a] - r) / 2 if ceil_extra else -r / 2)
        return (out[0], out[1])
    pad = getattr(module, "padding", None)
    if type(module).__module__ == nn.modules.padding.__name__ and isinstance(pad, tuple) \
            and len(pad) == 4:
        left, right, top, bottom = (int(v) for v in pad)
        return ((bottom - top) / 2, (right - left) / 2)
    return (0.0, 0.0)


@dataclass(frozen=True)
class Geometry:
    """Where a traced output sits on the image: ``stride`` (input pixels per position),
    ``offset`` (input pixels from the image's centre to the grid's centre, ``(dy, dx)``)
    and ``offset_from`` (the first layer that moved it off centre, or ""); ``size``:
    the output's ``(h, w)`` (``None``: the image's)."""

    stride: Stride = (1.0, 1.0)
    offset: Stride = (0.0, 0.0)
    offset_from: str = ""
    size: Size | None = None


def trace_geometry(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    in_hw: Mapping[str, Sequence[int] | None],
    out_hw: Mapping[str, Sequence[int] | None],
    image_hw: Sequence[int],
) -> dict[str, Geometry]:
    """The :class:`Geometry` of each spatial output, relative to the input image.

    Modules are visited in the order their forward passes ended (children before their
    container). A leaf's input geometry is looked up by the input's spatial size among
    the sizes seen so far (the image: stride 1, centred); its stride is multiplied by
    the leaf's own (:func:`local_stride`) and its grid moved by :func:`grid_shift`.
    A container (a module with children) takes the geometry its leaves gave its output
    size: a ResNet stage at 28 px ending on a 3x3 stride-2 pad-1 convolution has
    stride 8, not the rounded size ratio 28 / 4 = 7. Only sizes that no traced layer
    produced fall back to local or size ratios.
    """
    by_size: dict[tuple[int, ...], Geometry] = {tuple(image_hw): Geometry()}
    out: dict[str, Geometry] = {}
    for name in order:
        hi, ho = in_hw.get(name), out_hw.get(name)
        if ho is None:
            continue
        module = modules[name]
        container = any(True for _ in module.children())
        if container and tuple(ho) in by_size:
            geo = by_size[tuple(ho)]
        elif hi is None or tuple(hi) not in by_size:
            geo = Geometry(size_stride(image_hw, ho))
        else:
            base = by_size[tuple(hi)]
            local = local_stride(module, hi, ho)
            shift = (0.0, 0.0) if container else grid_shift(module, hi, ho)
            offset = tuple(o + s * d for o, s, d in zip(base.offset, base.stride, shift))
            moved = any(d != 0 for d in shift) and not base.offset_from
            geo = Geometry((base.stride[0] * local[0], base.stride[1] * local[1]),
                           offset,  # type: ignore[arg-type]
                           name if moved else base.offset_from)
        geo = replace(geo, size=(int(ho[0]), int(ho[1])))
        out[name] = geo
        by_size.setdefault(tuple(ho), geo)
    return out


def infer_strides(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    in_hw: Mapping[str, Sequence[int] | None],
    out_hw: Mapping[str, Sequence[int] | None],
    image_hw: Sequence[int],
) -> dict[str, Stride]:
    """Cumulative stride of each spatial output relative to the input image
    (:func:`trace_geometry`). This gives 2, not 3, for a valid 3x3 conv that maps
    12 -> 10 after a 2x2 pool, and 2 for the 1x1 stride-2 shortcut of a ResNet."""
    geo = trace_geometry(order, modules, in_hw, out_hw, image_hw)
    return {n: g.stride for n, g in geo.items()}
