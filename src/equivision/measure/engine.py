"""One pass over the data that measures every chosen layer under every transformation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..transforms import InexactActionError, ShapeError, Transform, as_transforms
from ..transforms.layout import Geometry, TokenGrid, infer_token_grid
from ..utils import model_device, model_dtype
from .baselines import random_init_copy
from .capture import (
    NEVER_CALLED,
    Captured,
    FunctionalPool,
    LayerCapture,
    MeasureError,
    Trace,
    layer_pattern,
    named_literally,
    pool_point,
    select_layers,
    to_measurable,
    trace_layers,
    unknown_layout,
)
from .compare import AlignmentError, Comparator
from .parts import assign_parts
from .report import LayerResult, Report
from .stats import CI_GROUPS, CI_LEVEL, CI_REPLICATES, PairStats


def _images(batch: Any) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise MeasureError(f"the data loader yields {type(x).__name__}, expected image tensors")
    return x


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
    random_init: bool = False,
    init_seed: int = 0,
    ci_groups: int = CI_GROUPS,
    grid_offsets: str = "flag",
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
        strides: a layer's output stride, where the traced geometry does not give it.
        pool_layer: name of the global pooling layer (default: the model's
            ``equivision_pool_layer`` attribute, else found automatically).
        margin: also drop map positions within ``margin`` input pixels of an invalid
            position or of the map's edge (shifts, rotations, zooming out), so that
            padding at the borders is not counted; 0 (the paper) keeps every position
            whose value comes from inside the map.
        distributed: under ``torchrun`` each process measures its shard of a dataset
            and the sums are all-reduced (default: when a process group exists).
        random_init: also measure :func:`~.baselines.random_init_copy` (``init_seed``)
            in the same pass (each result's ``random_init`` and ``random_init_ci``).
        ci_groups: random image groups for 95% bootstrap intervals over images (each
            result's ``ci``; memory ``ci_groups x C^2`` per pair); 0: none.
        grid_offsets: ``"flag"``: a flip or 90° rotation of a map whose sampling grid is
            off the image's centre is inexact (no exact action exists); ``"ignore"``:
            act about each map's own centre anyway, measuring the error an approximate
            network makes (the using-and-abusing paper's figure 4).

    Every result also holds the channel-redundancy baseline ``redundancy``
    (:meth:`~.stats.PairStats.redundancy`) and Eq. 7's ``per_channel["match"]``.

    Outputs whose layout cannot be known (:func:`~.capture.unknown_layout`) are not
    measured; ``report.meta["skipped"]`` says why, per layer.

    Returns:
        A :class:`~equivision.measure.report.Report`.
    """
    ts = _checked_options(transforms, ci_groups, grid_offsets)
    # models may describe themselves: token grid of their blocks, their pooling layer
    token_grid = getattr(model, "token_grid", None) if token_grid is None else token_grid
    use_dist = dist.is_available() and dist.is_initialized() if distributed is None else distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    loader, max_images = _loader(data, batch_size, max_images, rank, world)
    clone, kept = random_init_copy(model, init_seed) if random_init else (None, [])
    names, literal = select_layers(model, layers), named_literally(model, layers)
    sessions = [_Session(m, ts, names, token_grid, strides, margin, device, use_dist,
                         ci_groups, rank) for m in ([model] if clone is None else [model, clone])]
    for session in sessions:
        session.centre_grids = grid_offsets == "ignore"
        session.must_call = literal
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(loader, total=total, desc="measure", unit="batch",
               disable=not progress or rank != 0)
    repeated = _run(sessions, bar, max_images)
    if sessions[0].seen == 0 and not use_dist:
        raise MeasureError("the data yielded no images: nothing to measure")
    if use_dist:
        for s in sessions:
            s.all_reduce()
    report = _report(sessions, pool_layer, repeated, ci_groups)
    report.model = model_name or type(model).__name__
    report.meta["world_size"] = world
    if random_init:
        report.meta["random_init"] = {"seed": init_seed, "kept_trained": kept}
    return report


def _report(sessions: list[_Session], pool_layer: str | None, repeated: set[str],
            ci_groups: int) -> Report:
    """The report of the measured model (``sessions[0]``), with the random-init
    session's results (``sessions[1]``, if any) beside its own."""
    session = sessions[0]
    pool_index = session.pool_index(pool_layer)
    results = session.results(pool_index, repeated)
    if len(sessions) > 1:
        _attach_random_init(results, sessions[1].results(pool_index, repeated))
    meta: dict[str, Any] = {
        "pool_layer": session.order[pool_index] if pool_index is not None else None,
        "skipped": dict(session.skipped),
        "ci": {"level": CI_LEVEL, "groups": ci_groups, "replicates": CI_REPLICATES,
               "method": "percentile bootstrap over images, resampling random image groups"}
        if ci_groups else None,
    }
    return Report(model="", transforms=[t.name for t in session.ts], layers=session.order,
                  results=results, n_images=session.seen, meta=meta)


def _run(sessions: list[_Session], batches: Iterable, max_images: int | None) -> set[str]:
    """One pass over ``batches``: every session measures each batch (its model in eval
    mode, restored afterwards). Returns the layers called more than once per forward."""
    modes = [s.model.training for s in sessions]
    for s in sessions:
        s.model.eval()
    try:
        with ExitStack() as stack:
            caps = [stack.enter_context(LayerCapture(s.model, s.names)) for s in sessions]
            for batch in batches:
                x = _images(batch)
                if not all([s.step(cap, x, max_images) for s, cap in zip(sessions, caps)]):
                    break
            return set(caps[0].repeated)
    finally:
        for s, mode in zip(sessions, modes):
            s.model.train(mode)


def _attach_random_init(results: list[LayerResult], baseline: list[LayerResult]) -> None:
    """Put each random-init result's metrics and intervals beside the trained one's."""
    by_key = {(r.transform, r.layer): r for r in baseline}
    for r in results:
        b = by_key.get((r.transform, r.layer))
        if b is not None and b.exact:
            r.random_init, r.random_init_ci = dict(b.metrics), dict(b.ci)


def _checked_options(transforms: Sequence[Transform] | str, ci_groups: int,
                     grid_offsets: str) -> list[Transform]:
    """The transformations to measure, after checking :func:`measure`'s options."""
    if not isinstance(transforms, str) and not list(transforms):
        raise MeasureError("no transformation to measure")
    if ci_groups < 0 or ci_groups == 1:
        raise MeasureError(f"ci_groups must be 0 (no intervals) or at least 2, got {ci_groups}")
    if grid_offsets not in ("flag", "ignore"):
        raise MeasureError(f"grid_offsets must be 'flag' or 'ignore', got {grid_offsets!r}")
    return as_transforms(transforms)


def _loader(data: Dataset | DataLoader | Iterable, batch_size: int, max_images: int | None,
            rank: int, world: int) -> tuple[Iterable, int | None]:
    """Batches of ``data`` (a dataset is capped, sharded over processes and batched) and the
    image cap that is left to apply batch by batch."""
    if not isinstance(data, Dataset) or isinstance(data, DataLoader):
        return data, max_images
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise MeasureError("the dataset is empty: nothing to measure")
    if max_images is not None:
        data = Subset(data, list(range(min(n, max_images))))
    if world > 1:
        data = _shard(data, rank, world)
    return DataLoader(data, batch_size=batch_size, shuffle=False), None


class _Session:
    """The state of one measurement: the layers, the statistics of every (layer,
    transformation) pair, and the pairs found inexact."""

    def __init__(self, model: nn.Module, ts: list[Transform], names: list[str],
                 token_grid: TokenGrid | Mapping[str, TokenGrid] | None,
                 strides: Mapping[str, float] | None, margin: int,
                 device: torch.device | str | None, use_dist: bool = False,
                 ci_groups: int = 0, rank: int = 0) -> None:
        self.model = model
        self.ts = ts
        self.names = names
        self.token_grid = token_grid
        self.strides = strides
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = model_dtype(model)  # a float64 / bfloat16 model gets its own dtype
        self.modules = dict(model.named_modules())
        self.compare = Comparator(margin)
        self.stats: dict[tuple[str, int], PairStats] = {}
        self.redundant: dict[str, PairStats] = {}  # f(X) with itself, per layer
        self.groups = ci_groups
        # the same image groups in every session of a process (seeded per rank)
        self._group_gen = torch.Generator().manual_seed(1_000_003 * (rank + 1))
        self.inexact: dict[tuple[str, int], str] = {}
        self.info: dict[str, Captured] = {}
        self.order: list[str] = []
        self.skipped: dict[str, str] = {}
        self.must_call: set[str] = set()  # layers named literally: not called is an error
        self.layer_strides: dict = {}
        self.centre_grids = False  # measure(grid_offsets="ignore")
        self.trace = Trace({}, set(), set())  # trace_layers on the first batch
        self.scale: dict[str, float] = {}
        self.use_dist = use_dist
        self.seen = 0

    def _grid(self, name: str, out: Tensor, hw: tuple[int, int]) -> TokenGrid | None:
        """The token grid of layer ``name`` whose raw output is ``out``: for tokens
        ``(B, N, C)``, the given grid (one for all, or a mapping from layer names or
        patterns, :func:`~.capture.layer_pattern`) with the prefix its ``N`` leaves, else
        one read from ``N`` and the image size ``hw``
        (:func:`~equivision.transforms.layout.infer_token_grid`)."""
        tg = self.token_grid
        if isinstance(tg, Mapping):
            tg = tg.get(name) or next(
                (g for k, g in tg.items() if layer_pattern(k).match(name)), None)
        if out.dim() != 3:
            return tg
        grid = infer_token_grid(int(out.shape[1]), hw, tg)
        if grid is None:
            given = f"the token grid {tuple(tg)}" if tg is not None else "no token grid"
            raise MeasureError(
                f"layer {name!r}: its {out.shape[1]} tokens fit {given} on a "
                f"{hw[0]}x{hw[1]} image; pass token_grid=(h, w, prefix) for it, per layer "
                "if needed (CLI: --token-grid h,w[,prefix]), or leave it out with --layers")
        return grid

    def _capture(self, raw: Mapping[str, Tensor], hw: tuple[int, int]) -> dict[str, Captured]:
        """Each measured layer's raw output as a :class:`~.capture.Captured`, scaled; a
        token layer takes the traced geometry of the first map of its grid's size (the
        patch layer's), so that its stride and grid offset are the traced ones."""
        out = {}
        raw = {n: self.trace.canonical(n, t) for n, t in raw.items()}
        for name in (n for n in self.order if n in raw):
            grid = self._grid(name, raw[name], hw)
            known = self.layer_strides
            if grid is not None and raw[name].dim() == 3 and name not in known:
                geo = next((g for g in known.values()
                            if isinstance(g, Geometry) and g.size == tuple(grid[:2])), None)
                known = {name: geo} if geo is not None else known
            out[name] = to_measurable(name, raw[name], hw, grid, known)
            if self.centre_grids:
                c = out[name]
                out[name] = replace(c, layout=replace(c.layout, offset=(0.0, 0.0),
                                                      offset_from=""))
        for name, c in out.items():  # in place: the capture's own copy
            self.modules.setdefault(name, FunctionalPool())  # a "NAME:input" point
            if self.scale[name] != 1.0:
                c.value.mul_(self.scale[name])
        return out

    def _choose_scales(self, raw: Mapping[str, Tensor]) -> None:
        """A power of two per layer that brings the mean square of its output on the
        first batch near 1 (the same on every process).

        The statistics see scaled outputs, so that which channels are constant does
        not depend on the layer's scale (a layer times 1e-5 gives the correlations of
        the layer itself); a power of two changes no float, and :meth:`results`
        scales ``mse``, ``l1`` and ``activation`` back.
        """
        ms = torch.stack([raw[n].detach().double().square().mean().cpu() for n in self.order])
        ok = (ms > 0) & torch.isfinite(ms)
        exps = torch.where(ok, torch.round(-0.5 * torch.log2(ms)), torch.zeros_like(ms))
        if self.use_dist:
            exps = exps.cuda() if dist.get_backend() == "nccl" else exps
            dist.all_reduce(exps, op=dist.ReduceOp.MAX)
        self.scale = {n: float(2.0 ** e) for n, e in zip(self.order, exps.tolist())}

    def _choose(self, called: Sequence[str], raw: Mapping[str, Tensor]) -> None:
        """The measured layers in forward order: the called ones whose layout can be
        known (:func:`~.capture.unknown_layout`); the others go to ``skipped``, and so do
        selected layers the forward pass never called, unless named literally
        (``must_call``: then it is an error)."""
        missing = [n for n in self.names if n not in raw]
        named = [n for n in missing if n in self.must_call]
        if named:
            raise MeasureError(
                f"layer(s) {named[:5]} were never called in the forward pass; leave them out")
        self.skipped.update({n: NEVER_CALLED for n in missing})
        for name in called:
            reason = unknown_layout(raw[name], self.trace.token_counts,
                                    name in self.trace.spatial, self.trace.layout_note(name))
            if reason is None:
                self.order.append(name)
            else:
                self.skipped[name] = reason
        if not self.order:
            raise MeasureError(f"no measurable layer: {self.skipped}")

    def step(self, cap: LayerCapture, x: Tensor, max_images: int | None) -> bool:
        """Measure one batch ``x (B, C, H, W)``; False once ``max_images`` are measured."""
        x = x.to(self.device, self.dtype)
        if x.dim() != 4:
            raise MeasureError(f"expected image batches (B, C, H, W), got {tuple(x.shape)}")
        if max_images is not None:
            x = x[: max(0, max_images - self.seen)]
            if len(x) == 0:
                return False
        hw = (x.shape[-2], x.shape[-1])
        first = not self.order and not self.skipped
        if first:
            self.trace = trace_layers(self.model, x)
            self.layer_strides = {**self.trace.strides, **(self.strides or {})}
        base_raw = cap.run(x, strict=False)
        if first:
            self._choose(cap.order, base_raw)
            self._choose_scales(base_raw)
        base = self._capture(base_raw, hw)
        ids = (torch.randint(self.groups, (len(x),), generator=self._group_gen)
               if self.groups else None)
        for name in self.order:
            self._redundancy(name, base[name].value, ids)
        for ti, t in enumerate(self.ts):
            try:
                gx = t.apply_image(x)
            except ShapeError as err:
                raise MeasureError(f"input images {tuple(x.shape)}: {err}") from None
            try:
                moved = self._capture(cap.run(gx, strict=False), hw)
            except MeasureError as err:  # this g breaks the model: say so per layer
                for name in self.order:
                    self.inexact.setdefault(
                        (name, ti), f"the model's forward failed on the transformed input: {err}")
                continue
            for name in self.order:
                if name not in moved:
                    self.inexact.setdefault(
                        (name, ti), "the forward pass did not call this layer on the "
                        "transformed input (data-dependent control flow)")
                elif (name, ti) not in self.inexact:
                    self._compare(name, ti, moved[name].value, base[name], ids)
        self.info = base
        self.seen += len(x)
        return True

    def _redundancy(self, name: str, fx: Tensor, ids: Tensor | None) -> None:
        """Feed one layer's ``f(X)`` (with itself) to its redundancy statistics; a batch
        with NaN or Inf is left out (the comparison reports it)."""
        if name not in self.redundant:
            self.redundant[name] = PairStats(_channels(fx), self.groups)
        self.redundant[name].update(fx, fx, None, ids)

    def _compare(self, name: str, ti: int, fgx: Tensor, base: Captured,
                 ids: Tensor | None = None) -> None:
        """Feed one layer's ``f(gX)`` and ``f(X)`` under ``ts[ti]`` to its statistics
        (``ids``: the image groups of the batch, for the intervals)."""
        t, key = self.ts[ti], (name, ti)
        try:
            pair = self.compare.compare(fgx, base.value, t, base.layout)
        except ShapeError as err:
            raise MeasureError(f"layer {name!r}: {err}") from None
        except InexactActionError as err:
            self.inexact[key] = str(err)
            return
        except AlignmentError as err:
            raise MeasureError(
                f"layer {name!r}: {err}; this layer's output size depends on the input "
                "content, leave it out with --layers") from None
        if key not in self.stats:
            self.stats[key] = PairStats(_channels(pair.a), self.groups)
        if not self.stats[key].update(pair.a, pair.b, pair.mask, ids):
            raise MeasureError(
                f"layer {name!r} produced NaN or Inf on the original images or under "
                f"{t.name}; check the checkpoint and the input range, or leave the layer out "
                "with --layers")

    def all_reduce(self) -> None:
        """Sum the statistics and the image count over the process group."""
        keys = [(n, i) for i in range(len(self.ts)) for n in self.order if (n, i) in self.stats]
        _all_reduce([self.stats[k] for k in keys]
                    + [self.redundant[n] for n in self.order if n in self.redundant])
        counts = torch.tensor([float(self.seen)], dtype=torch.float64)
        dist.all_reduce(counts)
        self.seen = int(counts.item())

    def pool_index(self, pool_layer: str | None) -> int | None:
        """Index of the pool point among the measured layers: the given one, the model's
        ``equivision_pool_layer``, else the first vector-valued output after the last
        spatial one, however it was computed (:func:`~.capture.pool_point`: a global pooling
        module, a 1 x 1 map, or a vector pooled in ``forward`` and captured as the next
        module's input, ``"fc:input"``)."""
        declared = getattr(self.model, "equivision_pool_layer", None) if pool_layer is None \
            else None
        if declared in self.order:
            return self.order.index(declared)
        if pool_layer is not None:
            if pool_layer not in self.order:
                raise MeasureError(f"pool_layer {pool_layer!r} is not among the measured layers")
            return self.order.index(pool_layer)
        return pool_point([self.info[name] for name in self.order],
                          [name in self.trace.spatial for name in self.order])

    def results(self, pool_index: int | None, repeated: set[str]) -> list[LayerResult]:
        """One :class:`LayerResult` per (transformation, layer)."""
        parts = assign_parts(len(self.order), pool_index)
        redundancy = {name: self._layer_redundancy(name) for name in self.order}
        out: list[LayerResult] = []
        for ti, t in enumerate(self.ts):
            for i, name in enumerate(self.order):
                c = self.info[name]
                common = dict(transform=t.name, layer=name, index=i, part=parts[i],
                              module=type(self.modules[name]).__name__,
                              shape=list(c.value.shape[1:]), stride=list(c.layout.stride))
                key = (name, ti)
                st = self.stats.get(key)
                if key in self.inexact or st is None or st.n == 0:
                    note = self.inexact.get(key, "no valid positions left; lower the margin")
                    out.append(LayerResult(exact=False, note=note, **common))
                    continue
                m = _unscale(st.metrics(), self.scale[name])
                per = m.pop("per_channel")
                n_const = m.pop("n_constant")
                ci = _unscale(st.bootstrap(), self.scale[name]) if self.groups else {}
                m["redundancy"], ci["redundancy"] = redundancy[name]
                out.append(LayerResult(
                    exact=True, metrics=m, n_channels=st.channels, n_constant=n_const,
                    per_channel=per, ci={k: ci.get(k) for k in m},
                    note="called more than once per forward; first call measured"
                    if name in repeated else "", **common))
        return out


    def _layer_redundancy(self, name: str) -> tuple[float | None, list[float] | None]:
        """The layer's channel-redundancy baseline and its interval (None, None when no
        sample was accumulated)."""
        st = self.redundant.get(name)
        if st is None or st.n == 0:
            return None, None
        ci = st.bootstrap("redundancy") if self.groups else {}
        return st.redundancy()["redundancy"], ci.get("redundancy")


def _channels(x: Tensor) -> int:
    """Channels of a measured tensor, a group map's group axis folded in."""
    return x.shape[1] * (x.shape[2] if x.dim() == 5 else 1)


#: Powers of the scale that each scale-dependent metric carries.
_SCALE_POWERS = {"mse": 2, "l1": 1, "activation": 1}


def _unscale(metrics: dict, scale: float) -> dict:
    """Metrics (or their ``[low, high]`` intervals) of outputs multiplied by ``scale`` as
    those of the outputs themselves: ``mse`` / scale^2, ``l1`` and ``activation`` / scale
    (the others are scale-free)."""
    out = dict(metrics)
    for k, p in _SCALE_POWERS.items():
        v = metrics.get(k)
        if isinstance(v, list):
            out[k] = [x / scale**p for x in v]
        elif v is not None:
            out[k] = v / scale**p
    return out


def _all_reduce(stats: list[PairStats]) -> None:
    """Sum every accumulator over the process group (same list on every rank)."""
    if not stats:
        return
    flat = torch.cat([st.flat() for st in stats])
    backend = dist.get_backend()
    if backend == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for st in stats:
        size = st.flat().numel()
        st.load_flat(flat[offset : offset + size])
        offset += size
