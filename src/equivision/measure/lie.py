"""The Lie derivative of every layer (Gruver et al., ICLR 2023), for any ``nn.Module``.

For a continuous family ``g_t`` with generator ``L`` (:mod:`.lie_generators`) and the map
``f_l`` from the image to layer ``l``'s output, the Lie derivative is

    L f_l (x) = d/dt [ g_t^-1 f_l(g_t x) ] at t = 0  =  J_l (L x) - L f_l(x),

zero for an equivariant layer (for an invariant output, a vector, the second term is
zero: ``J_l L x``). ``J_l (L x)`` comes from one Jacobian-vector product per generator
(:func:`~.lie_tangents.layer_jvps`), ``L f_l(x)`` from the generator's action on the
captured map at its stride. Per layer the report gives ``||L f_l(x)|| / ||f_l(x)||``
(scale-free), and for the model's output ``||L f(x)||``, the paper's figure.
:mod:`.lie_decompose` splits the output's Lie derivative into the contributions of the
leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..transforms.layout import Layout, TokenGrid, as_map
from ..utils import model_device, model_dtype
from .capture import NEVER_CALLED, MeasureError, select_layers, trace_layers
from .lie_decompose import Decomposition, leaf_names
from .lie_generators import Generator, acts_as_zero, as_generators, image_tangent, map_tangent
from .lie_layouts import LayerLayouts, edge_mask
from .lie_report import LieReport, LieRow, RunningMean, per_image_norm
from .lie_tangents import OUTPUT, layer_jvps

__all__ = ["OUTPUT", "batches", "lie_derivative"]


def batches(data: Tensor | Dataset | DataLoader | Iterable, batch_size: int,
            max_images: int | None) -> Iterator[Tensor]:
    """Image batches ``(B, C, H, W)`` from a tensor, a dataset of ``(image, label)`` pairs
    or images, or a loader / iterable of batches; at most ``max_images`` images."""
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise MeasureError(f"expected images (B, C, H, W), got shape {tuple(data.shape)}")
        source: Iterable = data.split(batch_size)
    elif isinstance(data, Dataset) and not isinstance(data, DataLoader):
        source = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        source = data
    seen = 0
    for batch in source:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise MeasureError("the data must yield image batches (B, C, H, W), got "
                               f"{type(x).__name__}")
        if max_images is not None:
            x = x[: max_images - seen]
        if len(x):
            yield x
        seen += len(x)
        if max_images is not None and seen >= max_images:
            return


class _Accumulator:
    """Streaming per-(layer, generator) sums of one measurement."""

    def __init__(self) -> None:
        self.rel: dict[tuple[str, str], RunningMean] = {}
        self.rms: dict[tuple[str, str], RunningMean] = {}
        self.abs: dict[tuple[str, str], RunningMean] = {}
        self.info: dict[str, tuple[list[int], list[float]]] = {}
        self.notes: dict[tuple[str, str], str] = {}

    def add(self, key: tuple[str, str], nd: Tensor, nh: Tensor, size: int) -> None:
        """Per-image norms of the Lie derivative ``nd`` and of the output ``nh`` ``(B,)``
        over ``size`` entries per image."""
        for table, v in ((self.rel, nd / nh.clamp_min(1e-12)),
                         (self.rms, nd / math.sqrt(max(1, size))), (self.abs, nd)):
            table.setdefault(key, RunningMean()).add(v)


def _measure_batch(acc: _Accumulator, layouts: LayerLayouts, names: Sequence[str],
                   primals: Mapping[str, Tensor], jvps: Sequence[Mapping[str, Tensor]],
                   gens: Sequence[Generator], margin: int) -> None:
    for name in [*names, OUTPUT]:
        if name not in primals:
            acc.notes.update({(name, g.name): NEVER_CALLED for g in gens})
            continue
        cap = layouts.measurable(name, primals[name])
        if isinstance(cap, str):
            acc.notes.update({(name, g.name): cap for g in gens})
            continue
        hw = tuple(cap.value.shape[-2:]) if cap.value.dim() >= 4 else (1, 1)
        edge = edge_mask(cap.layout, hw, margin, cap.value.device)
        norms: dict[bool, tuple[Tensor, int]] = {}  # output norm, with / without the mask
        grads: dict[int, Tensor] = {}  # the map's central differences, shared by generators
        for gi, gen in enumerate(gens):
            tan, _ = as_map(*_reshaped(name, jvps[gi][name], layouts, cap.layout))
            try:  # L f = J L x - L h (L h = 0 where the generator has no action)
                delta = tan if acts_as_zero(cap.layout, gen) else \
                    tan - map_tangent(cap.value, cap.layout, gen, grads)
            except ValueError as err:
                acc.notes[(name, gen.name)] = f"not measured: {err}"
                continue
            mask = None if gen.photometric else edge
            masked = mask is not None
            if masked not in norms:
                kept = cap.value[..., mask] if masked else cap.value
                norms[masked] = (per_image_norm(cap.value, mask), kept[0].numel())
            nh, size = norms[masked]
            acc.add((name, gen.name), per_image_norm(delta, mask), nh, size)
        acc.info[name] = (list(cap.value.shape[1:]), list(cap.layout.stride))


def _reshaped(name: str, t: Tensor, layouts: LayerLayouts, layout: Layout
              ) -> tuple[Tensor, Layout]:
    """A raw tangent reshaped as the primal was by ``to_measurable`` (same layout)."""
    t = layouts.trace.canonical(name, t)
    if t.dim() == 4 and t.shape[-2:] == (1, 1):
        return t.flatten(1), layout
    if t.dim() == 3:
        grid = layouts.grid_for(name, t)
        assert grid is not None
        return t, Layout("tokens", layout.stride, grid=(int(grid[0]), int(grid[1])),
                         prefix=int(grid[2]) if len(grid) == 3 else 0)
    return t, layout


def lie_derivative(
    model: nn.Module,
    data: Tensor | Dataset | DataLoader | Iterable,
    generators: str | Generator | Sequence[str | Generator] | None = None,
    layers: Sequence[str | type] | None = None,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    token_grid: TokenGrid | Mapping[str, TokenGrid] | None = None,
    margin: int = 0,
    decompose: bool = True,
    mode: str = "auto",
    max_outputs: int = 64,
    probes: int = 16,
    model_name: str | None = None,
) -> LieReport:
    """Per-layer Lie derivative norms and the layer-wise decomposition of the output's.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)``; run in eval mode, restored after.
        data: images ``(N, C, H, W)``, a dataset of ``(image, label)`` or images, or a
            loader / iterable of batches.
        generators: names from :data:`~.lie_generators.GENERATORS` (``"tx,ty,rotate,scale,
            brightness"`` by default), or :class:`~.lie_generators.Generator` objects.
        layers: layers to report (as in :func:`~.capture.select_layers`).
        token_grid: ``(h, w[, prefix])`` of token outputs (default: the model's
            ``token_grid`` attribute, else inferred from the token count and image size).
        margin: leave out map positions within ``margin`` input pixels of the edge
            (zero padding breaks every continuous symmetry there).
        decompose: also split the output's Lie derivative into the contribution of every
            leaf module (:class:`~.lie_decompose.Decomposition`; ``max_outputs`` /
            ``probes``: exact for outputs of at most ``max_outputs`` numbers, else
            ``probes`` random projections).
        mode: ``"auto"``, ``"forward"`` or ``"double-backward"``
            (:func:`~.lie_tangents.layer_jvps`).

    Returns:
        A :class:`~.lie_report.LieReport`.
    """
    gens = as_generators(generators)
    dev = torch.device(device) if device is not None else model_device(model)
    names = select_layers(model, layers)
    if token_grid is None:
        token_grid = getattr(model, "token_grid", None)
    acc, layouts, dec, used, n = _Accumulator(), None, None, mode, 0
    was_training = model.training
    model.eval()
    try:
        for x in batches(data, batch_size, max_images):
            x = x.to(dev, model_dtype(model))
            if layouts is None:
                layouts = LayerLayouts((int(x.shape[-2]), int(x.shape[-1])),
                                       trace_layers(model, x), token_grid)
                if decompose:
                    dec = Decomposition(model, leaf_names(model), layouts, gens,
                                        max_outputs, probes)
            tangents = [image_tangent(x, g) for g in gens]
            primals, jvps, used = layer_jvps(model, names, x, tangents, mode)
            _measure_batch(acc, layouts, names, primals, jvps, gens, margin)
            if dec is not None:
                dec.add(x, [j[OUTPUT] for j in jvps])
            n += len(x)
    finally:
        model.train(was_training)
    if n == 0:
        raise MeasureError("no images to measure")
    rows = _rows(acc, [*names, OUTPUT], gens)
    if dec is not None:
        rows += dec.rows()
    meta = {"n_images": n, "mode": used, "margin": margin,
            "units": {g.name: g.unit for g in gens},
            "skipped": {f"{k[0]} / {k[1]}": v for k, v in acc.notes.items()}}
    return LieReport(model_name or type(model).__name__, [g.name for g in gens], rows, meta)


def _rows(acc: _Accumulator, names: Sequence[str], gens: Sequence[Generator]) -> list[LieRow]:
    rows = []
    for name in names:
        for g in gens:
            key = (name, g.name)
            if key not in acc.rel:
                rows.append(LieRow(name, g.name, note=acc.notes.get(key, "not measured")))
                continue
            mean, std, ci = acc.rel[key].summary()
            shape, stride = acc.info[name]
            rows.append(LieRow(name, g.name, "layer", mean, std, ci, acc.rms[key].summary()[0],
                               acc.abs[key].summary()[0], n_images=acc.rel[key].n,
                               shape=shape, stride=stride))
    return rows
