"""Exactness of rotation / reflection equivariance under subsampling.

A strided convolution or pooling layer samples its input on a grid that starts at the
top-left corner. Rotating or mirroring the input moves that corner, so the layer keeps
exact equivariance only if its sampling grid is symmetric about the centre of its input.
With input size ``i``, kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` on an
axis (effective kernel ``k_eff = d (k - 1) + 1``) that is the case iff the remainder

    ``r = (i + 2p - k_eff) mod s``

is 0 (Edixhoven et al. 2023, "Using and abusing equivariance", eq. 3, written there without
padding and dilation). ``i`` is the layer's own input size, not the network input. With
padding ``b`` before and ``a`` after (``padding="same"`` with an even kernel, or an explicit
``ReflectionPad2d([1, 2, 1, 2])`` folded into the strided layer that reads it, as in
BlurPool) the windows are mirror-symmetric iff ``(i + b + a - k_eff) mod s = a - b``. A 90°
rotation needs the rule on both axes and isotropic layers; a horizontal flip looks at the
width axis only. A non-square ``H x W`` input is fine under rotations: the rotated ``W x H``
input goes through the same layers, so "exact" there means ``f(R x) = R f(x)``.

The verdict has two parts (:mod:`equivision.gcnn.verdict`): the **sampling geometry**
(aligned / misaligned / cannot verify, the rule above) and the **weights** (constrained /
unconstrained / cannot verify, :mod:`equivision.gcnn.weights`: group convolutions by their
group, plain kernels by a numerical symmetry check, other conv-like layers by a numerical
check of the layer alone). "exact" means both; a plain CNN at an aligned size is "not
exact" because of its weights.

The tracer (:mod:`equivision.gcnn.tracing`) runs one forward pass with hooks on every module
and watches every tensor function called between them and inside leaf modules whose type it
does not know (a conv and an upsampling written in one module are two rows). A function
that keeps the map size but is not known to act pixel by pixel (``torch.roll``, transposing
the spatial axes) is "cannot verify"; a tensor with spatial extent mixed into a map
(CoordConv coordinates, a positional parameter) is checked for invariance. Upsampling by an
integer factor and transposed convolutions without output padding have rules
(:mod:`equivision.gcnn.rules`). Unknown operations give "cannot verify", never "exact".
:func:`exact_sizes` and :func:`nearest_exact_size` search input sizes;
:func:`aligned_sizes` and :func:`nearest_aligned_size` search them for the geometry alone
(for a plain CNN, whose weights are unconstrained, no size is exact); and
:func:`empirical_equivariance_error` measures ``||f(g x) - g·f(x)|| / ||f(x)||`` in float64
to confirm a verdict. In degenerate cases on tiny maps (a misaligned layer whose input is
1x1, a later global max over a misaligned max pool) a "not exact" network can still be
exact by accident.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..measure.compare import align, per_image_error
from ..transforms import Dihedral, Layout, ShapeError, infer_layout
from .rules import check_group, first_tensor, parse_size, subsampling_remainder
from .tracing import TraceError, device_dtype, infer_in_channels, trace
from .verdict import (
    ALIGNED,
    CANNOT_VERIFY,
    CONSTRAINED,
    EXACT,
    GROUPS,
    MISALIGNED,
    NOT_EXACT,
    UNCONSTRAINED,
    ExactnessReport,
    LayerExactness,
)
from .weights import WeightJudge, elements

__all__ = [
    "ALIGNED", "CANNOT_VERIFY", "CONSTRAINED", "EXACT", "MISALIGNED", "UNCONSTRAINED",
    "GROUPS", "NOT_EXACT", "ExactnessReport", "LayerExactness",
    "aligned_sizes", "analyze_exactness", "empirical_equivariance_error", "exact_sizes",
    "infer_in_channels", "nearest_aligned_size", "nearest_exact_size", "subsampling_remainder",
    "TraceError",
]


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
    check_group(group)
    hw = parse_size(input_size)
    channels = infer_in_channels(model) if in_channels is None else in_channels
    return trace(model, hw, channels, group)


# ---- size search -----------------------------------------------------------------------------
class _SizeProbe:
    """Analyses many input sizes; traces a shape-only (``meta``) copy of the model when
    that works, which costs no arithmetic, and the model itself otherwise."""

    def __init__(self, model: nn.Module, in_channels: int | None, group: str) -> None:
        self.model = model
        self.group = check_group(group)
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
                return trace(self.meta, (size, size), self.in_channels, self.group,
                              torch.device("meta"), judge=self.judge)
            except Exception:  # retried on the real model below
                pass
        try:
            report = trace(self.model, (size, size), self.in_channels, self.group,
                            judge=self.judge)
        except (RuntimeError, ValueError, IndexError, AssertionError):
            return None
        self.meta = None  # the meta copy failed where the model works: stop using it
        return report

    def exact(self, size: int) -> bool:
        """Whether the model is exact (aligned geometry, constrained weights) at ``size``."""
        report = self(size) if size >= 1 else None
        return report is not None and report.verdict == EXACT

    def aligned(self, size: int) -> bool:
        """Whether the sampling geometry is aligned at ``size``, whatever the weights."""
        report = self(size) if size >= 1 else None
        return report is not None and report.geometry == ALIGNED


def _nearest(test: Callable[[int], bool], size: int, max_distance: int | None
             ) -> tuple[int | None, int | None]:
    """The nearest sizes ``(below, above)`` passing ``test`` within ``max_distance`` pixels
    (default ``max(size // 2, 8)``), both ``size`` if it passes; ``None`` where none does."""
    if test(size):
        return size, size
    reach = max(size // 2, 8) if max_distance is None else max_distance
    below = next((n for n in range(size - 1, max(0, size - reach - 1), -1) if test(n)), None)
    above = next((n for n in range(size + 1, size + reach + 1) if test(n)), None)
    return below, above


def exact_sizes(model: nn.Module, start: int, stop: int, in_channels: int | None = None,
                group: str = "p4") -> list[int]:
    """The square input sizes ``n`` in ``[start, stop]`` (inclusive) at which ``model`` is
    exactly ``group``-equivariant; sizes at which the forward pass fails are left out.

    Empty for a model whose weights are not constrained (a plain CNN): see
    :func:`aligned_sizes` for the sizes at which its sampling geometry is aligned."""
    if stop < start:
        return []
    probe = _SizeProbe(model, in_channels, group)
    return [n for n in range(max(1, start), stop + 1) if probe.exact(n)]


def aligned_sizes(model: nn.Module, start: int, stop: int, in_channels: int | None = None,
                  group: str = "p4") -> list[int]:
    """The square input sizes ``n`` in ``[start, stop]`` (inclusive) at which every layer's
    sampling grid is aligned for ``group`` (the geometry half of the verdict); sizes at
    which the forward pass fails are left out.

    The weights are not looked at: for a plain CNN these are the sizes at which a network
    with ``group``-constrained kernels would be exact, and at which data augmentation or
    learned equivariance is not fought by the subsampling. They are not "exact" sizes
    unless the weights are constrained too (then they equal :func:`exact_sizes`)."""
    if stop < start:
        return []
    probe = _SizeProbe(model, in_channels, group)
    return [n for n in range(max(1, start), stop + 1) if probe.aligned(n)]


def nearest_exact_size(model: nn.Module, size: int, in_channels: int | None = None,
                       group: str = "p4", max_distance: int | None = None
                       ) -> tuple[int | None, int | None]:
    """The nearest exact square input sizes ``(below, above)`` with ``below <= size <=
    above`` (both equal ``size`` if it is exact).

    Searches up to ``max_distance`` pixels away (default ``max(size // 2, 8)``); ``None``
    where no exact size lies in that window (always, for unconstrained weights).
    """
    return _nearest(_SizeProbe(model, in_channels, group).exact, size, max_distance)


def nearest_aligned_size(model: nn.Module, size: int, in_channels: int | None = None,
                         group: str = "p4", max_distance: int | None = None
                         ) -> tuple[int | None, int | None]:
    """As :func:`nearest_exact_size`, for the sampling geometry alone (see
    :func:`aligned_sizes`): the nearest square sizes ``(below, above)`` at which every
    layer's grid is aligned, whatever the weights."""
    return _nearest(_SizeProbe(model, in_channels, group).aligned, size, max_distance)


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
    check_group(group)
    hw = parse_size(input_size)
    channels = infer_in_channels(model) if in_channels is None else in_channels
    device, _ = device_dtype(model)
    net = copy.deepcopy(model).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, *hw, generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        y = first_tensor(net(x))
        if y is None:
            raise ValueError(f"{type(model).__name__} returned no tensor")
        scale = float(torch.linalg.vector_norm(y))
        layout = _output_layout(y)
        worst = 0.0
        square = hw[0] == hw[1]
        for g in elements(group):
            yg = first_tensor(net(g.apply_image(x) if square else _rotate_any(g, x)))
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
