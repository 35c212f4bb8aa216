"""Features of transformed views of an image batch, and their agreement (cosines).

This is the code path shared by the purification loss of the equivariance and
invariance defenses and by :func:`~equivision.robust.defenses.equivariance_score`:

1. :class:`FeatureExtractor` runs the model and returns one named layer's output
   (``"logits"`` is the model output; ``"auto"`` the last spatial map,
   :func:`last_spatial_layer`, found on the first call; any other name is a submodule
   captured with a forward hook, and the rest of the forward pass is skipped).
2. :func:`view_features` transforms the batch by each ``g`` in a list (view 0 is the
   untransformed batch) and extracts ``F(g x)``; views that have the same spatial size
   go through the model in one concatenated forward pass (``batched=True``) or one
   at a time (``batched=False``, the reference loop).
3. :func:`align_view` brings ``F(g x)`` back to the frame of ``F(x)``: classification
   logits and other vectors are left as they are (they are invariant), spatial maps
   get ``g^-1``'s action on the reference map's layout (whose ``size`` makes an undone
   :class:`~equivision.transforms.Resize` land on the reference size), and with
   ``pooled=True`` maps are global-average-pooled instead (the invariance objective).
4. :func:`view_cosines` gives one global cosine per image and compared pair
   (flattened ``C x h x w``, the paper's Eq. 2; norms clamped at 1e-8) over the
   positions valid in both views (:func:`view_mask`): an aligned rotated view has
   zero-filled corners that say nothing about the image and are left out.

Steps 3 and 4 are the comparison core of :mod:`equivision.measure.compare`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..measure.capture import (
    PASS_THROUGH,
    LayerCapture,
    Trace,
    first_tensor,
    trace_layers,
    unknown_layout,
)
from ..measure.compare import (
    PAIRINGS,
    Comparator,
    align_back,
    pairwise_cosines,
)
from ..transforms import Layout, Transform, size_stride
from ..transforms.layout import TokenGrid, infer_token_grid, tokens_to_map
from ..utils import evaluating

__all__ = [
    "AUTO_LAYER", "CPU_MAX_BATCH", "PAIRINGS", "FeatureExtractor", "align_view",
    "last_spatial_layer", "masked_pairwise_cosines", "resolve_max_batch", "view_cosines",
    "view_features", "view_mask",
]

#: Images per forward pass on the CPU with ``max_batch="auto"``: beyond about this many
#: a concatenated pass is no faster than separate ones (cache effects; measured with
#: benchmarks/bench_defense.py), while tiny batches gain from concatenation.
CPU_MAX_BATCH = 16


def resolve_max_batch(max_batch: int | str | None, device: torch.device) -> int | None:
    """``"auto"`` -> :data:`CPU_MAX_BATCH` on the CPU, no cap (None) elsewhere; an int
    >= 1 or None is returned as it is."""
    if max_batch == "auto":
        return CPU_MAX_BATCH if device.type == "cpu" else None
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise ValueError(f"max_batch must be 'auto', None or an integer >= 1, got {max_batch!r}")
    return max_batch  # type: ignore[return-value]


#: the feature layer name that stands for the model's last spatial map
AUTO_LAYER = "auto"


def token_grid(out: Tensor, image_hw: Sequence[int]) -> TokenGrid | None:
    """The ``(h, w, prefix)`` grid of tokens ``out (B, N, C)`` on an ``image_hw`` image
    (:func:`~equivision.transforms.layout.infer_token_grid`; [CLS]-like prefix tokens
    are dropped), or None: not tokens, no grid fits, or a single cell."""
    if out.dim() != 3:
        return None
    grid = infer_token_grid(int(out.shape[1]), image_hw)
    return grid if grid is not None and grid[0] * grid[1] > 1 else None


def last_spatial_layer(model: nn.Module, x: Tensor, trace: Trace | None = None) -> str:
    """Name of the submodule whose output is the model's last spatial map on ``x``
    ``(B, C, H, W)``: of the submodules that return ``(B, C, h, w)`` with ``h w > 1`` (or a
    channels-last ``(B, h, w, C)``, :func:`~equivision.measure.capture.find_channels_last`,
    or tokens ``(B, N, C)`` that form a grid of the image, :func:`token_grid`), the last to
    finish in the forward pass (a classifier's last conv block, before the global
    pooling; a segmenter's last map; a ViT's last token grid); dropout, identity and
    flatten modules are skipped, and so are outputs whose layout cannot be known
    (:func:`~equivision.measure.capture.unknown_layout`: an attention map
    ``(B, heads, N, N)``, an output that only looks channels-last).

    Raises:
        ValueError: no submodule returns a spatial map (pass a layer name).
    """
    trace = trace if trace is not None else trace_layers(model, x[:1].detach())
    names = [n for n, m in model.named_modules() if n and not isinstance(m, PASS_THROUGH)]
    with LayerCapture(model, names) as cap:
        outs = {n: trace.canonical(n, t) for n, t in cap.run(x[:1].detach(), strict=False
                                                              ).items()}
        order = list(cap.order)

    def spatial(n: str) -> bool:
        out = outs[n]
        if unknown_layout(out, trace.token_counts, n in trace.spatial, trace.layout_note(n)):
            return False
        if out.dim() == 3:
            return token_grid(out, x.shape[-2:]) is not None
        return out.dim() == 4 and int(out.shape[-2] * out.shape[-1]) > 1

    found = [n for n in order if spatial(n)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no submodule that returns a spatial map "
                         "(B, C, h, w) or a token grid; pass feature_layer= a layer name, "
                         "'logits' or 'output'")
    return found[-1]


class _Stop(Exception):
    """Raised by the capture hook to skip the layers after the captured one."""


class FeatureExtractor:
    """Run ``model`` and return the output of one layer.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)``.
        feature_layer: ``"output"`` for the model output; ``"logits"`` for the submodule
            of that name when the model has one (the segmenter's class scores before
            upsampling, as the released code uses) and the model output otherwise
            (classifier logits); ``"auto"`` for the last spatial map
            (:func:`last_spatial_layer`, resolved on the first call or by
            :meth:`resolve`; :attr:`feature_layer` then holds its name; ``"output"`` for a
            model without spatial maps); else the name of
            a submodule as in ``model.named_modules()`` (e.g. ``"features.relu3"``).

    Raises:
        ValueError: unknown layer name; the message lists the available names.
    """

    def __init__(self, model: nn.Module, feature_layer: str = "logits") -> None:
        if not isinstance(feature_layer, str) or not feature_layer:
            raise TypeError(f"feature layer must be a non-empty string, got {feature_layer!r}")
        layer = feature_layer
        self.model = model
        self.feature_layer = layer
        self.module: nn.Module | None = None
        self._trace: Trace | None = None  # read by resolve() on the first input
        named = dict(model.named_modules())
        if layer == "logits" and "logits" in named:
            self.module = named["logits"]
        elif layer not in ("logits", "output", AUTO_LAYER):
            if layer not in named or not layer:
                names = ", ".join(["output", "logits"]
                                  + [n for n in named if n and n != "logits"] + [AUTO_LAYER])
                raise ValueError(
                    f"unknown feature layer {layer!r} for {type(model).__name__}; "
                    f"available: {names}"
                )
            self.module = named[layer]

    def resolve(self, x: Tensor) -> str:
        """Resolve ``"auto"`` to the last spatial layer on ``x (B, C, H, W)`` and read the
        layer's layout (once): a channels-last output ``(B, h, w, C)`` is returned as
        ``(B, C, h, w)``; one that only looks channels-last is refused. Returns the
        layer's name."""
        if self._trace is not None or (self.module is None and self.feature_layer != AUTO_LAYER):
            return self.feature_layer
        with evaluating(self.model):  # BatchNorm statistics untouched
            self._trace = trace = trace_layers(self.model, x[:1].detach())
            if self.feature_layer == AUTO_LAYER:
                try:
                    name = last_spatial_layer(self.model, x, trace)
                except ValueError:  # no spatial map at all (an MLP): the model output
                    self.feature_layer = "output"
                    return self.feature_layer
                self.module = dict(self.model.named_modules())[name]
                self.feature_layer = name
        if self.feature_layer in trace.looks_channels_last:
            raise ValueError(
                f"feature layer {self.feature_layer!r} returns a map that looks channels-last "
                "(B, H, W, C) but cannot be known to be; choose the layer that permutes it back")
        return self.feature_layer

    def _as_map(self, out: Tensor, image_hw: Sequence[int]) -> Tensor:
        """A token output ``(B, N, C)`` as its patch map ``(B, C, h, w)``; an output whose
        layout cannot be known (an attention map) is refused."""
        assert self._trace is not None
        why = unknown_layout(out, self._trace.token_counts,
                             self.feature_layer in self._trace.spatial)
        if why:
            raise ValueError(f"feature layer {self.feature_layer!r} {why.removeprefix('skipped: ')}"
                             "; choose a layer whose output is a map or a token grid")
        if out.dim() != 3:
            return out
        grid = token_grid(out, image_hw)
        if grid is None:
            raise ValueError(
                f"feature layer {self.feature_layer!r} returns tokens {tuple(out.shape)} that "
                f"form no grid of the {image_hw[0]}x{image_hw[1]} image; choose another layer")
        return tokens_to_map(out, grid[:2], grid[2])

    def __call__(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W)`` -> the layer's output, ``(B, ...)``."""
        self.resolve(x)
        if self.module is None:
            out = first_tensor(self.model(x))
            if out is None:
                raise ValueError(f"{type(self.model).__name__} returned no tensor")
            return out
        box: list[Tensor] = []

        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            t = first_tensor(out)
            if t is None:
                raise ValueError(f"layer {self.feature_layer!r} returned no tensor")
            box.append(t)
            raise _Stop

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not box:
            raise ValueError(
                f"layer {self.feature_layer!r} was not called during the forward pass; "
                "choose a layer that the model uses"
            )
        assert self._trace is not None
        return self._as_map(self._trace.canonical(self.feature_layer, box[0]), x.shape[-2:])


def view_features(
    extractor: FeatureExtractor,
    x: Tensor,
    transforms: Sequence[Transform],
    batched: bool = True,
    max_batch: int | str | None = None,
) -> list[Tensor]:
    """Features of the views ``[x, g_1 x, ..., g_K x]``.

    Args:
        extractor: the feature layer.
        x: images ``(B, C, H, W)``.
        transforms: the ``K`` transformations ``g_k`` (view 0 is ``x`` itself).
        batched: concatenate all views of the same spatial size into one forward pass
            (``False``: one forward pass per view, the reference loop).
        max_batch: at most this many images per forward pass when batching (at least
            one view per pass); None: no cap; ``"auto"``: see :func:`resolve_max_batch`.

    Returns:
        ``K + 1`` tensors ``F(g_k x)``, each ``(B, ...)``.
    """
    views = [x] + [g.apply_image(x) for g in transforms]
    if not batched:
        return [extractor(v) for v in views]
    b = x.shape[0]
    cap = resolve_max_batch(max_batch, x.device)
    per_pass = len(views) if cap is None else max(1, cap // b)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[1:]), []).append(i)
    chunks = [idx[k:k + per_pass] for idx in groups.values() for k in range(0, len(idx), per_pass)]
    feats: list[Tensor | None] = [None] * len(views)
    for idx in chunks:
        if len(idx) == 1:
            feats[idx[0]] = extractor(views[idx[0]])
            continue
        out = extractor(torch.cat([views[i] for i in idx]))
        for i, f in zip(idx, out.unflatten(0, (len(idx), b)).unbind(0)):
            feats[i] = f
    return feats  # type: ignore[return-value]


def align_view(
    g: Transform | None,
    feat: Tensor,
    ref_hw: tuple[int, int] | None,
    input_hw: tuple[int, int],
    pooled: bool = False,
) -> Tensor:
    """Bring ``F(g x)`` into the frame of ``F(x)``: ``g^-1 · F(g x)``
    (:func:`~equivision.measure.compare.align_back` on the reference map's layout).

    Args:
        g: the view's transformation (``None`` for the untransformed view).
        feat: ``F(g x)``: ``(B, C)`` vector (left as it is: logits and pooled features
            are invariant) or ``(B, C, h', w')`` map.
        ref_hw: spatial size ``(h, w)`` of ``F(x)`` (None for vectors).
        input_hw: ``(H, W)`` of ``x``, to infer the map's stride.
        pooled: global-average-pool maps to ``(B, C)`` over their valid positions
            instead of undoing ``g`` (:func:`_pooled`).

    Returns:
        ``(B, C)`` or ``(B, C, h, w)`` with ``(h, w) = ref_hw``.
    """
    if feat.dim() == 2:
        return feat
    if feat.dim() != 4:
        raise ValueError(
            f"feature layer output must be (B, C) or (B, C, h, w), got {tuple(feat.shape)}; "
            "choose another feature_layer"
        )
    if pooled:
        return _pooled(g, feat, ref_hw, input_hw)
    if g is None:
        return feat
    assert ref_hw is not None
    layout = Layout("map", size_stride(input_hw, ref_hw), size=(int(ref_hw[0]), int(ref_hw[1])))
    return align_back(g, feat, layout)


#: valid masks of aligned views, cached per (inverse element, layout, size, device)
_MASKS = Comparator()


def _pooled(g: Transform | None, feat: Tensor, ref_hw: tuple[int, int] | None,
            input_hw: tuple[int, int]) -> Tensor:
    """Global average ``(B, C)`` of the map ``F(g x)`` ``(B, C, h', w')`` over its valid
    positions: those of ``g``'s forward action that come from inside the image (a rotated
    view's zero corners are left out, as in the aligned comparison)."""
    if g is None or ref_hw is None:
        return feat.mean(dim=(-2, -1))
    hw = (int(feat.shape[-2]), int(feat.shape[-1]))
    layout = Layout("map", size_stride(input_hw, ref_hw), size=hw)
    mask = _MASKS.mask(g, layout, hw, feat.device)
    if bool(mask.all()):
        return feat.mean(dim=(-2, -1))
    w = mask.to(feat.dtype)
    return (feat * w).sum(dim=(-2, -1)) / w.sum().clamp_min(1.0)


def view_mask(g: Transform | None, feat: Tensor, ref_hw: tuple[int, int] | None,
              input_hw: tuple[int, int], pooled: bool = False) -> Tensor | None:
    """Valid positions ``(h, w)`` of the aligned view ``g^-1 · F(g x)`` (those whose value
    comes from inside ``F(g x)``), or None when every entry is valid (the untransformed
    view, vectors, pooled features, and elements such as rot90 or flips)."""
    if g is None or pooled or feat.dim() != 4 or ref_hw is None:
        return None
    layout = Layout("map", size_stride(input_hw, ref_hw), size=(int(ref_hw[0]), int(ref_hw[1])))
    mask = _MASKS.mask(g.inverse(), layout, ref_hw, feat.device)
    return None if bool(mask.all()) else mask


def masked_pairwise_cosines(aligned: Sequence[Tensor], masks: Sequence[Tensor | None],
                            pairing: str = "identity") -> Tensor:
    """:func:`~equivision.measure.compare.pairwise_cosines` over the positions valid in
    both views of each pair: ``aligned`` are ``(B, ..., h, w)`` views of one shape,
    ``masks`` their ``(h, w)`` valid masks (None: all valid). Returns ``(B, P)``,
    differentiable; squared norms clamped at 1e-16 as in ``pairwise_cosines``.

    ``"identity"``: every view against view 0 in one :class:`_RefCosines` (only the
    masked pairs, a rotation's, are multiplied by their masks; norms clamped at 1e-8, the
    same bound). ``"pairs"``:
    all pairs at once: with ``m_i`` the views' masks and ``s_i(p) = sum_c f_i(c, p)^2``,
    the dot products are those of the masked views ``f_i m_i`` (one batched Gram matrix)
    and the squared norm of view ``i`` over the positions of pair ``(i, j)`` is
    ``sum_p s_i(p) m_i(p) m_j(p)``.
    """
    if all(m is None for m in masks):
        return pairwise_cosines(aligned, pairing)
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if pairing == "identity":
        return _identity_cosines(aligned, masks)
    v = len(aligned)
    b, hw = aligned[0].shape[0], tuple(aligned[0].shape[-2:])
    feats = torch.stack(list(aligned), dim=1).reshape(b, v, -1, hw[0] * hw[1])  # (B,V,C,P)
    ones = torch.ones(hw, dtype=torch.bool, device=feats.device)
    m = torch.stack([ones if k is None else k for k in masks]).flatten(1).to(feats.dtype)
    fm = feats * m[None, :, None]  # masked views (B, V, C, P)
    sq = (feats * feats).sum(2) * m  # s_i m_i (B, V, P)
    flat = fm.flatten(2)  # (B, V, C P)
    gram = torch.bmm(flat, flat.transpose(1, 2))  # (B, V, V)
    norms = sq @ m.T  # norms[b, i, j] = |f_i|^2 over m_i m_j
    i, j = (list(k) for k in zip(*itertools.combinations(range(v), 2)))
    return gram[:, i, j] / (norms[:, i, j].clamp_min(1e-16).sqrt()
                            * norms[:, j, i].clamp_min(1e-16).sqrt())


#: smallest norm in a cosine's denominator (as :func:`~equivision.measure.compare.pairwise_cosines`)
_NORM_EPS = 1e-8


class _RefCosines(torch.autograd.Function):
    """``cos(v_k, ref)`` per image over the positions valid in both, ``(B, K)``.

    Inputs: ``weights (K, P)`` (1 at the positions valid in both views of pair ``k``,
    else 0), ``rows`` (the pairs ``k`` with a 0 in ``weights``), the reference ``ref``
    and the views ``v_k``, each ``(B, C, P)``. Norms clamped at :data:`_NORM_EPS`.

    Autograd through the generic ops takes several passes over the views in the
    backward (outer products, norm gradients, a copy per view); here the views'
    gradient is two passes, ``w (g / (|v| |r|) r - g cos / |v|^2 v)``, the reference's
    one product with the masked views, and only the masked rows are multiplied by their
    masks. With ``create_graph`` the backward recomputes the forward's parts from the
    inputs, so that second derivatives are right."""

    @staticmethod
    def parts(weights: Tensor, rows: list[int], ref: Tensor, views: Sequence[Tensor]
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(masked views (B, K, C, P), |v_k| (B, K), |r| per pair (B, K), cos (B, K))``."""
        b, k = ref.shape[0], len(views)
        masked = torch.stack(list(views), dim=1)  # (B, K, C, P), a fresh copy
        for row in rows:
            masked[:, row].mul_(weights[row])
        flat = masked.reshape(b, k, -1)
        dots = torch.bmm(flat, ref.reshape(b, -1, 1)).squeeze(2)  # (B, K)
        n_v = torch.linalg.vector_norm(flat, dim=2)
        n_r = ((ref * ref).sum(1) @ weights.T).sqrt()  # |r| over each pair's positions
        return masked, n_v, n_r, dots / (n_v.clamp_min(_NORM_EPS) * n_r.clamp_min(_NORM_EPS))

    @staticmethod
    def forward(ctx: Any, weights: Tensor, rows: list[int], ref: Tensor,  # noqa: D102
                *views: Tensor) -> Tensor:
        masked, n_v, n_r, cos = _RefCosines.parts(weights, rows, ref, views)
        ctx.rows = rows
        ctx.save_for_backward(weights, ref, masked, cos, n_v, n_r, *views)
        return cos

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        weights, ref, masked, cos, n_v, n_r, *views = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the parts again, as functions of the inputs
            masked, n_v, n_r, cos = _RefCosines.parts(weights, ctx.rows, ref, views)
        b, k = masked.shape[:2]
        nv, nr = n_v.clamp_min(_NORM_EPS), n_r.clamp_min(_NORM_EPS)
        s_cross = grad / (nv * nr)  # (B, K): r in the view's gradient, v_k in the ref's
        # clamped norms pass no gradient (as clamp_min's backward)
        zero = torch.zeros_like(nv)
        s_self = torch.where(n_v >= _NORM_EPS, grad * cos / (nv * nv), zero)
        s_ref = torch.where(n_r >= _NORM_EPS, grad * cos / (nr * nr), zero)
        g_views: tuple[Tensor | None, ...] = (None,) * k
        if any(ctx.needs_input_grad[3:]):
            g = torch.mul(masked, -s_self[:, :, None, None])
            g = g.addcmul(ref[:, None], s_cross[:, :, None, None])
            if ctx.rows:
                keep = torch.ones_like(weights)
                keep[ctx.rows] = weights[ctx.rows]
                g = g * keep[None, :, None]
            g_views = g.unbind(1)
        g_ref = None
        if ctx.needs_input_grad[2]:
            g_ref = torch.bmm(s_cross[:, None], masked.reshape(b, k, -1)).reshape(ref.shape)
            g_ref = g_ref - ref * (s_ref @ weights)[:, None]
        return (None, None, g_ref, *g_views)


def _identity_cosines(aligned: Sequence[Tensor], masks: Sequence[Tensor | None]) -> Tensor:
    """``cos(v_k, v_0)`` over the positions valid in both, ``(B, K)``, in one
    :class:`_RefCosines` (maps ``(B, ..., h, w)``)."""
    ref = aligned[0]
    b, hw = ref.shape[0], tuple(ref.shape[-2:])
    ones = torch.ones(hw, dtype=torch.bool, device=ref.device)
    m0 = ones if masks[0] is None else masks[0]
    both = [m0 if m is None else m0 & m for m in masks[1:]]
    rows = [i for i, m in enumerate(both) if m is not ones]
    weights = torch.stack(both).flatten(1).to(ref.dtype)
    p = hw[0] * hw[1]
    return _RefCosines.apply(weights, rows, ref.reshape(b, -1, p),
                             *(a.reshape(b, -1, p) for a in aligned[1:]))


def view_cosines(
    extractor: FeatureExtractor,
    x: Tensor,
    transforms: Sequence[Transform],
    pairing: str = "identity",
    pooled: bool = False,
    batched: bool = True,
    max_batch: int | str | None = None,
    warn_vector: bool = False,
    refuse_vector: bool = False,
) -> Tensor:
    """Cosine similarities between aligned view features, one per image and pair.

    ``pairing="identity"``: ``cos(g_k^-1 F(g_k x), F(x))`` for k = 1..K (paper Eq. 2);
    ``"pairs"``: ``cos(g_i^-1 F(g_i x), g_j^-1 F(g_j x))`` for all ``i < j`` over the
    ``K + 1`` views including the identity (the released code); see
    :func:`~equivision.measure.compare.pairwise_cosines`. Each cosine is taken over the
    positions valid in both views (:func:`view_mask`; rotations' zero corners are out).

    ``batched`` and ``max_batch`` are passed to :func:`view_features`. ``warn_vector``:
    warn when the features are vectors ``(B, C)``, on which every transformation acts
    trivially (the equivariance loss is then the invariance loss); ``refuse_vector``:
    raise a ValueError instead.

    Returns:
        ``(B, P)`` with ``P = K`` or ``(K + 1) K / 2``; differentiable w.r.t. ``x``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if not transforms:
        raise ValueError("at least one transformation is needed to compare views")
    feats = view_features(extractor, x, transforms, batched=batched, max_batch=max_batch)
    ref = feats[0]
    if refuse_vector and not pooled and ref.dim() == 2:
        raise ValueError(
            f"the feature layer {extractor.feature_layer!r} gives vectors {tuple(ref.shape)} "
            "to the equivariance defense: transformations act trivially on vectors, so its "
            "loss would be the invariance loss; choose a spatial layer (feature_layer='auto' "
            "is the last spatial map) or ask for the invariance loss (defense 'invariance', "
            "or allow_invariance=True)")
    if warn_vector and not pooled and ref.dim() == 2:
        warnings.warn(
            f"the feature layer {extractor.feature_layer!r} gives vectors {tuple(ref.shape)}: "
            "the transformations act trivially on them, so the equivariance defense computes "
            "the invariance defense's loss; choose a spatial layer (e.g. the last conv "
            "block) as feature_layer for a classifier", UserWarning, stacklevel=4)
    ref_hw = (ref.shape[-2], ref.shape[-1]) if ref.dim() == 4 else None
    input_hw = (x.shape[-2], x.shape[-1])
    gs: list[Transform | None] = [None, *transforms]
    aligned = [align_view(g, f, ref_hw, input_hw, pooled) for g, f in zip(gs, feats)]
    masks = [view_mask(g, f, ref_hw, input_hw, pooled) for g, f in zip(gs, feats)]
    return masked_pairwise_cosines(aligned, masks, pairing)
