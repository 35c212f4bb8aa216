"""Exactness of rotation / reflection equivariance under subsampling.

A strided convolution or pooling layer samples its input on a grid that starts at the
top-left corner. Rotating or mirroring the input moves that corner, so the layer keeps
exact equivariance only if its sampling grid is symmetric about the centre of its input.
With input size ``i``, kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` on an
axis (effective kernel ``k_eff = d (k - 1) + 1``) that is the case iff the remainder

    ``r = (i + 2p - k_eff) mod s``

is 0 (Edixhoven et al. 2023, "Using and abusing equivariance", eq. 3, written there without
padding and dilation). ``i`` is the layer's own input size, not the network input. A 90°
rotation needs ``r = 0`` on both axes and a square map; a horizontal flip only looks at
the width axis.

:func:`analyze_exactness` traces a model once on a dummy input with forward hooks, finds
the input size of every spatial layer and applies the rule layer by layer; it also watches
the tensor functions called directly in ``forward`` methods (``F.max_pool2d``, slicing
``x[..., ::2, ::2]``, ``F.pad``, ``F.interpolate``, ...), so subsampling written without
modules is not missed. Adaptive pooling is exact for every size (its windows
``[floor(j i / o), ceil((j + 1) i / o))`` are mirror-symmetric; to 1x1 it is global pooling),
given a square output under rotations. Layers it cannot reason about (interpolation,
transposed convolutions, asymmetric padding such as ``padding="same"`` with an even
kernel, flattening a map, unknown layers that change the spatial size) are reported as
*cannot verify*, never as exact. :func:`exact_sizes` and :func:`nearest_exact_size`
search input sizes, and :func:`empirical_equivariance_error` measures
``||f(g x) - g·f(x)|| / ||f(x)||`` in float64 to confirm a verdict.

The analysis assumes every layer is equivariant when it does not subsample (group
convolutions, rotation-symmetric filters, pointwise layers): it checks the sampling
geometry, not the weights. A verdict of *not exact* means the sampling grid of at least
one layer is misaligned (or a map is not square under rotations), which breaks
equivariance for generic weights and inputs; in degenerate cases on tiny maps (a misaligned
layer whose input is 1x1, windows whose real pixels are mirror-symmetric anyway, a later
global max over a misaligned max pool) the network can still be exact by accident.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..measure.compare import align, per_image_error
from ..transforms import Dihedral, Layout, ShapeError, infer_layout
from .norm_pool import GroupBatchNorm2d, GroupGlobalPool, GroupPool
from .weights import WeightJudge, elements, is_lowpass

__all__ = [
    "ALIGNED", "CANNOT_VERIFY", "CONSTRAINED", "EXACT", "MISALIGNED", "UNCONSTRAINED",
    "GROUPS", "NOT_EXACT", "ExactnessReport", "LayerExactness",
    "analyze_exactness", "empirical_equivariance_error", "exact_sizes", "infer_in_channels",
    "nearest_exact_size", "subsampling_remainder", "TraceError",
]

EXACT = "exact"
NOT_EXACT = "not exact"
CANNOT_VERIFY = "cannot verify"
ALIGNED = "aligned"
MISALIGNED = "misaligned"
CONSTRAINED = "constrained"
UNCONSTRAINED = "unconstrained"
#: groups the analyzer understands: p4 (rotations by 90°), p4m (rotations and flips) and
#: "flip" (horizontal reflection only, which looks at the width axis alone)
GROUPS = ("p4", "p4m", "flip")

Pair = tuple[int, int]


def subsampling_remainder(size: int, kernel: int, stride: int, padding: int = 0,
                          dilation: int = 1) -> int:
    """``(size + 2 padding - k_eff) mod stride`` with ``k_eff = dilation (kernel - 1) + 1``.

    0 means the layer's sampling grid is symmetric about the centre of its input along
    this axis (exact under flips of the axis, and under 90° rotations when both axes give 0).
    """
    k_eff = dilation * (kernel - 1) + 1
    return (size + 2 * padding - k_eff) % stride


def _tri(values: Iterator[bool | None]) -> str:
    """``"misaligned"`` if any value is False, else ``"cannot verify"`` if any is None, else
    ``"aligned"``."""
    seen = list(values)
    if any(v is False for v in seen):
        return MISALIGNED
    return CANNOT_VERIFY if any(v is None for v in seen) else ALIGNED


# ---- report ----------------------------------------------------------------------------------
@dataclass
class LayerExactness:
    """One spatial layer (or tensor function) met during the trace, in forward order.

    Attributes:
        name: module name (``"features.conv1"``); a second call of a shared module gets
            ``" (call 2)"``; tensor functions called in a ``forward`` are named
            ``"<module>:<function>()"``.
        type: class name of the module, or ``"function"``.
        kind: ``"conv"``, ``"pool"``, ``"adaptive pool"``, ``"global pool"``, ``"padding"``,
            ``"slice"``, ``"pointwise"`` (spatial size unchanged), ``"reshape"`` or
            ``"unknown"``.
        input_size: ``(H, W)`` of the layer's input.
        output_size: ``(H, W)`` of its output, ``None`` when the output is not a map.
        kernel_size, stride, padding, dilation: per axis ``(height, width)``; ``padding``
            is the padding before the map (top, left) when the two sides differ.
        remainder: ``(r_h, r_w)``, ``(i + 2p - k_eff) mod s`` per axis (for slices: the
            pixels left out at the end minus those left out at the start).
        exact: the sampling geometry: ``True`` (aligned: keeps exact equivariance given
            equivariant weights), ``False`` (misaligned: breaks it) or ``None`` (cannot
            verify).
        reason: why, in words.
        weights: the weights: ``True`` (constrained to the group, or no weights),
            ``False`` (unconstrained: a plain kernel that is not symmetric) or ``None``
            (cannot verify); see :mod:`equivision.gcnn.weights`.
        weights_reason: why, in words; empty for a layer without weights.
        lowpass: for convolutions, whether the kernel is a fixed blur (depthwise,
            non-negative, each kernel summing to 1: antialiased-cnns' BlurPool), which
            subsamples without aliasing; ``None`` when not known. Used by the translation
            mode (:mod:`equivision.gcnn.translation`).
    """

    name: str
    type: str
    kind: str
    input_size: Pair
    output_size: Pair | None = None
    kernel_size: Pair | None = None
    stride: Pair | None = None
    padding: Pair | None = None
    dilation: Pair | None = None
    remainder: Pair | None = None
    exact: bool | None = True
    reason: str = ""
    weights: bool | None = True
    weights_reason: str = ""
    lowpass: bool | None = None


@dataclass
class ExactnessReport:
    """Result of :func:`analyze_exactness`.

    Attributes:
        input_size: ``(H, W)`` of the network input that was analysed.
        group: ``"p4"``, ``"p4m"`` or ``"flip"``.
        layers: one :class:`LayerExactness` per spatial layer, in forward order.
        notes: network-level remarks (e.g. a non-square input under rotations).
    """

    input_size: Pair
    group: str
    layers: list[LayerExactness] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> str:
        """The sampling geometry: ``"aligned"`` if every layer's grid is, ``"misaligned"`` if
        any layer's is not (even when others cannot be verified), else ``"cannot verify"``."""
        return _tri(row.exact for row in self.layers)

    @property
    def weights(self) -> str:
        """The weights: ``"constrained"`` if every layer's are (or it has none),
        ``"unconstrained"`` if any layer's are not, else ``"cannot verify"``."""
        return {ALIGNED: CONSTRAINED, MISALIGNED: UNCONSTRAINED}.get(
            _tri(row.weights for row in self.layers), CANNOT_VERIFY)

    @property
    def verdict(self) -> str:
        """``"exact"`` when the geometry is aligned and the weights constrained; ``"not
        exact"`` when the geometry is misaligned or the weights unconstrained (even when other
        layers cannot be verified); else ``"cannot verify"``."""
        if self.geometry == MISALIGNED or self.weights == UNCONSTRAINED:
            return NOT_EXACT
        if self.geometry == ALIGNED and self.weights == CONSTRAINED:
            return EXACT
        return CANNOT_VERIFY

    @property
    def exact(self) -> bool | None:
        """``True`` / ``False`` / ``None`` for the verdicts exact / not exact / cannot verify."""
        return {EXACT: True, NOT_EXACT: False}.get(self.verdict)

    @property
    def breaking(self) -> list[LayerExactness]:
        """The layers whose sampling grid is misaligned or whose weights are unconstrained."""
        return [row for row in self.layers if row.exact is False or row.weights is False]

    @property
    def unverified(self) -> list[LayerExactness]:
        """The layers the analyzer cannot reason about (geometry or weights)."""
        return [row for row in self.layers if row not in self.breaking
                and (row.exact is None or row.weights is None)]

    def summary(self) -> str:
        """One line: the verdict, its two parts and the layers responsible for it."""
        h, w = self.input_size
        head = (f"{self.group} equivariance at input {h}x{w}: {self.verdict} (sampling "
                f"geometry: {self.geometry}; weights: {self.weights})")
        for word, rows in (("broken by ", self.breaking), ("unverified: ", self.unverified)):
            if rows:
                return head + f" ({word}" + ", ".join(r.name for r in rows[:6]) + (
                    ", ..." if len(rows) > 6 else "") + ")"
        return head

    def table(self, all_layers: bool = True) -> str:
        """Aligned text table, one row per layer.

        Args:
            all_layers: ``False`` keeps only the rows that matter for the verdict: layers
                that change the spatial size, subsample, or are not exact.
        """

        def pair(v: Pair | None) -> str:
            if v is None:
                return "-"
            return str(v[0]) if v[0] == v[1] else f"{v[0]},{v[1]}"

        def size(v: Pair | None) -> str:
            return "-" if v is None else f"{v[0]}x{v[1]}"

        mark = {True: "yes", False: "NO", None: "?"}
        header = ("layer", "type", "in", "out", "k", "s", "p", "d", "r", "grid", "weights",
                  "reason")
        rows = [header]
        for row in self.layers:
            if not all_layers and row.kind == "pointwise" and row.exact is True and (
                    row.weights is True):
                continue
            why = "; ".join(r for r in (row.reason, row.weights_reason) if r)
            rows.append((row.name, row.type, size(row.input_size), size(row.output_size),
                         pair(row.kernel_size), pair(row.stride), pair(row.padding),
                         pair(row.dilation), pair(row.remainder), mark[row.exact],
                         mark[row.weights] if row.weights_reason else "-", why))
        widths = [max(len(r[c]) for r in rows) for c in range(len(header) - 1)]
        lines = []
        for n, r in enumerate(rows):
            lines.append("  ".join(v.ljust(widths[c]) for c, v in enumerate(r[:-1]))
                         + "  " + r[-1])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        lines = [line.rstrip() for line in lines]
        lines.append(f"sampling geometry: {self.geometry}")
        lines.append(f"weights: {self.weights}")
        lines.append(f"verdict: {self.summary()}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary (tuples become lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {
            "input_size": list(self.input_size),
            "group": self.group,
            "verdict": self.verdict,
            "geometry": self.geometry,
            "weights": self.weights,
            "notes": list(self.notes),
            "layers": [plain(asdict(row)) for row in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.table()


class TraceError(RuntimeError, ValueError):
    """The model could not run on the trace input; the message names the failing layer."""


# ---- geometry helpers ------------------------------------------------------------------------
class _Unverifiable(Exception):
    """Raised while reading a layer's geometry that the analyzer cannot reason about."""


def _check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    return group


def _rotations(group: str) -> bool:
    return group in ("p4", "p4m")


def _axes(group: str) -> tuple[int, ...]:
    """Spatial axes (0 = height, 1 = width) whose sampling grid the group can mirror."""
    return (0, 1) if _rotations(group) else (1,)


def _size(input_size: int | Sequence[int]) -> Pair:
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


def _spatial_pair(value: Any, name: str, ndim: int, neutral: int) -> Pair:
    """The (height, width) entries of an int or tuple layer argument.

    A 3-element tuple (a 3-D layer on a ``(B, C, G, H, W)`` map) must leave the leading
    (group) axis alone, i.e. hold ``neutral`` there.
    """
    if isinstance(value, bool):
        raise _Unverifiable(f"{name}={value!r} is not a size")
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
                raise _Unverifiable(f"{name}={tuple(value)} acts on the group axis")
            return (value[1], value[2])
    raise _Unverifiable(f"{name}={value!r} is not understood")


def _padding(value: Any, kernel: Pair, dilation: Pair, ndim: int) -> tuple[Pair, Pair]:
    """``(before, after)`` padding per axis from an int, a tuple or ``"same"`` / ``"valid"``."""
    if isinstance(value, str):
        if value == "valid":
            return (0, 0), (0, 0)
        if value == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            before = tuple(t // 2 for t in total)
            after = tuple(t - b for t, b in zip(total, before))
            return before, after  # type: ignore[return-value]
        raise _Unverifiable(f"padding={value!r} is not understood")
    pad = _spatial_pair(value, "padding", ndim, 0)
    return pad, pad


def _conv_out(size: int, k_eff: int, stride: int, before: int, after: int,
              ceil_mode: bool) -> int:
    """Output length of a conv / pool along one axis (PyTorch's rule, ceil mode included)."""
    span = size + before + after - k_eff
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + before:  # the last window must start inside the map
        out -= 1
    return out


def _is_conv_like(module: nn.Module) -> bool:
    """Convolutions and pooling layers, built-in or custom: ``kernel_size`` and ``stride``
    attributes (``padding`` and ``dilation`` default to 0 and 1)."""
    return hasattr(module, "kernel_size") and hasattr(module, "stride")


def _is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvTransposeNd) or (
        getattr(module, "transposed", False) is True)


def _is_adaptive(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d,
                               nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
                               nn.AdaptiveMaxPool1d))


_PAD_MODULES = tuple(getattr(nn, n) for n in (
    "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "CircularPad2d",
    "ZeroPad3d", "ConstantPad3d", "ReflectionPad3d", "ReplicationPad3d", "CircularPad3d",
) if hasattr(nn, n))

_RESAMPLING_MODULES = (nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Fold, nn.Unfold,
                       nn.FractionalMaxPool2d, nn.MaxUnpool2d)

#: leaf modules analysed as one unit without watching their tensor functions: pointwise
#: activations, per-channel normalisation, dropout, reshapes, and the layers with rules
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Tanhshrink, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Softplus, nn.Softsign,
    nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax2d,
    nn.Flatten, nn.Unflatten, GroupBatchNorm2d, GroupPool, GroupGlobalPool,
)


def _is_trusted_leaf(module: nn.Module) -> bool:
    """Leaf modules whose effect the analyzer knows from their type; every other leaf module
    is looked into: the tensor functions its ``forward`` calls are watched one by one."""
    return isinstance(module, _POINTWISE_MODULES + _PAD_MODULES + _RESAMPLING_MODULES) or (
        _is_adaptive(module) or _is_transposed(module))


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def _first_tensor(obj: Any) -> Tensor | None:
    return next(_tensors(obj), None)


def _hw(t: Tensor | None) -> Pair | None:
    """``(H, W)`` of a 4-D map or 5-D group map, else ``None``."""
    if t is None or t.dim() not in (4, 5):
        return None
    return (int(t.shape[-2]), int(t.shape[-1]))


# ---- per-layer rules -------------------------------------------------------------------------
class _Rules:
    """Turns the geometry of one layer call into a :class:`LayerExactness` row."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.axes = _axes(group)

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
        expected = tuple(_conv_out(i, ke, s, b, a, ceil_mode) for i, ke, s, b, a in
                         zip(in_hw, k_eff, stride, before, after))
        if not out_is_map or out_hw != expected:
            got = "not a feature map" if not out_is_map or out_hw is None else \
                f"{out_hw[0]}x{out_hw[1]}"
            row.exact = None
            row.reason = (f"output is {got}, not the {expected[0]}x{expected[1]} of a "
                          "convolution / pooling with these sizes; the layer does something "
                          "else")
            return row
        if _rotations(self.group):
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
            k = _spatial_pair(kernel, "kernel_size", ndim, 1)
            s = _spatial_pair(stride, "stride", ndim, 1)
            p = _spatial_pair(padding, "padding", ndim, 0)
            d = _spatial_pair(dilation, "dilation", ndim, 1)
        except _Unverifiable as err:
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
        if _rotations(self.group) and aniso:
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
        elif _rotations(self.group) and factors[0] != factors[1]:
            row.exact = False
            row.reason = "anisotropic upsampling: a 90° rotation swaps the axes"
        else:
            row.reason = f"{mode} upsampling by an integer factor is mirror-symmetric"
        return row

    def adaptive(self, name: str, type_: str, in_hw: Pair, out: Tensor | None,
                 output_size: Any, ndim: int) -> LayerExactness:
        """Adaptive pooling: window ``j`` spans ``[floor(j i / o), ceil((j + 1) i / o))``,
        which is mirror-symmetric for every ``i`` and ``o``."""
        out_hw = _hw(out)
        row = LayerExactness(name, type_, "adaptive pool", in_hw, out_hw)
        try:
            if isinstance(output_size, (tuple, list)) and len(output_size) in (2, 3):
                target = tuple(output_size[-2:])
                if len(output_size) == 3 and ndim != 5:
                    raise _Unverifiable
            elif output_size is None or isinstance(output_size, int):
                target = (output_size, output_size)
            else:
                raise _Unverifiable
        except _Unverifiable:
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
        elif _rotations(self.group) and target[0] != target[1]:
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
        if _rotations(self.group):
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
        in_hw = _hw(x)
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


# ---- tracing ---------------------------------------------------------------------------------
_CONV_FUNCS = {"conv2d", "conv3d"}
_POOL_ARGS = {
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "max_pool2d_with_indices": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "max_pool3d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "max_pool3d_with_indices": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode"),
    "avg_pool3d": ("kernel_size", "stride", "padding", "ceil_mode"),
    "lp_pool2d": ("norm_type", "kernel_size", "stride", "ceil_mode"),
}
_ADAPTIVE_FUNCS = {"adaptive_avg_pool2d", "adaptive_max_pool2d",
                   "adaptive_max_pool2d_with_indices", "adaptive_avg_pool3d",
                   "adaptive_max_pool3d", "adaptive_max_pool3d_with_indices"}
_RESAMPLING_FUNCS = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
                     "grid_sample", "pixel_shuffle", "pixel_unshuffle", "fold", "unfold",
                     "conv_transpose2d", "conv_transpose3d", "fractional_max_pool2d",
                     "max_unpool2d"}
_UPSAMPLING_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "nansum", "nanmean",
               "norm", "std", "var", "prod", "median", "nanmedian"}


def _bind(names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict:
    """Positional arguments after the input, by name, merged with the keyword arguments."""
    bound = dict(zip(names, args[1:]))
    bound.update(kwargs)
    return bound


#: functions that act on each pixel alone (elementwise maths, per-channel normalisation,
#: dtype / memory changes, channel-wise concatenation and splitting, same-size reshapes);
#: in-place variants (``relu_``) are matched without their trailing underscore
_POINTWISE_FUNCS = {
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
    "remainder", "fmod", "pow", "float_power", "neg", "abs", "exp", "exp2", "log", "log2",
    "log10", "log1p", "expm1", "sqrt", "rsqrt", "square", "reciprocal", "sign", "sigmoid",
    "tanh", "sin", "cos", "erf", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu",
    "silu", "mish", "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "threshold",
    "prelu", "rrelu", "logsigmoid", "tanhshrink", "hardshrink", "softshrink", "clamp", "clip",
    "clamp_min", "clamp_max", "maximum", "minimum", "fmax", "fmin", "where", "masked_fill",
    "lerp", "addcmul", "addcdiv", "nan_to_num", "batch_norm", "instance_norm", "group_norm",
    "layer_norm", "local_response_norm", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "detach", "to", "float",
    "double", "half", "bfloat16", "type", "type_as", "cat", "concat", "concatenate", "stack",
    "chunk", "split", "tensor_split", "unbind", "narrow", "view", "reshape", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as", "reshape_as",
    "zeros_like", "ones_like", "empty_like", "full_like", "requires_grad", "copy", "sum", "mean",
    "amax", "amin", "max", "min", "gt", "lt", "ge", "le", "eq", "ne", "logical_and",
    "logical_or", "logical_not", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
    "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__",
    "__itruediv__", "__floordiv__", "__pow__", "__rpow__", "__neg__", "__abs__", "__and__",
    "__or__", "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__",
}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _leading_index(index: Any, ndim: int) -> bool:
    """Whether ``x[index]`` indexes only axes before the two spatial ones."""
    parts = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis not in parts:
        return len([p for p in parts if p is not None]) <= ndim - 2
    tail = parts[parts.index(Ellipsis) + 1:]
    return all(isinstance(p, slice) and p == slice(None) for p in tail)


def _keeps_spatial_axes(fname: str, args: tuple, kwargs: dict, ndim: int) -> bool:
    """Whether a transpose / permute / movedim leaves the two spatial axes where they are."""
    dims = [a for a in args[1:] if isinstance(a, int)] + [
        a for v in list(args[1:]) + list(kwargs.values()) if isinstance(v, (tuple, list))
        for a in v]
    if fname == "permute":
        order = [d % ndim for d in dims]
        return order[-2:] == [ndim - 2, ndim - 1]
    return not {d % ndim for d in dims if isinstance(d, int)} & {ndim - 2, ndim - 1}


class _Tracer(TorchFunctionMode):
    """Forward hooks on every module plus a watch on tensor functions called between them."""

    def __init__(self, model: nn.Module, group: str, judge: WeightJudge | None = None) -> None:
        super().__init__()
        self.model = model
        self.judge = judge or WeightJudge(model, group)
        self.rules = _Rules(group)
        self.rows: list[LayerExactness] = []
        self.depth = 0          # > 0 inside a module analysed as one layer
        self.paused = False     # True while our own hook code runs
        self.owners: list[str] = []
        self.inputs: list[Tensor | None] = []
        self.active: dict[int, Tensor] = {}   # tensors computed from the input
        self.calls: dict[str, int] = {}
        self.handles: list[Any] = []
        self.pads: dict[int, LayerExactness] = {}   # asymmetric padding, by output tensor

    # -- hooks --
    def attach(self) -> None:
        for name, module in self.model.named_modules():
            unit = _is_conv_like(module) or (not any(True for _ in module.children())
                                             and _is_trusted_leaf(module))
            self.handles.append(module.register_forward_pre_hook(
                self._pre(name or "model", unit), with_kwargs=True))
            self.handles.append(module.register_forward_hook(
                self._post(name or "model", module, unit), with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def mark(self, t: Tensor) -> None:
        if t.is_floating_point():
            self.active[id(t)] = t

    def _pre(self, name: str, unit: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.paused = True
            try:
                self.owners.append(name)
                if unit:
                    self.depth += 1
                    self.inputs.append(_first_tensor((args, kwargs)))
            finally:
                self.paused = False

        return hook

    def _post(self, name: str, module: nn.Module, unit: bool):
        def hook(module_: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.paused = True
            try:
                self.owners.pop()
                for t in _tensors(output):
                    self.mark(t)
                if unit:
                    self.depth -= 1
                    x = self.inputs.pop()
                    if x is not None and _hw(x) is not None:
                        count = self.calls[name] = self.calls.get(name, 0) + 1
                        label = name if count == 1 else f"{name} (call {count})"
                        row = self._module_row(label, module, x, output)
                        if row.kernel_size is not None and row.exact is not None:
                            row.weights, row.weights_reason = self.judge.module(
                                name, module, x, row.kernel_size, row.stride, row.padding,
                                row.dilation)
                            weight = getattr(self.judge.modules.get(name, module), "weight",
                                             None)
                            if isinstance(weight, Tensor):
                                row.lowpass = is_lowpass(weight)
                        self.rows.append(self.rules.finish(row))
                        self._remember_pad(row, _first_tensor(output))
            finally:
                self.paused = False

        return hook

    # -- modules --
    def _module_row(self, name: str, module: nn.Module, x: Tensor,
                    output: Any) -> LayerExactness:
        type_ = type(module).__name__
        in_hw = _hw(x)
        assert in_hw is not None
        y = _first_tensor(output)
        out_hw = _hw(y)
        ndim = x.dim()
        rules = self.rules
        if (y is not None and ndim == 5 and y.dim() == 5
                and y.shape[2] not in (x.shape[2], 1) and not _is_conv_like(module)):
            return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                                  reason=f"changes the group axis from {x.shape[2]} to "
                                         f"{y.shape[2]}; cannot verify")
        if _is_transposed(module):
            return rules.transposed(name, type_, in_hw, out_hw, module.kernel_size,
                                    module.stride, module.padding, module.dilation, ndim)
        if isinstance(module, nn.Upsample):
            return rules.upsample(name, type_, in_hw, out_hw, module.scale_factor,
                                  module.recompute_scale_factor, module.mode, ndim)
        if _is_adaptive(module):
            return rules.adaptive(name, type_, in_hw, y, getattr(module, "output_size", None),
                                  ndim)
        if isinstance(module, _RESAMPLING_MODULES):
            return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                                  reason="resampling layer; cannot verify")
        if _is_conv_like(module):
            kind = "pool" if "pool" in type_.lower() else "conv"
            if y is not None and ndim == 5 and y.dim() == 5 and y.shape[2] != x.shape[2]:
                return LayerExactness(name, type_, kind, in_hw, out_hw, exact=None,
                                      reason=f"changes the group axis from {x.shape[2]} to "
                                             f"{y.shape[2]}; cannot verify")
            try:
                kernel = _spatial_pair(module.kernel_size, "kernel_size", ndim, 1)
                raw_stride = module.stride
                stride = kernel if raw_stride is None or raw_stride == () else _spatial_pair(
                    raw_stride, "stride", ndim, 1)
                dilation = _spatial_pair(getattr(module, "dilation", 1), "dilation", ndim, 1)
                before, after = _padding(getattr(module, "padding", 0), kernel, dilation, ndim)
            except _Unverifiable as err:
                return LayerExactness(name, type_, kind, in_hw, out_hw, exact=None,
                                      reason=f"{err}; cannot verify")
            return self._strided(x, name, type_, kind, in_hw, out_hw, kernel, stride, before,
                                 after, dilation, bool(getattr(module, "ceil_mode", False)),
                                 str(getattr(module, "padding_mode", "zeros")),
                                 out_is_map=out_hw is not None)
        if isinstance(module, _PAD_MODULES):
            return rules.pad(name, type_, in_hw, out_hw, module.padding, ndim)
        if out_hw is None:
            return rules.reshape(name, type_, x, y)
        if out_hw == in_hw:
            return LayerExactness(name, type_, "pointwise", in_hw, out_hw,
                                  reason="spatial size unchanged")
        return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                              reason=f"unknown layer changes the size from {in_hw[0]}x"
                                     f"{in_hw[1]} to {out_hw[0]}x{out_hw[1]}; cannot verify")

    # -- padding judged with the layer that reads it --
    def _remember_pad(self, row: LayerExactness, out: Tensor | None) -> None:
        """Keep an asymmetric padding row until the strided layer that reads its output."""
        if row.kind == "padding" and row.exact is False and out is not None:
            self.pads[id(out)] = row

    def _strided(self, x: Tensor, name: str, type_: str, kind: str, in_hw: Pair,
                 out_hw: Pair | None, kernel: Pair, stride: Pair, before: Pair, after: Pair,
                 dilation: Pair, ceil_mode: bool = False, padding_mode: str = "zeros",
                 out_is_map: bool = True) -> LayerExactness:
        """:meth:`_Rules.strided`, with an asymmetric padding right before it folded in: the
        two are one layer with padding ``before`` / ``after`` on the unpadded map."""
        pad = self.pads.pop(id(x), None)
        if pad is not None and pad.padding is not None and pad.remainder is not None:
            in_hw = pad.input_size
            before = (before[0] + pad.padding[0], before[1] + pad.padding[1])
            after = (after[0] + pad.padding[0] + pad.remainder[0],
                     after[1] + pad.padding[1] + pad.remainder[1])
        row = self.rules.strided(name, type_, kind, in_hw, out_hw, kernel, stride, before,
                                 after, dilation, ceil_mode, padding_mode, out_is_map)
        if pad is not None:
            row.reason += f" (padding of {pad.name} included)"
            if row.exact is not False:
                pad.exact = row.exact
                pad.reason += f"; judged together with {name}"
        return row

    # -- tensor functions --
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and self.active:
            inputs = [t for t in _tensors((args, kwargs)) if id(t) in self.active]
            if inputs:
                for t in _tensors(out):
                    self.mark(t)
                if self.depth == 0:
                    x = next((t for t in inputs if t.dim() in (4, 5)), None)
                    y = args[0] if _name(func) == "__setitem__" else _first_tensor(out)
                    if x is not None and isinstance(y, Tensor) and y.is_floating_point():
                        self.paused = True
                        try:
                            row = self._function_row(func, args, kwargs, x, y)
                        finally:
                            self.paused = False
                        if row is not None:
                            self.rows.append(self.rules.finish(row))
                            self._remember_pad(row, y)
        return out

    def _function_row(self, func: Any, args: tuple, kwargs: dict, x: Tensor,
                      y: Tensor) -> LayerExactness | None:
        fname = _name(func)
        owner = self.owners[-1] if self.owners else "model"
        name = f"{owner}:{fname}()"
        in_hw = _hw(x)
        assert in_hw is not None
        out_hw = _hw(y)
        ndim = x.dim()
        rules = self.rules
        first_is_x = bool(args) and args[0] is x
        try:
            if fname in _CONV_FUNCS and first_is_x:
                p = _bind(("weight", "bias", "stride", "padding", "dilation"), args, kwargs)
                weight = p["weight"]
                if weight.dim() == 5 and weight.shape[2] != 1:
                    raise _Unverifiable(f"a {tuple(weight.shape[2:])} kernel mixes the group axis")
                kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
                stride = _spatial_pair(p.get("stride", 1), "stride", ndim, 1)
                dilation = _spatial_pair(p.get("dilation", 1), "dilation", ndim, 1)
                before, after = _padding(p.get("padding", 0), kernel, dilation, ndim)
                row = self._strided(x, name, "function", "conv", in_hw, out_hw, kernel, stride,
                                    before, after, dilation, out_is_map=out_hw is not None)
                row.weights, row.weights_reason = self.judge.kernel(weight)
                row.lowpass = is_lowpass(self.judge.value(weight))
                return row
            if fname in _POOL_ARGS and first_is_x:
                p = _bind(_POOL_ARGS[fname], args, kwargs)
                kernel = _spatial_pair(p["kernel_size"], "kernel_size", ndim, 1)
                raw = p.get("stride")
                stride = kernel if raw is None or raw == () or raw == [] else _spatial_pair(
                    raw, "stride", ndim, 1)
                dilation = _spatial_pair(p.get("dilation", 1), "dilation", ndim, 1)
                before, after = _padding(p.get("padding", 0), kernel, dilation, ndim)
                return self._strided(x, name, "function", "pool", in_hw, out_hw, kernel, stride,
                                     before, after, dilation, bool(p.get("ceil_mode", False)),
                                     out_is_map=out_hw is not None)
        except _Unverifiable as err:
            return LayerExactness(name, "function", "unknown", in_hw, out_hw, exact=None,
                                  reason=f"{err}; cannot verify")
        if fname in _ADAPTIVE_FUNCS and first_is_x:
            size = _bind(("output_size",), args, kwargs).get("output_size")
            return rules.adaptive(name, "function", in_hw, y, size, ndim)
        if fname == "interpolate" and first_is_x:
            p = _bind(("size", "scale_factor", "mode", "align_corners",
                       "recompute_scale_factor"), args, kwargs)
            return rules.upsample(name, "function", in_hw, out_hw, p.get("scale_factor"),
                                  p.get("recompute_scale_factor"), p.get("mode", "nearest"),
                                  ndim)
        if fname == "conv_transpose2d" and first_is_x:
            p = _bind(("weight", "bias", "stride", "padding", "output_padding", "groups",
                       "dilation"), args, kwargs)
            weight = p["weight"]
            row = rules.transposed(name, "function", in_hw, out_hw,
                                   tuple(weight.shape[-2:]), p.get("stride", 1),
                                   p.get("padding", 0), p.get("dilation", 1), ndim)
            if row.exact is not None:
                row.weights, row.weights_reason = self.judge.kernel(weight)
            return row
        if fname in _RESAMPLING_FUNCS:
            return LayerExactness(name, "function", "unknown", in_hw, out_hw, exact=None,
                                  reason="resampling function; cannot verify")
        if fname == "pad" and first_is_x:
            pads = _bind(("pad",), args, kwargs).get("pad")
            if isinstance(pads, (tuple, list)):
                return rules.pad(name, "function", in_hw, out_hw, pads, ndim)
        if fname == "__getitem__" and first_is_x and len(args) > 1:
            row = self._slice_row(name, in_hw, out_hw, ndim, args[1], y)
            if row is not None:
                return row
        if fname in _REDUCTIONS and first_is_x:
            dims = _bind(("dim",), args, kwargs).get("dim", kwargs.get("axis"))
            if dims is None and len(args) == 1:
                dims = tuple(range(ndim))
            if isinstance(dims, int):
                dims = (dims,)
            if isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims):
                reduced = {d % ndim for d in dims}
                spatial = reduced & {ndim - 2, ndim - 1}
                if spatial == {ndim - 2, ndim - 1}:
                    return LayerExactness(name, "function", "global pool", in_hw, out_hw,
                                          reason=f"global {fname} over H and W")
                if not spatial and out_hw == in_hw:
                    return None
        if out_hw is not None and out_hw == in_hw:
            return self._same_size(name, fname, args, kwargs, in_hw, ndim)
        if out_hw is None and y.dim() < 4:
            return rules.reshape(name, "function", x, y)
        got = "?" if out_hw is None else f"{out_hw[0]}x{out_hw[1]}"
        return LayerExactness(name, "function", "unknown", in_hw, out_hw, exact=None,
                              reason=f"{fname} changes the map from {in_hw[0]}x{in_hw[1]} to "
                                     f"{got}; cannot verify")

    def _same_size(self, name: str, fname: str, args: tuple, kwargs: dict, in_hw: Pair,
                   ndim: int) -> LayerExactness | None:
        """A function whose output map has the input's size: ``None`` when it acts pixel by
        pixel (and every tensor it mixes in is invariant), else a row saying why not."""
        base = fname if fname.startswith("__") else fname.rstrip("_")
        spatial = {ndim - 2, ndim - 1}
        moves = None
        if base in ("__getitem__", "__setitem__") and len(args) > 1:
            moves = not _leading_index(args[1], ndim)
        elif base in ("transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis"):
            moves = not _keeps_spatial_axes(base, args, kwargs, ndim)
        elif base in ("softmax", "log_softmax", "softmin"):
            dim = _bind(("dim",), args, kwargs).get("dim")
            moves = not isinstance(dim, int) or dim % ndim in spatial
        elif base in _POINTWISE_FUNCS:
            moves = False
        if moves is not False:
            return LayerExactness(name, "function", "unknown", in_hw, in_hw, exact=None,
                                  reason=f"{fname}() keeps the {in_hw[0]}x{in_hw[1]} size but "
                                         "is not known to act pixel by pixel (it may move "
                                         "pixels); cannot verify")
        for t in _tensors((args, kwargs)):
            if id(t) in self.active or t.dim() < 2 or tuple(t.shape[-2:]) == (1, 1):
                continue
            ok, why = self.judge.invariant(t)
            if ok is not True:
                return LayerExactness(
                    name, "function", "positional", in_hw, in_hw, exact=ok,
                    reason=f"{fname}() mixes in a position-dependent tensor of shape "
                           f"{tuple(t.shape)} ({why})" + ("" if ok is False else
                                                          "; cannot verify"))
        return None

    def _slice_row(self, name: str, in_hw: Pair, out_hw: Pair | None, ndim: int, index: Any,
                   y: Tensor) -> LayerExactness | None:
        """``x[..., a:b:s, c:d:t]``: exact iff the kept positions are centred on each axis."""
        parts = list(index) if isinstance(index, tuple) else [index]
        if any(p is None or not isinstance(p, (slice, int, type(Ellipsis))) or isinstance(
                p, bool) for p in parts):
            return None
        if parts.count(Ellipsis) > 1:
            return None
        if Ellipsis in parts:
            at = parts.index(Ellipsis)
            fill = ndim - (len(parts) - 1)
            parts = parts[:at] + [slice(None)] * fill + parts[at + 1:]
        parts = parts + [slice(None)] * (ndim - len(parts))
        if len(parts) != ndim or y.dim() != ndim:
            return None
        spatial = parts[-2:]
        if not all(isinstance(p, slice) for p in spatial):
            return None
        steps, firsts, gaps = [], [], []
        for p, n in zip(spatial, in_hw):
            start, stop, step = p.indices(n)
            kept = range(start, stop, step)
            if step < 0 or len(kept) == 0:
                return LayerExactness(name, "function", "slice", in_hw, out_hw, exact=None,
                                      reason=f"slice {p} reverses or empties an axis; "
                                             "cannot verify")
            steps.append(step)
            firsts.append(kept[0])
            gaps.append(n - 1 - kept[-1] - kept[0])
        if out_hw == in_hw:
            return None
        row = LayerExactness(name, "function", "slice", in_hw, out_hw, (1, 1), tuple(steps),
                             None, (1, 1), tuple(gaps))  # type: ignore[arg-type]
        axes = self.rules.axes
        bad = [a for a in axes if gaps[a] != 0]
        if _rotations(self.rules.group) and (steps[0] != steps[1] or (
                firsts[0] != firsts[1] and not bad)):
            row.exact = False
            row.reason = "anisotropic slicing: a 90° rotation swaps the axes"
        elif bad:
            row.exact = False
            row.reason = "kept positions not centred: " + ", ".join(
                f"{gaps[a]} more left out at the end than at the start of {'HW'[a]}"
                for a in bad)
        else:
            row.reason = "kept positions centred on the map"
        row.reason += f" (first kept: {firsts[0]}, {firsts[1]})"
        return row


# ---- model helpers ---------------------------------------------------------------------------
def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def infer_in_channels(model: nn.Module) -> int:
    """Input channels of a model: its ``in_channels`` attribute if it is an int, else those of
    the first convolution (its ``in_channels`` attribute, or ``weight.shape[1] * groups``).

    Raises:
        ValueError: when neither exists; pass ``in_channels`` explicitly.
    """
    own = getattr(model, "in_channels", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 4 and _is_conv_like(module):
            c = getattr(module, "in_channels", None)
            if isinstance(c, int) and not isinstance(c, bool):
                return c
            return int(weight.shape[1]) * int(getattr(module, "groups", 1))
    raise ValueError(f"cannot infer the input channels of {type(model).__name__}: it has no "
                     "convolution with a weight; pass in_channels=")


def _trace(model: nn.Module, hw: Pair, in_channels: int, group: str,
           device: torch.device | None = None, dtype: torch.dtype | None = None,
           judge: WeightJudge | None = None) -> ExactnessReport:
    dev, dt = _device_dtype(model)
    device, dtype = device or dev, dtype or dt
    modes = {m: m.training for m in model.modules()}
    tracer = _Tracer(model, group, judge)
    x = torch.zeros(1, in_channels, *hw, device=device, dtype=dtype)
    tracer.mark(x)
    model.eval()
    tracer.attach()
    try:
        with torch.no_grad(), tracer:
            model(x)
    except Exception as err:
        layer = tracer.owners[-1] if tracer.owners else "model"
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise TraceError(
            f"cannot trace {type(model).__name__} at input {hw[0]}x{hw[1]} with {in_channels} "
            f"channels: layer '{layer}' failed ({type(err).__name__}: {first}); try another "
            "input size (exact_sizes lists the sizes that run) or pass in_channels") from err
    finally:
        tracer.detach()
        for m, training in modes.items():
            m.training = training
    report = ExactnessReport(hw, group, tracer.rows)
    if _rotations(group) and hw[0] != hw[1]:
        report.notes.append(f"the input {hw[0]}x{hw[1]} is not square: a 90° rotation turns it "
                            f"into {hw[1]}x{hw[0]}; the verdict is about f(R x) = R f(x) with "
                            "both sizes going through the network")
    if not report.layers:
        report.notes.append("no spatial layer was found")
    return report


def analyze_exactness(model: nn.Module, input_size: int | tuple[int, int],
                      in_channels: int | None = None, group: str = "p4") -> ExactnessReport:
    """Which layers of ``model`` keep exact ``group`` equivariance at this input size.

    Traces one forward pass of a zero input ``(1, in_channels, H, W)`` on the model's device
    (eval mode, no gradients; the train / eval mode of every module is restored) and applies
    the subsampling rule ``(i + 2p - k_eff) mod s == 0`` to every convolution and pooling
    layer, with ``i`` the layer's own input size.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)`` images. Convolutions and pooling are
            recognised by their ``kernel_size`` / ``stride`` / ``padding`` / ``dilation``
            attributes, so custom (group) convolutions work too; their inputs may be maps
            ``(B, C, H, W)`` or group maps ``(B, C, G, H, W)``.
        input_size: ``H`` (square) or ``(H, W)``.
        in_channels: input channels; inferred with :func:`infer_in_channels` if ``None``.
        group: ``"p4"`` (90° rotations: both axes, square maps), ``"p4m"`` (rotations and
            flips) or ``"flip"`` (horizontal flips: the width axis only).

    Returns:
        An :class:`ExactnessReport`; its ``verdict`` is ``"exact"``, ``"not exact"`` or
        ``"cannot verify"``.

    Raises:
        TraceError: (a RuntimeError and a ValueError) the model failed on the trace input;
            one line naming the failing layer and what to do.
        ValueError: an unknown group, a bad input size, no way to infer in_channels.
    """
    _check_group(group)
    hw = _size(input_size)
    channels = infer_in_channels(model) if in_channels is None else in_channels
    return _trace(model, hw, channels, group)


# ---- size search -----------------------------------------------------------------------------
class _SizeProbe:
    """Analyses many input sizes; traces a shape-only (``meta``) copy of the model when
    that works, which costs no arithmetic, and the model itself otherwise."""

    def __init__(self, model: nn.Module, in_channels: int | None, group: str) -> None:
        self.model = model
        self.group = _check_group(group)
        self.in_channels = infer_in_channels(model) if in_channels is None else in_channels
        self.judge = WeightJudge(model, group)
        self.meta: nn.Module | None = None
        try:
            self.meta = copy.deepcopy(model).to("meta")
            self.judge.link(self.meta)
        except Exception:  # any failure just disables the fast path
            self.meta = None

    def __call__(self, size: int) -> ExactnessReport | None:
        """The report at ``size`` x ``size``, or ``None`` if the forward pass fails."""
        if self.meta is not None:
            try:
                return _trace(self.meta, (size, size), self.in_channels, self.group,
                              torch.device("meta"), judge=self.judge)
            except Exception:  # retried on the real model below
                pass
        try:
            report = _trace(self.model, (size, size), self.in_channels, self.group,
                            judge=self.judge)
        except (RuntimeError, ValueError, IndexError, AssertionError):
            return None
        self.meta = None  # the meta copy failed where the model works: stop using it
        return report

    def exact(self, size: int) -> bool:
        report = self(size) if size >= 1 else None
        return report is not None and report.verdict == EXACT


def exact_sizes(model: nn.Module, start: int, stop: int, in_channels: int | None = None,
                group: str = "p4") -> list[int]:
    """The square input sizes ``n`` in ``[start, stop]`` (inclusive) at which ``model`` is
    exactly ``group``-equivariant; sizes at which the forward pass fails are left out."""
    if stop < start:
        return []
    probe = _SizeProbe(model, in_channels, group)
    return [n for n in range(max(1, start), stop + 1) if probe.exact(n)]


def nearest_exact_size(model: nn.Module, size: int, in_channels: int | None = None,
                       group: str = "p4", max_distance: int | None = None
                       ) -> tuple[int | None, int | None]:
    """The nearest exact square input sizes ``(below, above)`` with ``below <= size <=
    above`` (both equal ``size`` if it is exact).

    Searches up to ``max_distance`` pixels away (default ``max(size // 2, 8)``); ``None``
    where no exact size lies in that window.
    """
    probe = _SizeProbe(model, in_channels, group)
    if probe.exact(size):
        return size, size
    reach = max(size // 2, 8) if max_distance is None else max_distance
    below = next((n for n in range(size - 1, max(0, size - reach - 1), -1) if probe.exact(n)),
                 None)
    above = next((n for n in range(size + 1, size + reach + 1) if probe.exact(n)), None)
    return below, above


# ---- empirical check -------------------------------------------------------------------------
def _output_layout(y: Tensor) -> Layout:
    """The layout of a model output ``(B, C)``, ``(B, C, H, W)`` or ``(B, C, G, H, W)``."""
    if y.dim() == 3:
        raise ValueError(f"cannot act on an output of shape {tuple(y.shape)}; expected (B, C), "
                         "(B, C, H, W) or (B, C, G, H, W)")
    return infer_layout(y)


def _rotate_any(g: Dihedral, t: Tensor) -> Tensor:
    """``g`` acting on a possibly non-square ``(B, C)`` / ``(B, C, H, W)`` / ``(B, C, G, H,
    W)`` tensor: an odd rotation turns ``H x W`` into ``W x H`` (the transforms refuse such a
    map because its shape changes; here both shapes are the network's own outputs)."""
    if t.dim() < 4:
        return t
    out = torch.rot90(torch.flip(t, (-1,)) if g.flip else t, g.k, (-2, -1))
    if t.dim() == 5:
        perm = g.group_permutation({4: "p4", 8: "p4m"}[int(t.shape[2])])
        out = out[:, :, perm]
    return out


def empirical_equivariance_error(model: nn.Module, input_size: int | tuple[int, int],
                                 group: str = "p4", in_channels: int | None = None,
                                 dtype: torch.dtype = torch.float64, seed: int = 0,
                                 batch_size: int = 2) -> float:
    """Largest relative equivariance error ``||f(g x) - g·f(x)|| / ||f(x)||`` over the
    non-identity elements ``g`` of ``group`` (Frobenius norms over the whole batch).

    Runs a deep copy of the model in eval mode in ``dtype`` (float64: an exactly
    equivariant network gives ~1e-15) on a random normal input ``(batch_size, C, H, W)``
    drawn with ``seed``. The output's layout comes from its shape
    (:func:`~equivision.transforms.layout.infer_layout`): ``(B, C)`` vectors are left as
    they are (invariance), ``(B, C, H, W)`` maps are rotated / flipped, ``(B, C, G, H, W)``
    group maps also have their group axis permuted (group ``p4`` for G = 4, ``p4m`` for
    G = 8); the comparison is :func:`~equivision.measure.compare.align` and
    :func:`~equivision.measure.compare.per_image_error`.

    A non-square input ``H x W`` is compared with the network's output on the rotated ``W x
    H`` input (the outputs' shapes must agree after the rotation).

    Raises:
        ShapeError: f(g x) and g·f(x) differ in shape (a network with a fixed non-square
            output under 90° rotations).
        InexactActionError: flips of a p4 group map (p4 has no reflections).
    """
    _check_group(group)
    hw = _size(input_size)
    channels = infer_in_channels(model) if in_channels is None else in_channels
    device, _ = _device_dtype(model)
    net = copy.deepcopy(model).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, *hw, generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        y = _first_tensor(net(x))
        if y is None:
            raise ValueError(f"{type(model).__name__} returned no tensor")
        scale = float(torch.linalg.vector_norm(y))
        layout = _output_layout(y)
        worst = 0.0
        square = hw[0] == hw[1]
        for g in elements(group):
            yg = _first_tensor(net(g.apply_image(x) if square else _rotate_any(g, x)))
            assert yg is not None
            if square:
                diff = float(torch.linalg.vector_norm(per_image_error(*align(yg, y, g,
                                                                             layout))))
            elif yg.shape != _rotate_any(g, y).shape:
                raise ShapeError(f"f(g x) has shape {tuple(yg.shape)}, g·f(x) has "
                                 f"{tuple(_rotate_any(g, y).shape)}")
            else:
                diff = float(torch.linalg.vector_norm(yg - _rotate_any(g, y)))
            if scale == 0.0:
                err = 0.0 if diff == 0.0 else math.inf
            else:
                err = diff / scale
            worst = max(worst, err)
    return worst
