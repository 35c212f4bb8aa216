"""The one comparison core: ``f(g x)`` against ``g·f(x)``.

Every equivariance check of equivision goes through this module:

* measurement (:func:`~equivision.measure.engine.measure`) feeds
  :class:`~equivision.measure.stats.PairStats` with :meth:`Comparator.accumulate`;
* the SER probe (:func:`~equivision.ssl.probe.equivariance_scores`) does the same;
* the group-CNN empirical check
  (:func:`~equivision.gcnn.exactness.empirical_equivariance_error`) uses
  :func:`align` and :func:`per_image_error`;
* the equivariance defense's loss and score (:mod:`equivision.robust.views`) bring each
  view back with :func:`align_back` and compare with :func:`pairwise_cosines`.

Alignment acts with ``g`` on ``f(x)`` according to its
:class:`~equivision.transforms.layout.Layout` (maps, group maps, tokens; vectors are
invariant). A flip or 90° rotation of a map whose sampling grid is off the image's
centre (``layout.offset``, a strided layer with ``(i + 2p - k_eff) mod s != 0`` before
it) has no exact action, like a shift that is not a multiple of the stride: both raise
:class:`~equivision.transforms.InexactActionError`. The valid mask ``(h, w)`` keeps the
positions of ``g·f(x)`` whose value comes from inside the map, optionally eroded by a
margin of input pixels; a comparison left with none raises :class:`NoValidPositions`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..transforms import Compose, Dihedral, InexactActionError, Layout, Transform, Translation
from .stats import PairStats

__all__ = [
    "PAIRINGS", "AlignmentError", "Aligned", "Comparator", "NoInverse", "NoValidPositions",
    "align",
    "align_back", "check_grid", "erode", "mirrored_axes", "pairwise_cosines",
    "per_image_cosine", "per_image_error",
]

#: How views are compared: each against the untransformed view, or all pairs.
PAIRINGS = ("identity", "pairs")


class AlignmentError(ValueError):
    """``f(g x)`` and ``g·f(x)`` do not have the same shape (the output size depends on
    the content, or the transformation changes the size of this map)."""


class NoInverse(InexactActionError, AlignmentError):
    """A transformation that changes the image size, at a layer whose output size does
    not follow the image's (a fixed-size resampling, a size set in ``forward``): there is
    no known action of it on this layer."""


class NoValidPositions(InexactActionError):
    """No position of the map is left to compare under this transformation (a shift
    that moves the whole map out of view, or a margin wider than the map)."""


def mirrored_axes(g: Transform) -> set[int]:
    """The spatial axes (0: height, 1: width) that ``g`` mirrors about the map's centre:
    a flip of one axis, both for a 90° or 180° rotation; none for other transformations
    (a composition: those of its parts)."""
    if isinstance(g, Compose):
        return set().union(*(mirrored_axes(t) for t in g.transforms))
    if not isinstance(g, Dihedral) or g.is_identity:
        return set()
    if g.k % 2 == 1 or (g.k == 2 and not g.flip):
        return {0, 1}
    return {0} if g.k == 2 else {1}  # vflip = R^2 F, hflip = F


def check_grid(g: Transform, layout: Layout) -> None:
    """Raise :class:`~equivision.transforms.InexactActionError` when ``g`` mirrors an axis
    on which the map's sampling grid is off the image's centre (``layout.offset``): the
    exactness analyzer's rule, ``(i + 2p - k_eff) mod s = 0`` for every strided layer
    (:func:`~equivision.transforms.layout.subsampling_remainder`), does not hold."""
    if layout.kind not in ("map", "group"):
        return
    bad = [a for a in sorted(mirrored_axes(g)) if layout.offset[a] != 0]
    if bad:
        where = ", ".join(f"{layout.offset[a]:g} px on {'HW'[a]}" for a in bad)
        since = f" from layer {layout.offset_from!r} on" if layout.offset_from else ""
        raise InexactActionError(
            f"{g.name} has no exact action on this map: its sampling grid is off the image's "
            f"centre by {where}{since}, where (i + 2p - k_eff) mod s != 0; measure at an "
            "input size where it is 0 for every strided layer (gcnn's nearest_exact_size)")


def no_valid_positions(g: Transform, layout: Layout, hw: tuple[int, int]) -> str | None:
    """Why a shift leaves no position of an ``hw`` map to compare, or ``None``: it moves
    the map's whole extent out of view, or moves an axis that has a single position."""
    if not isinstance(g, Translation) or layout.kind not in ("map", "group"):
        return None
    sy, sx = layout.stride
    h, w = hw
    if (g.dy and (h == 1 or abs(g.dy) >= h * sy)) or (g.dx and (w == 1 or abs(g.dx) >= w * sx)):
        return (f"no valid positions: {g.name} moves every position of this {h}x{w} map "
                f"(stride {sy:g}, {sx:g}) out of it")
    return None


@dataclass
class Aligned:
    """One compared pair: ``a = f(g x)``, ``b = g·f(x)`` (same shape: ``(B, C)``,
    ``(B, C, h, w)`` or ``(B, C, G, h, w)``) and the valid mask ``(h, w)`` (None: all)."""

    a: Tensor
    b: Tensor
    mask: Tensor | None = None


def erode(mask: Tensor, margin: int, stride: tuple[float, float]) -> Tensor:
    """Drop positions of ``mask`` (h, w) within ``margin`` input pixels of an invalid
    position or of the map's edge. Masks with no invalid position are returned as
    they are: transformations that keep every position (rot90, flips) map the edge
    onto itself, so padding there is not a border effect."""
    if margin <= 0 or bool(mask.all()):
        return mask
    ry = max(1, math.ceil(margin / stride[0]))
    rx = max(1, math.ceil(margin / stride[1]))
    bad = torch.nn.functional.pad((~mask).float()[None, None], (rx, rx, ry, ry), value=1.0)
    grown = torch.nn.functional.max_pool2d(bad, (2 * ry + 1, 2 * rx + 1), stride=1)
    return grown[0, 0] == 0


def align(fgx: Tensor, fx: Tensor, g: Transform, layout: Layout) -> tuple[Tensor, Tensor]:
    """``(f(g x), g·f(x))`` with ``g`` acting on ``f(x)`` per ``layout``.

    Raises:
        ShapeError / InexactActionError: from the action (e.g. rot90 of a non-square
            map, a shift that is not a multiple of the stride).
        AlignmentError: when the two do not have the same shape.
    """
    check_grid(g, layout)
    gfx = g.act(fx, layout)
    if fx.dim() >= 4 and gfx.shape[-2:] != fx.shape[-2:] and fgx.shape != gfx.shape:
        gfx = _follow_size(fgx, fx, gfx, g, layout)
    if fgx.shape != gfx.shape:
        raise AlignmentError(
            f"f(gX) has shape {tuple(fgx.shape)} but g·f(X) {tuple(gfx.shape)} under {g.name}")
    return fgx, gfx


def _follow_size(fgx: Tensor, fx: Tensor, gfx: Tensor, g: Transform, layout: Layout
                 ) -> Tensor:
    """``g·f(x)`` landing on the size of ``f(g x)`` when ``g`` changes the map size and the
    network rounded it the other way (one position per axis at most).

    Raises:
        NoInverse: when the layer's size does not follow the image's (the same size as
            before, or more than one position away from ``g``'s).
    """
    got, want, before = tuple(fgx.shape[-2:]), tuple(gfx.shape[-2:]), tuple(fx.shape[-2:])
    if got != before and all(abs(a - b) <= 1 for a, b in zip(got, want)):
        return g.act(fx, layout.with_size(got))
    raise NoInverse(
        f"{g.name} makes this {before[0]}x{before[1]} map {want[0]}x{want[1]}, but the layer "
        f"gave {got[0]}x{got[1]}: its size does not follow the image's, so {g.name} has no "
        "known action on it; not measured")


def align_back(g: Transform | None, fgx: Tensor, layout: Layout) -> Tensor:
    """``g^-1 · f(g x)``, in the frame of ``f(x)`` whose layout (with its spatial ``size``)
    is ``layout``; ``g=None`` (the untransformed view) returns ``fgx``.

    Raises:
        AlignmentError: when the result does not have the reference size.
    """
    if g is None or layout.kind == "vector":
        return fgx
    out = g.inverse().act(fgx, layout)
    if layout.size is not None and tuple(out.shape[-2:]) != tuple(layout.size):
        raise AlignmentError(
            f"undoing {g.name} gives a {tuple(out.shape[-2:])} map but the reference map is "
            f"{tuple(layout.size)}; use transforms that keep the size or a Resize")
    return out


def _flat(x: Tensor, mask: Tensor | None) -> Tensor:
    """``(B, ...)`` -> ``(B, D)`` over the valid positions (the mask covers the last two
    axes of maps and group maps)."""
    if mask is None or x.dim() < 4 or bool(mask.all()):
        return x.flatten(1)
    return x[..., mask].flatten(1)


def per_image_error(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """L2 norm of ``a - b`` per image over the valid entries: ``(B,)``."""
    return torch.linalg.vector_norm(_flat(a - b, mask), dim=1)


def per_image_cosine(a: Tensor, b: Tensor, mask: Tensor | None = None,
                     eps: float = 1e-8) -> Tensor:
    """Global cosine per image over the valid entries (norms clamped at ``eps``): ``(B,)``."""
    fa, fb = _flat(a, mask), _flat(b, mask)
    na = torch.linalg.vector_norm(fa, dim=1).clamp_min(eps)
    nb = torch.linalg.vector_norm(fb, dim=1).clamp_min(eps)
    return (fa * fb).sum(dim=1) / (na * nb)


def pairwise_cosines(aligned: Sequence[Tensor], pairing: str = "identity") -> Tensor:
    """Global cosines between aligned views ``[v_0, v_1, ..., v_K]`` (same shape each,
    ``(B, ...)``; ``v_0`` is the untransformed view), norms clamped at 1e-8.

    ``pairing="identity"``: ``cos(v_k, v_0)`` for k = 1..K; ``"pairs"``: ``cos(v_i, v_j)``
    for all ``i < j``. Returns ``(B, P)``, differentiable.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    # no normalized copy of the views: dot products and norms, then a (B, P) division
    feats = torch.stack([a.flatten(1) for a in aligned], dim=1)  # (B, V, D)
    # clamping the squared norm (not the norm) keeps the gradient finite at zero
    norm = (feats * feats).sum(-1).clamp_min(1e-16).sqrt()  # (B, V)
    if pairing == "identity":
        # v_0 taken as it is, not sliced from the stack: no zero-filled slice gradients
        dots = (feats * aligned[0].flatten(1)[:, None]).sum(-1)  # (B, V), 0 = |v_0|^2
        return dots[:, 1:] / (norm[:, 1:] * norm[:, :1])
    i, j = (list(k) for k in zip(*itertools.combinations(range(len(aligned)), 2)))
    gram = torch.bmm(feats, feats.transpose(1, 2))  # (B, V, V)
    return gram[:, i, j] / (norm[:, i] * norm[:, j])


class Comparator:
    """Aligns ``f(g x)`` with ``g·f(x)`` and gives the valid mask, cached per
    (transformation, layout, map size, device).

    Args:
        margin: also drop map positions within ``margin`` input pixels of an invalid
            position or of the map's edge (see :func:`erode`); 0 keeps every position
            whose value comes from inside the map.
    """

    def __init__(self, margin: int = 0) -> None:
        self.margin = int(margin)
        self._masks: dict[tuple, Tensor] = {}

    def mask(self, g: Transform, layout: Layout, hw: tuple[int, int],
             device: torch.device | str | None = None) -> Tensor:
        """Valid positions ``(h, w)`` of ``g·f`` for a map of size ``hw``."""
        key = (g, layout, tuple(hw), str(device))
        if key not in self._masks:
            self._masks[key] = erode(g.valid_mask(tuple(hw), layout.stride, device=device),
                                     self.margin, layout.stride)
        return self._masks[key]

    def compare(self, fgx: Tensor, fx: Tensor, g: Transform, layout: Layout) -> Aligned:
        """Align (see :func:`align`) and attach the mask (None for vectors).

        Raises:
            NoValidPositions: when no position is left to compare (the message says
                whether the transformation or the margin removed them).
        """
        hw = (int(fx.shape[-2]), int(fx.shape[-1]))
        why = no_valid_positions(g, layout, hw) if fx.dim() >= 4 else None
        if why is not None:
            raise NoValidPositions(why)
        a, b = align(fgx, fx, g, layout)
        mask = None
        if fx.dim() >= 4:
            mask = self.mask(g, layout, hw, fx.device)
            if not bool(mask.any()):
                raise NoValidPositions(
                    f"no valid positions left under {g.name} on this {hw[0]}x{hw[1]} map "
                    f"with a margin of {self.margin} px; lower the margin" if self.margin
                    else f"no valid positions under {g.name} on this {hw[0]}x{hw[1]} map")
        return Aligned(a, b, mask)

    def accumulate(self, stats: PairStats, fgx: Tensor, fx: Tensor, g: Transform,
                   layout: Layout) -> bool:
        """Add one batch to ``stats``; False if it contained NaN or Inf."""
        pair = self.compare(fgx, fx, g, layout)
        return stats.update(pair.a, pair.b, pair.mask)

    def cosine(self, fgx: Tensor, fx: Tensor, g: Transform, layout: Layout) -> Tensor:
        """Per-image global cosine of ``f(g x)`` and ``g·f(x)`` over the valid entries."""
        pair = self.compare(fgx, fx, g, layout)
        return per_image_cosine(pair.a, pair.b, pair.mask)

    def error(self, fgx: Tensor, fx: Tensor, g: Transform, layout: Layout) -> Tensor:
        """Per-image L2 norm of ``f(g x) - g·f(x)`` over the valid entries: ``(B,)``."""
        pair = self.compare(fgx, fx, g, layout)
        return per_image_error(pair.a, pair.b, pair.mask)
