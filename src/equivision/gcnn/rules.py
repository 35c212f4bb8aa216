"""Per-layer rules of the exactness analyzer: the geometry of one layer call (kernel, stride,
padding, dilation, upsampling factor) turned into a :class:`~equivision.gcnn.verdict.LayerExactness`
row, and the helpers that read that geometry from modules and arguments."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..transforms.layout import subsampling_remainder  # noqa: F401  (the one rule, re-exported)
from .norm_pool import GroupBatchNorm2d, GroupGlobalPool, GroupPool
from .verdict import GROUPS, LayerExactness, Pair

#: interpolation modes whose sampling is mirror-symmetric for integer upsampling factors
_UPSAMPLING_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


# ---- geometry helpers ------------------------------------------------------------------------
class Unverifiable(Exception):
    """Raised while reading a layer's geometry that the analyzer cannot reason about."""


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    return group


def rotations(group: str) -> bool:
    return group in ("p4", "p4m")


def group_axes(group: str) -> tuple[int, ...]:
    """Spatial axes (0 = height, 1 = width) whose sampling grid the group can mirror."""
    return (0, 1) if rotations(group) else (1,)


def parse_size(input_size: int | Sequence[int]) -> Pair:
    if isinstance(input_size, bool):
        raise TypeError(f"input_size must be an int or (H, W), got {input_size!r}")
    if isinstance(input_size, int):
        pair: tuple[int, ...] = (input_size, input_size)
    else:
        pair = tuple(input_size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                             for v in pair):
        raise ValueError(f"input_size must be a positive int or a pair (H, W), got "
                         f"{input_size!r}")
    return pair  # type: ignore[return-value]


def spatial_pair(value: Any, name: str, ndim: int, neutral: int) -> Pair:
    """The (height, width) entries of an int or tuple layer argument.

    A 3-element tuple (a 3-D layer on a ``(B, C, G, H, W)`` map) must leave the leading
    (group) axis alone, i.e. hold ``neutral`` there.
    """
    if isinstance(value, bool):
        raise Unverifiable(f"{name}={value!r} is not a size")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in value):
        if len(value) == 1:
            return (value[0], value[0])
        if len(value) == 2:
            return (value[0], value[1])
        if len(value) == 3 and ndim == 5:
            if value[0] != neutral:
                raise Unverifiable(f"{name}={tuple(value)} acts on the group axis")
            return (value[1], value[2])
    raise Unverifiable(f"{name}={value!r} is not understood")


def padding_pair(value: Any, kernel: Pair, dilation: Pair, ndim: int) -> tuple[Pair, Pair]:
    """``(before, after)`` padding per axis from an int, a tuple or ``"same"`` / ``"valid"``."""
    if isinstance(value, str):
        if value == "valid":
            return (0, 0), (0, 0)
        if value == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            before = tuple(t // 2 for t in total)
            after = tuple(t - b for t, b in zip(total, before))
            return before, after  # type: ignore[return-value]
        raise Unverifiable(f"padding={value!r} is not understood")
    pad = spatial_pair(value, "padding", ndim, 0)
    return pad, pad


def conv_out(size: int, k_eff: int, stride: int, before: int, after: int,
              ceil_mode: bool) -> int:
    """Output length of a conv / pool along one axis (PyTorch's rule, ceil mode included)."""
    span = size + before + after - k_eff
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + before:  # the last window must start inside the map
        out -= 1
    return out


def is_conv_like(module: nn.Module) -> bool:
    """Convolutions and pooling layers, built-in or custom: ``kernel_size`` and ``stride``
    attributes (``padding`` and ``dilation`` default to 0 and 1)."""
    return hasattr(module, "kernel_size") and hasattr(module, "stride")


def is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd) or (
        getattr(module, "transposed", False) is True)


def is_adaptive(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d,
                               nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                               nn.AdaptiveMaxPool1d))


PAD_MODULES = tuple(getattr(nn, n) for n in (
    "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "CircularPad2d",
    "ZeroPad3d", "ConstantPad3d", "ReflectionPad3d", "ReplicationPad3d", "CircularPad3d",
) if hasattr(nn, n))

RESAMPLING_MODULES = (nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold, nn.Unfold,
                       nn.FractionalMaxPool2d, nn.MaxUnpool2d)

#: leaf modules analysed as one unit without watching their tensor functions: pointwise
#: activations, per-channel normalisation, dropout, reshapes, and the layers with rules
POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Tanhshrink, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Softplus, nn.Softsign,
    nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax2d,
    nn.Flatten, nn.Unflatten, GroupBatchNorm2d, GroupPool, GroupGlobalPool,
)


def is_trusted_leaf(module: nn.Module) -> bool:
    """Leaf modules whose effect the analyzer knows from their type; every other leaf module
    is looked into: the tensor functions its ``forward`` calls are watched one by one."""
    return isinstance(module, POINTWISE_MODULES + PAD_MODULES + RESAMPLING_MODULES) or (
        is_adaptive(module) or is_transposed(module))


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from iter_tensors(item)


def first_tensor(obj: Any) -> Tensor | None:
    return next(iter_tensors(obj), None)


def map_size(t: Tensor | None) -> Pair | None:
    """``(H, W)`` of a 4-D map or 5-D group map, else ``None``."""
    if t is None or t.dim() not in (4, 5):
        return None
    return (int(t.shape[-2]), int(t.shape[-1]))


# ---- per-layer rules -------------------------------------------------------------------------
class Rules:
    """Turns the geometry of one layer call into a :class:`LayerExactness` row."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.axes = group_axes(group)

    def strided(self, name: str, type_: str, kind: str, in_hw: Pair, out_hw: Pair | None,
                kernel: Pair, stride: Pair, before: Pair, after: Pair, dilation: Pair,
                ceil_mode: bool = False, padding_mode: str = "zeros",
                out_is_map: bool = True) -> LayerExactness:
        """A convolution or pooling layer: the subsampling rule."""
        k_eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        remainder = tuple((i + b + a - ke) % s for i, b, a, ke, s in
                          zip(in_hw, before, after, k_eff, stride))
        row = LayerExactness(name, type_, kind, in_hw, out_hw, kernel, stride, before, dilation,
                             remainder)  # type: ignore[arg-type]
        expected = tuple(conv_out(i, ke, s, b, a, ceil_mode) for i, ke, s, b, a in
                         zip(in_hw, k_eff, stride, before, after))
        if not out_is_map or out_hw != expected:
            got = "not a feature map" if not out_is_map or out_hw is None else \
                f"{out_hw[0]}x{out_hw[1]}"
            row.exact = None
            row.reason = (f"output is {got}, not the {expected[0]}x{expected[1]} of a "
                          "convolution / pooling with these sizes; the layer does something "
                          "else")
            return row
        if rotations(self.group):
            aniso = [n for n, v in (("kernel", kernel), ("stride", stride), ("padding", before),
                                    ("padding", after), ("dilation", dilation)) if v[0] != v[1]]
            if aniso:
                row.exact = False
                row.reason = ("anisotropic " + ", ".join(dict.fromkeys(aniso))
                              + ": a 90° rotation swaps the axes")
                return row
        if any(before[a] != after[a] for a in self.axes):
            return self._asymmetric(row, before, after, stride, remainder, ceil_mode)
        bad = [a for a in self.axes if remainder[a] != 0]
        extra = "" if padding_mode in ("zeros", "") else f"; {padding_mode} padding"
        if ceil_mode:
            extra += "; ceil mode"
        if bad:
            row.exact = False
            row.reason = ("sampling grid misaligned: (i + 2p - k_eff) mod s = "
                          + ", ".join(f"{remainder[a]} on {'HW'[a]}" for a in bad) + extra)
        elif all(stride[a] == 1 for a in self.axes):
            row.reason = "stride 1" + extra
        else:
            row.reason = "(i + 2p - k_eff) mod s = 0" + extra
        return row

    def _asymmetric(self, row: LayerExactness, before: Pair, after: Pair, stride: Pair,
                    remainder: Pair, ceil_mode: bool) -> LayerExactness:
        """Padding ``b`` before and ``a`` after: the windows, from ``-b`` to ``-b + (o - 1) s
        + k_eff - 1``, are mirror-symmetric iff ``(o - 1) s = i + 2b - k_eff``, i.e. iff the
        remainder ``(i + b + a - k_eff) mod s`` equals ``a - b`` (BlurPool: ``b = 1, a = 2,
        k = 4, s = 2`` at even sizes). Padding values (zeros, reflection, replication,
        circular) sit mirror-symmetrically around the map, so the rule is the whole story."""
        sides = ", ".join(f"{'HW'[a]}: {before[a]} before / {after[a]} after" for a in self.axes
                          if before[a] != after[a])
        if ceil_mode:
            row.exact = None
            row.reason = f"asymmetric padding ({sides}) in ceil mode; cannot verify"
            return row
        bad = [a for a in self.axes if remainder[a] != after[a] - before[a]]
        row.exact = not bad
        row.reason = (f"asymmetric padding ({sides}): (i + p_before + p_after - k_eff) mod s "
                      + ("= p_after - p_before: windows mirror-symmetric" if not bad else
                         "!= p_after - p_before on " + ", ".join('HW'[a] for a in bad)
                         + ": sampling grid misaligned"))
        return row

    def transposed(self, name: str, type_: str, in_hw: Pair, out_hw: Pair | None,
                   kernel: Any, stride: Any, padding: Any, dilation: Any,
                   ndim: int) -> LayerExactness:
        """A transposed convolution scatters input ``i`` to ``i s - p + d t`` (``t < k``).
        Mirroring input ``i`` to ``n - 1 - i`` mirrors these positions onto themselves iff
        the output has ``o = (n - 1) s - 2p + d (k - 1) + 1`` pixels, i.e. iff the output
        padding (read off the actual output size) is 0, at every input size."""
        row = LayerExactness(name, type_, "transposed conv", in_hw, out_hw)
        try:
            k = spatial_pair(kernel, "kernel_size", ndim, 1)
            s = spatial_pair(stride, "stride", ndim, 1)
            p = spatial_pair(padding, "padding", ndim, 0)
            d = spatial_pair(dilation, "dilation", ndim, 1)
        except Unverifiable as err:
            row.exact, row.reason = None, f"{err}; cannot verify"
            return row
        if out_hw is None:
            row.exact, row.reason = None, "output is not a feature map; cannot verify"
            return row
        extra = tuple(o - ((n - 1) * s_ - 2 * p_ + d_ * (k_ - 1) + 1)
                      for o, n, k_, s_, p_, d_ in zip(out_hw, in_hw, k, s, p, d))
        row.kernel_size, row.stride, row.padding, row.dilation = k, s, p, d
        row.remainder = extra  # type: ignore[assignment]
        aniso = [n_ for n_, v in (("kernel", k), ("stride", s), ("padding", p),
                                  ("dilation", d)) if v[0] != v[1]]
        bad = [a for a in self.axes if extra[a] != 0]
        if rotations(self.group) and aniso:
            row.exact = False
            row.reason = "anisotropic " + ", ".join(aniso) + ": a 90° rotation swaps the axes"
        elif bad:
            row.exact = False
            row.reason = ("output padding " + ", ".join(f"{extra[a]} on {'HW'[a]}" for a in bad)
                          + ": the scattered grid is not mirror-symmetric")
        else:
            row.reason = "no output padding: the scattered grid is mirror-symmetric"
        return row

    def upsample(self, name: str, type_: str, in_hw: Pair, out_hw: Pair | None,
                 scale_factor: Any, recompute: Any, mode: Any, ndim: int) -> LayerExactness:
        """Upsampling by an integer factor ``f``: output ``j`` reads around
        ``(j + 1/2) / f - 1/2`` (bilinear, bicubic; clamped at both ends), ``floor(j / f)``
        (nearest) or averages a window (area), all mirror-symmetric when the output has
        exactly ``n f`` pixels; ``align_corners=True`` maps ``j`` to ``j (n - 1) / (o - 1)``,
        symmetric too. A non-integer factor is not vouched for (nearest sampling with it is
        not symmetric, and PyTorch reads with ``1 / scale_factor``, not ``n / o``)."""
        row = LayerExactness(name, type_, "upsample", in_hw, out_hw)
        if ndim != 4 or out_hw is None or mode not in _UPSAMPLING_MODES:
            row.exact = None
            row.reason = f"{mode} resampling of this map; cannot verify"
            return row
        factors = [o / i for o, i in zip(out_hw, in_hw)]
        if scale_factor is not None and recompute is not True:
            given = scale_factor if isinstance(scale_factor, (tuple, list)) else (
                scale_factor, scale_factor)
            factors = [float(f) for f in given[-2:]]
        whole = all(float(f).is_integer() and f >= 1 and o == i * int(f)
                    for f, o, i in zip(factors, out_hw, in_hw))
        row.stride = tuple(int(f) if float(f).is_integer() else 0 for f in factors)  # type: ignore
        if not whole:
            row.exact = None
            row.reason = (f"{mode} resampling by {factors[0]:g}x{factors[1]:g} (not an integer "
                          "upsampling factor); cannot verify")
        elif rotations(self.group) and factors[0] != factors[1]:
            row.exact = False
            row.reason = "anisotropic upsampling: a 90° rotation swaps the axes"
        else:
            row.reason = f"{mode} upsampling by an integer factor is mirror-symmetric"
        return row

    def adaptive(self, name: str, type_: str, in_hw: Pair, out: Tensor | None,
                 output_size: Any, ndim: int) -> LayerExactness:
        """Adaptive pooling: window ``j`` spans ``[floor(j i / o), ceil((j + 1) i / o))``,
        which is mirror-symmetric for every ``i`` and ``o``."""
        out_hw = map_size(out)
        row = LayerExactness(name, type_, "adaptive pool", in_hw, out_hw)
        try:
            if isinstance(output_size, (tuple, list)) and len(output_size) in (2, 3):
                target = tuple(output_size[-2:])
                if len(output_size) == 3 and ndim != 5:
                    raise Unverifiable
            elif output_size is None or isinstance(output_size, int):
                target = (output_size, output_size)
            else:
                raise Unverifiable
        except Unverifiable:
            row.exact = None
            row.reason = f"output_size={output_size!r} is not understood"
            return row
        target = tuple(i if t is None else t for t, i in zip(target, in_hw))
        if out_hw is not None and out_hw != target:
            row.exact = None
            row.reason = (f"output {out_hw[0]}x{out_hw[1]} differs from output_size "
                          f"{target[0]}x{target[1]}; the layer does something else")
            return row
        if out_hw is None and out is not None and target != (1, 1):
            row.exact = None
            row.reason = "output is not a feature map"
            return row
        if target == (1, 1):
            row.kind = "global pool"
            row.reason = "global pooling (adaptive to 1x1)"
        elif rotations(self.group) and target[0] != target[1]:
            row.exact = False
            row.reason = f"non-square output {target[0]}x{target[1]} under 90° rotations"
        else:
            row.reason = "adaptive pooling windows are mirror-symmetric"
        return row

    def pad(self, name: str, type_: str, in_hw: Pair, out_hw: Pair | None,
            pads: Sequence[int], ndim: int) -> LayerExactness:
        """Explicit padding ``(left, right, top, bottom[, front, back])``."""
        row = LayerExactness(name, type_, "padding", in_hw, out_hw)
        pads = list(pads) + [0] * (4 - len(pads))
        left, right, top, bottom = pads[:4]
        if any(pads[4:]):
            row.exact = None
            row.reason = f"pads dimensions other than H and W: {tuple(pads)}"
            return row
        row.padding = (top, left)
        row.remainder = (bottom - top, right - left)
        wrong = []
        if right != left:
            wrong.append(f"left {left} / right {right}")
        if rotations(self.group):
            if bottom != top:
                wrong.append(f"top {top} / bottom {bottom}")
            if top != left:
                wrong.append(f"top {top} / left {left}")
        if wrong:
            row.exact = False
            row.reason = "asymmetric padding: " + ", ".join(wrong)
        else:
            row.reason = "symmetric padding"
        return row

    def reshape(self, name: str, type_: str, x: Tensor, out: Tensor | None) -> LayerExactness:
        """A layer whose output is not a map (flatten, custom reductions)."""
        in_hw = map_size(x)
        assert in_hw is not None
        row = LayerExactness(name, type_, "reshape", in_hw, None)
        if in_hw == (1, 1) and x.dim() == 4:
            row.reason = "turns a 1x1 map into a vector"
        elif in_hw == (1, 1):
            row.exact = None
            row.reason = "flattens the group axis of a 1x1 group map into a vector"
        else:
            row.exact = None
            row.reason = (f"turns a {in_hw[0]}x{in_hw[1]} map into a "
                          f"{'non-tensor' if out is None else f'{out.dim()}-D tensor'}; "
                          "position-dependent layers may follow")
        return row

    def finish(self, row: LayerExactness) -> LayerExactness:
        """Hook for network-wide requirements on a row; none at present.

        A non-square map needs no special case under 90° rotations: the rotated input
        ``W x H`` goes through the same layers with the axes swapped, and each layer's rule,
        isotropic in its kernel, stride, padding and dilation, holds on both axes or not at
        all; layers with a fixed non-square output (adaptive pooling to ``(2, 3)``) are caught
        by their own rule. So ``exact`` on an ``H x W`` input means ``f(R x) = R f(x)`` for a
        network that takes both sizes.
        """
        return row

