"""One pass over the data that measures every chosen layer under every transformation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..transforms import InexactActionError, ShapeError, Transform, parse_transforms
from .capture import (
    Captured,
    LayerCapture,
    MeasureError,
    TokenGrid,
    is_global_pool,
    select_layers,
    to_measurable,
    trace_strides,
)
from .parts import assign_parts
from .report import LayerResult, Report
from .stats import PairStats


def _images(batch: Any) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise MeasureError(f"the data loader yields {type(x).__name__}, expected image tensors")
    return x


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


def _shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    return Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]


def measure(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    transforms: Sequence[Transform] | str,
    layers: Sequence[str | type] | None = None,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    token_grid: TokenGrid | Mapping[str, TokenGrid] | None = None,
    strides: Mapping[str, float] | None = None,
    pool_layer: str | None = None,
    margin: int = 0,
    model_name: str | None = None,
    distributed: bool | None = None,
    progress: bool = True,
) -> Report:
    """Measure invariance, equivariance and equivariance error at every chosen layer.

    For each batch ``X`` the model runs once on ``X`` and once on ``gX`` for each
    transformation ``g``; each captured ``f(gX)`` is compared with ``g·f(X)`` (the
    transformation's action on that layer's output) over the valid positions, and
    the sums behind every metric are accumulated (see :mod:`.stats`).

    Args:
        model: any ``nn.Module`` taking image batches ``(B, C, H, W)``; measured in
            eval mode and restored afterwards.
        data: a dataset of ``(image (C, H, W), label)`` pairs or images, or a
            ``DataLoader`` / iterable of batches.
        transforms: transformations, or a spec such as ``"rot90,flip,shift:1-8"``.
        layers: layer names (patterns allowed) and/or module types; ``None`` for all
            leaf modules except dropout, identity and flatten.
        batch_size / max_images: batching of a dataset and an optional image cap.
        token_grid: ``(h, w[, prefix])`` for layers returning tokens ``(B, N, C)``,
            one for all or a mapping from layer name (default: the model's
            ``token_grid`` attribute, which built-in ViTs and Mixers set).
        strides: stride of a layer's output relative to the input, when the size
            ratio does not give it.
        pool_layer: name of the global pooling layer (default: the model's
            ``equivision_pool_layer`` attribute, else found automatically).
        margin: for transformations that leave invalid positions (shifts, rotations
            by any angle, zooming out), also drop map positions within ``margin``
            input pixels of an invalid position or of the map's edge, so that the
            effects of padding at the borders are not counted as broken
            equivariance. 0 (the default) keeps every position whose value comes
            from inside the map, as the paper does.
        distributed: under ``torchrun`` each process measures its shard of a dataset
            and the sums are all-reduced (default: when a process group exists).

    Returns:
        A :class:`~equivision.measure.report.Report`.
    """
    ts = parse_transforms(transforms) if isinstance(transforms, str) else list(transforms)
    # models may describe themselves: token grid of their blocks, their pooling layer
    if token_grid is None:
        token_grid = getattr(model, "token_grid", None)
    declared_pool = getattr(model, "equivision_pool_layer", None) if pool_layer is None else None
    if not ts:
        raise MeasureError("no transformation to measure")
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    use_dist = dist.is_available() and dist.is_initialized() if distributed is None else distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)

    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise MeasureError("the dataset is empty: nothing to measure")
        if max_images is not None:
            data = Subset(data, list(range(min(n, max_images))))
            max_images = None
        if world > 1:
            data = _shard(data, rank, world)
        loader: Iterable = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        loader = data

    names = select_layers(model, layers)
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    stats: dict[tuple[str, int], PairStats] = {}
    info: dict[str, Captured] = {}
    inexact: dict[tuple[str, int], str] = {}
    order: list[str] = []
    masks: dict[tuple[str, int], Tensor] = {}
    layer_strides: dict = {}
    seen = 0
    total = None
    if hasattr(loader, "__len__"):
        total = len(loader)  # type: ignore[arg-type]
    bar = tqdm(loader, total=total, desc="measure", unit="batch",
               disable=not progress or rank != 0)
    try:
        with LayerCapture(model, names) as cap:
            for batch in bar:
                x = _images(batch).to(dev)
                if x.dim() != 4:
                    raise MeasureError(f"expected image batches (B, C, H, W), got {tuple(x.shape)}")
                if max_images is not None:
                    x = x[: max(0, max_images - seen)]
                    if len(x) == 0:
                        break
                hw = (x.shape[-2], x.shape[-1])
                if not order:
                    layer_strides = {**trace_strides(model, x), **(strides or {})}
                base_raw = cap.run(x)
                if not order:
                    order = list(cap.order)
                base = {}
                for name in order:
                    grid = token_grid.get(name) if isinstance(token_grid, Mapping) else token_grid
                    base[name] = to_measurable(name, base_raw[name], hw, grid, layer_strides)
                for ti, t in enumerate(ts):
                    try:
                        gx = t.apply_image(x)
                    except ShapeError as err:
                        raise MeasureError(f"input images {tuple(x.shape)}: {err}") from None
                    out_raw = cap.run(gx)
                    for name in order:
                        b = base[name]
                        key = (name, ti)
                        if key in inexact:
                            continue
                        grid = (token_grid.get(name) if isinstance(token_grid, Mapping)
                                else token_grid)
                        a = to_measurable(name, out_raw[name], hw, grid, layer_strides).value
                        try:
                            gb = t.act(b.value, b.layout)
                        except ShapeError as err:
                            raise MeasureError(f"layer {name!r}: {err}") from None
                        except InexactActionError as err:
                            inexact[key] = str(err)
                            continue
                        if a.shape != gb.shape:
                            raise MeasureError(
                                f"layer {name!r}: f(gX) has shape {tuple(a.shape)} but g·f(X) "
                                f"{tuple(gb.shape)} under {t.name}; this layer's output size "
                                "depends on the input content, leave it out with --layers"
                            )
                        mask = None
                        if b.value.dim() >= 4:
                            if key not in masks:
                                hw_map = (b.value.shape[-2], b.value.shape[-1])
                                masks[key] = erode(
                                    t.valid_mask(hw_map, b.layout.stride, device=dev),
                                    margin, b.layout.stride)
                            mask = masks[key]
                        if key not in stats:
                            ch = a.shape[1] * (a.shape[2] if a.dim() == 5 else 1)
                            stats[key] = PairStats(ch)
                        if not stats[key].update(a, gb, mask):
                            raise MeasureError(
                                f"layer {name!r} produced NaN or Inf on the original images or "
                                f"under {t.name}; check the checkpoint and the input range, or "
                                "leave the layer out with --layers")
                info = base
                seen += len(x)
    finally:
        model.train(was_training)

    if seen == 0 and not use_dist:
        raise MeasureError("the data yielded no images: nothing to measure")
    if use_dist:
        _all_reduce(stats, order, ts, inexact)
        counts = torch.tensor([float(seen)], dtype=torch.float64)
        dist.all_reduce(counts)
        seen = int(counts.item())

    pool_index = None
    if declared_pool in order:
        pool_index = order.index(declared_pool)
    elif pool_layer is not None:
        if pool_layer not in order:
            raise MeasureError(f"pool_layer {pool_layer!r} is not among the measured layers")
        pool_index = order.index(pool_layer)
    if pool_index is None:
        for i, name in enumerate(order):
            if is_global_pool(modules[name], info[name]):
                pool_index = i
                break
    parts = assign_parts(len(order), pool_index)
    results: list[LayerResult] = []
    for ti, t in enumerate(ts):
        for i, name in enumerate(order):
            c = info[name]
            shape = list(c.value.shape[1:])
            common = dict(transform=t.name, layer=name, index=i, part=parts[i],
                          module=type(modules[name]).__name__, shape=shape,
                          stride=list(c.layout.stride))
            key = (name, ti)
            if key in inexact or key not in stats or stats[key].n == 0:
                note = inexact.get(key, "no valid positions left; lower the margin")
                results.append(LayerResult(exact=False, note=note, **common))
                continue
            m = stats[key].metrics()
            per = m.pop("per_channel")
            n_const = m.pop("n_constant")
            results.append(LayerResult(
                exact=True, metrics=m, n_channels=stats[key].channels, n_constant=n_const,
                per_channel=per,
                note="called more than once per forward; first call measured"
                if name in cap.repeated else "", **common))
    return Report(
        model=model_name or type(model).__name__,
        transforms=[t.name for t in ts],
        layers=order,
        results=results,
        n_images=seen,
        meta={"world_size": world, "pool_layer": order[pool_index] if pool_index is not None
              else None},
    )


def _all_reduce(stats: dict[tuple[str, int], PairStats], order: list[str],
                ts: Sequence[Transform], inexact: dict[tuple[str, int], str]) -> None:
    """Sum every accumulator over the process group (same keys on every rank)."""
    keys = [(n, i) for i in range(len(ts)) for n in order if (n, i) in stats]
    if not keys:
        return
    flat = torch.cat([stats[k].flat() for k in keys])
    backend = dist.get_backend()
    if backend == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for k in keys:
        size = stats[k].flat().numel()
        stats[k].load_flat(flat[offset : offset + size])
        offset += size
