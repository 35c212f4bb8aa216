"""Capture the outputs of chosen layers of any ``nn.Module`` with forward hooks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..transforms.layout import (
    GROUP_OF_AXIS,
    Geometry,
    Layout,
    LayoutError,
    TokenGrid,
    as_map,
    as_stride,
    infer_layout,
    trace_geometry,
)

#: Leaf modules skipped by default: in evaluation mode their output is their input.
PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.Identity, nn.Flatten)
#: Suffix of a measurement point that is a module's input, not its output: ``"fc:input"``.
INPUT = ":input"


class MeasureError(ValueError):
    """A layer or input that the measurement cannot handle; the message says what to do."""


def layer_pattern(pattern: str) -> re.Pattern[str]:
    """A layer-name pattern as a regular expression over dotted module names.

    ``*`` matches within one name component (no dot), ``**`` any run of components
    (dots included), ``?`` one character other than a dot, ``[...]`` a character class;
    everything else is literal. So ``"blocks.*"`` is each direct child of ``blocks``
    (``blocks.0``, ``blocks.1``), ``"blocks.*.attn"`` each block's attention,
    ``"blocks.**"`` everything under ``blocks``, ``"**.conv1"`` every ``conv1`` at any
    depth.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[^" + re.escape(body[1:]) + "]" if body.startswith("!")
                       else "[" + re.escape(body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def select_layers(
    model: nn.Module,
    layers: Sequence[str | type] | None = None,
    include_pass_through: bool = False,
) -> list[str]:
    """Names of the modules to capture, in registration order.

    Args:
        model: any ``nn.Module``.
        layers: ``None`` for the model's own measurement points when it lists them in
            an ``equivision_layers`` attribute (built-in models list the output of each
            conv block, the global pooling and the classifier), else every leaf module;
            ``"all"`` for every leaf module (except dropout / identity / flatten unless
            ``include_pass_through``); otherwise module names, patterns
            (:func:`layer_pattern`: ``"features.conv*"``, ``"blocks.*"`` for the blocks
            themselves, ``"blocks.**"`` for everything in them), ``"NAME:input"`` for
            the input of module ``NAME`` (e.g. a vector pooled in ``forward``), and/or
            module types.
    """
    named = dict(model.named_modules())
    if layers is None and getattr(model, "equivision_layers", None):
        layers = list(model.equivision_layers)  # type: ignore[arg-type]
    if layers is None or (isinstance(layers, str) and layers == "all") or list(layers) == ["all"]:
        out = [
            n for n, m in named.items()
            if n and not any(True for _ in m.children())
            and (include_pass_through or not isinstance(m, PASS_THROUGH))
        ]
        if not out:
            raise MeasureError(f"{type(model).__name__} has no leaf modules to measure")
        return out
    out: list[str] = []
    for spec in layers:
        if isinstance(spec, type):
            found = [n for n, m in named.items() if n and isinstance(m, spec)]
        elif spec.endswith(INPUT) and spec[: -len(INPUT)] in named:
            found = [spec]
        else:
            rx = layer_pattern(spec)
            found = [n for n in named if n and rx.match(n)]
        if not found:
            sample = ", ".join(list(n for n in named if n)[:12])
            raise MeasureError(
                f"no layer of {type(model).__name__} matches {spec!r}; layer names include: "
                f"{sample}{', ...' if len(named) > 13 else ''} ('*' stays within one "
                "dotted name part, '**' crosses them)"
            )
        out.extend(n for n in found if n not in out)
    return out


def named_literally(model: nn.Module, layers: Sequence[str | type] | str | None) -> set[str]:
    """The layers of ``layers`` given by their exact module name (no pattern, no type, not
    the model's own ``equivision_layers``): a measurement must fail when one of them is
    never called, while a default, pattern or type selection skips those and says so."""
    if layers is None or isinstance(layers, str):
        return set()
    named = {n for n, _ in model.named_modules() if n}
    return {spec for spec in layers if isinstance(spec, str) and spec in named}


#: Why a selected layer is not measured when the forward pass never calls it.
NEVER_CALLED = ("skipped: never called in the forward pass (e.g. nn.MultiheadAttention's "
                "out_proj, whose weight is used functionally)")


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a module returned: itself, or the first tensor in a tuple, list or dict."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


@dataclass
class Captured:
    """One layer's output for a batch, reshaped for measurement.

    ``value`` is ``(B, C, h, w)`` for maps and token grids, ``(B, C, G, h, w)`` for
    group maps and ``(B, C)`` for vectors.
    """

    value: Tensor
    layout: Layout
    squeezed: bool = False  # the raw output was a (B, C, 1, 1) map


def unknown_layout(out: Tensor, token_counts: Iterable[int], spatial_input: bool = False,
                   traced: str | None = None) -> str | None:
    """Why the spatial layout of a raw output cannot be known, or ``None`` when it can.

    Not floating point, not 2- to 5-D, or a 5-D output whose group axis is not 4 or 8:
    no layout. Then the rule: in a model with token sequences (``token_counts``: the ``N`` of every
    ``(B, N, C)`` output), a 4-D output whose last two axes both have a token count as
    their length, e.g. an attention map ``(B, heads, N, N)``, indexes tokens, not image
    positions, unless its module's input is a spatial descendant of the image
    (``spatial_input``, :attr:`Trace.spatial`): no transformation acts on it as on an
    image. ``traced``: what the trace found against the output's layout
    (:meth:`Trace.layout_note`: its first axis is not the batch, or it only looks
    channels-last).
    """
    if not out.is_floating_point():
        return f"skipped: returns a {out.dtype} tensor; only floating-point outputs are measured"
    if out.dim() not in (2, 3, 4, 5):
        return (f"skipped: a {out.dim()}-D output {tuple(out.shape)}; only (B, C), (B, N, C), "
                "(B, C, H, W) and (B, C, G, H, W) are understood")
    if out.dim() == 5 and int(out.shape[2]) not in GROUP_OF_AXIS:
        return (f"skipped: a 5-D output {tuple(out.shape)} whose group axis has "
                f"{out.shape[2]} elements; only p4 (4) and p4m (8) group maps are understood")
    counts = set(token_counts)
    if (out.dim() == 4 and not spatial_input
            and int(out.shape[-2]) in counts and int(out.shape[-1]) in counts):
        return (f"skipped: {tuple(out.shape[1:])} indexes tokens x tokens (e.g. attention), "
                "not image positions")
    return traced


def to_measurable(
    name: str,
    out: Tensor,
    input_hw: tuple[int, int],
    token_grid: TokenGrid | None,
    strides: Mapping[str, float | tuple[float, float] | Geometry] | None = None,
) -> Captured:
    """Interpret a raw layer output ``out`` and give it a :class:`Layout`
    (:func:`~equivision.transforms.layout.infer_layout`).

    Token sequences ``(B, N, C)`` keep only their patch tokens, as a ``(B, C, h, w)`` map
    (:func:`~equivision.transforms.layout.as_map`); prefix tokens ([CLS]) are dropped.
    A ``(B, C, 1, 1)`` map (global pooling) is the vector ``(B, C)``: it has no
    positions, so every transformation acts on it as on a pooled vector.
    The stride is the given or traced one (``strides[name]``: a stride or the traced
    :class:`~equivision.transforms.layout.Geometry`, whose grid offset the layout
    keeps; a token layer may be given the geometry of the map its grid was made from),
    else the size ratio. ``out`` is in a layout the measurement knows
    (:meth:`Trace.canonical`).
    """
    pooled = out.dim() == 4 and out.shape[-2:] == (1, 1)
    if pooled:
        out = out.flatten(1)
    if not out.is_floating_point():
        raise MeasureError(
            f"layer {name!r} returns a {out.dtype} tensor; only floating-point outputs can be "
            "measured, leave this layer out with --layers"
        )
    known = (strides or {}).get(name)
    geo = known if isinstance(known, Geometry) else None
    stride = geo.stride if geo is not None else known
    try:
        layout = infer_layout(out, input_hw, token_grid, stride)
    except LayoutError as err:
        raise MeasureError(f"layer {name!r}: {err}") from None
    if pooled and stride is not None:  # the stride it was traced at, for the record
        layout = replace(layout, stride=as_stride(stride))
    if geo is not None and layout.kind != "vector":
        layout = replace(layout, offset=geo.offset, offset_from=geo.offset_from)
    value, layout = as_map(out, layout)
    return Captured(value, layout, pooled)


def check_hookable(model: nn.Module) -> None:
    """Refuse a TorchScript model (``torch.jit.script`` / ``trace``): its forward runs
    compiled code, so forward hooks on its layers never fire (or cannot be registered).

    Raises:
        MeasureError: ``model`` is a ``torch.jit.ScriptModule``.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise MeasureError(
            f"{type(model).__name__} is a TorchScript module: its layers cannot be hooked; "
            "pass the original nn.Module (build its class and load_state_dict)")


def _is_vector(t: Tensor) -> bool:
    """A pooled vector: ``(B, C)`` or ``(B, C, 1, 1)``."""
    return t.dim() == 2 or (t.dim() == 4 and tuple(t.shape[-2:]) == (1, 1))


class FunctionalPool(nn.Module):
    """Stands, in reports, for a measurement point that is a module's input
    (``"fc:input"``): a vector pooled in ``forward`` (``x.mean((2, 3))``, ``x[:, 0]``)."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        return x


class LayerCapture:
    """Context manager that records the first output of each named layer per forward.

    Names ending in ``":input"`` record the first input of that module instead. With
    ``pool_input`` (the default), the first forward also looks for the pool point that
    no module returns: when the first vector-valued tensor after the (last) spatial outputs
    (maps, tokens) is the input of a captured module ``M`` (``x.mean((2, 3))`` or
    ``x[:, 0]`` computed in ``forward``, not a flattened map), ``"M:input"`` is added
    before ``M`` to this and every later forward.

    Example::

        with LayerCapture(model, ["features.conv1", "fc"]) as cap:
            model(x)
        cap.outputs["fc"]  # tensor (B, K)
    """

    def __init__(self, model: nn.Module, names: Iterable[str], pool_input: bool = True,
                 require_tensor: bool = True) -> None:
        self.model = model
        self.names = list(names)
        self.pool_input = pool_input
        self.require_tensor = require_tensor
        self.outputs: dict[str, Tensor] = {}
        self.input_hw: dict[str, tuple[int, int] | None] = {}
        self.order: list[str] = []
        self.repeated: set[str] = set()
        self.inputs_from: dict[str, int] = {}  # storage of each module's input (trace)
        self.input_shape: dict[str, tuple[int, ...]] = {}  # shape of each module's input
        self.output_at: dict[str, int] = {}  # storage of each output before the copy
        self._runs = 0
        self._spatial_numel: int | None = None
        self._vector_seen = False
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        check_hookable(self.model)
        modules = dict(self.model.named_modules())
        for name in self.names:
            base = name[: -len(INPUT)] if name.endswith(INPUT) else name
            if base not in modules:
                raise MeasureError(f"{type(self.model).__name__} has no layer named {base!r}")
            if name != base:
                self._handles.append(modules[base].register_forward_pre_hook(
                    self._pre_hook(base)))
            else:
                if self.pool_input:
                    self._handles.append(modules[name].register_forward_pre_hook(
                        self._pre_hook(name)))
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _record(self, name: str, t: Tensor, inputs: Any) -> None:
        # a copy: the output may be a buffer that a later in-place op (a
        # ``ReLU(inplace=True)``, a residual ``+=``) overwrites in the same forward
        self.output_at[name] = t.untyped_storage().data_ptr()
        self.outputs[name] = t.detach().clone()
        self.order.append(name)
        first = first_tensor(inputs)
        self.input_hw[name] = (
            (first.shape[-2], first.shape[-1]) if first is not None and first.dim() >= 4
            else None)
        if first is not None:
            self.inputs_from[name] = first.untyped_storage().data_ptr()
            self.input_shape[name] = tuple(first.shape)
        if t.dim() >= 3 and not _is_vector(t):
            # a map after vectors (a squeeze-excitation gate inside a block): the pool
            # point is still to come
            self._spatial_numel, self._vector_seen = t[0].numel(), False
        elif _is_vector(t):
            self._vector_seen = True

    def _pre_hook(self, module_name: str):
        point = module_name + INPUT

        def hook(module: nn.Module, inputs: Any) -> None:
            t = first_tensor(inputs)
            if point in self.outputs or t is None:
                return
            wanted = point in self.names
            if not wanted and self._runs == 0 and self._is_pool_point(t):
                self.names.insert(self.names.index(module_name), point)
                wanted = True
            if wanted:
                self._record(point, t, ())
                self.input_hw[point] = None

        return hook

    def _is_pool_point(self, t: Tensor) -> bool:
        """The first ``(B, C)`` vector after the last spatial outputs so far, not a
        flattened map (a ``(B, C, 1, 1)`` input is some module's output, measured as that
        module)."""
        return (self._spatial_numel is not None and not self._vector_seen and t.dim() == 2
                and t.is_floating_point() and t[0].numel() != self._spatial_numel)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self.outputs:
                self.repeated.add(name)
                return
            t = first_tensor(output)
            if t is None:
                if not self.require_tensor:
                    return
                raise MeasureError(
                    f"layer {name!r} ({type(module).__name__}) returned no tensor "
                    f"({type(output).__name__}); leave it out with --layers"
                )
            self._record(name, t, inputs)

        return hook

    def clear(self) -> None:
        self.outputs = {}
        self.input_hw = {}
        self.order = []
        self._spatial_numel, self._vector_seen = None, False

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, x: Tensor, strict: bool = True) -> dict[str, Tensor]:
        """Run the model on ``x`` and return the captured outputs (no gradients).
        With ``strict``, a layer that was never called is an error; a forward that fails
        is a :class:`MeasureError` that says so."""
        self.clear()
        try:
            with torch.no_grad():
                self.model(x)
        except MeasureError:
            raise
        except Exception as err:  # the model's own error, on this input
            raise MeasureError(
                f"the forward pass of {type(self.model).__name__} failed on an input of shape "
                f"{tuple(x.shape)}: {type(err).__name__}: {err}; if a transformation changed "
                "the image size, measure with size-preserving ones or fix the model to accept "
                "that size") from err
        finally:
            self._runs += 1
        missing = [n for n in self.names if n not in self.outputs]
        if missing and strict:
            raise MeasureError(
                f"layer(s) {missing[:5]} were never called in the forward pass; leave them out"
            )
        return self.outputs


@dataclass
class Trace:
    """What one forward pass with every module hooked tells about a model's outputs.

    ``strides``: the :class:`~equivision.transforms.layout.Geometry` (stride and grid
    offset) of every spatial output, leaves and containers; ``token_counts``: the ``N``
    of every token output ``(B, N, C)``; ``spatial``: the modules whose input is a
    spatial descendant of the image (see :func:`trace_layers`); ``channels_last``,
    ``channels_last_input`` and ``looks_channels_last``: see :func:`find_channels_last`;
    ``sequence_first``: 3-D outputs ``(N, B, C)``; ``batch_not_first``: outputs whose first
    axis is not the batch (read on the batch-1 trace: that axis is not 1).
    """

    strides: dict[str, Geometry]
    token_counts: set[int]
    spatial: set[str]
    channels_last: set[str] = field(default_factory=set)
    channels_last_input: set[str] = field(default_factory=set)
    looks_channels_last: set[str] = field(default_factory=set)
    sequence_first: set[str] = field(default_factory=set)
    batch_not_first: set[str] = field(default_factory=set)

    def layout_note(self, name: str) -> str | None:
        """Why the trace says output ``name`` has no known layout, or None."""
        if name in self.batch_not_first:
            return ("skipped: its first axis is not the batch (e.g. (B * heads, N, d) inside "
                    "an attention); only outputs (B, ...) and sequence-first tokens (N, B, C) "
                    "are measured")
        if name in self.looks_channels_last:
            return ("skipped: looks channels-last (B, H, W, C), but only the outputs of "
                    "nn.Linear / nn.LayerNorm / nn.RMSNorm on such a map (and what follows them "
                    "shape for shape) are read so; measure the permuted-back map")
        return None

    def canonical(self, name: str, out: Tensor) -> Tensor:
        """Output ``out`` of module ``name`` in the layouts the measurement knows:
        sequence-first tokens ``(N, B, C)`` (a ``batch_first=False`` transformer) as
        ``(B, N, C)``, a channels-last map ``(B, H, W, C)`` (:func:`find_channels_last`) as
        ``(B, C, H, W)``; anything else as it is."""
        if name in self.sequence_first and out.dim() == 3:
            return out.transpose(0, 1)
        if name in self.channels_last and out.dim() == 4:
            return out.permute(0, 3, 1, 2).contiguous()
        return out


#: Leaf types that act on the last axis of a tensor: given a channels-last map
#: ``(B, H, W, C)`` (ConvNeXt's and Swin's blocks) they return one. Exact types only: a
#: subclass (timm's ``LayerNorm2d``) may permute inside.
LAST_AXIS = (nn.Linear, nn.LayerNorm, nn.RMSNorm)


def _acts_on_last_axis(module: nn.Module) -> bool:
    if type(module) not in LAST_AXIS:
        return False
    return len(getattr(module, "normalized_shape", (0,))) == 1


def find_channels_last(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    outs: Mapping[str, Tensor],
    capture: LayerCapture,
    image_hw: Sequence[int],
) -> tuple[set[str], set[str], set[str]]:
    """The modules whose output, and those whose input, is a channels-last map
    ``(B, H, W, C)`` (a ``LayerNorm`` or ``Linear`` applied to a permuted map).

    A 4-D tensor is read as ``(B, C, H, W)`` unless its axes 1-2 are the size of the image
    or of a map output before it and it is the output of a module that acts on the last
    axis (:data:`LAST_AXIS`) on such a map, of a module whose input was a channels-last
    output of the same shape (an activation between two ``Linear`` layers), or a
    channels-last output itself (a container returning it). No module type is guessed
    beyond that: a tensor that only looks channels-last is left to
    :func:`unknown_layout`.

    Returns:
        ``(outputs, inputs, look-alikes)``: module names; a look-alike's output is 4-D,
        its axes 1-2 are a map size seen before and its last two axes are not (a module
        that permutes a map, or, rarely, a non-square kernel): it looks channels-last, but
        no rule above says so.
    """
    sizes = {tuple(int(v) for v in image_hw)}
    stored: set[int] = set()  # storages of channels-last outputs
    outs_cl: set[str] = set()
    ins_cl: set[str] = set()
    looks: set[str] = set()
    for name in order:
        t, shape = outs.get(name), capture.input_shape.get(name)
        module = modules[name]
        src = capture.inputs_from.get(name) in stored
        if shape is not None and len(shape) == 4 and (src or (
                _acts_on_last_axis(module) and tuple(shape[1:3]) in sizes)):
            ins_cl.add(name)
        if t is None or t.dim() != 4:
            continue
        evidence = (name in ins_cl and (_acts_on_last_axis(module) or shape == tuple(t.shape))
                    ) or capture.output_at.get(name) in stored
        first, last = tuple(t.shape[1:3]), (int(t.shape[-2]), int(t.shape[-1]))
        if evidence and first in sizes:
            outs_cl.add(name)
            stored.add(capture.output_at[name])
            continue
        if first in sizes and last not in sizes:
            looks.add(name)
        sizes.add(last)
    return outs_cl, ins_cl, looks


def trace_layers(model: nn.Module, x: Tensor) -> Trace:
    """Trace every module on ``x[:1]`` (so that layers between the measured ones are seen
    too): geometry (:func:`~equivision.transforms.layout.trace_geometry`) and token counts.

    A module's input is a spatial descendant of the image when its size is the image's or
    that of such an output seen earlier, and, when both of its sides are token counts
    (a token x token attention map at 16 tokens on a 16 px image), it is also the very
    tensor the image or such an output is stored in. Channels-last maps
    (:func:`find_channels_last`) take their size from axes 1-2.
    """
    names = [n for n, _ in model.named_modules() if n]
    with LayerCapture(model, names, pool_input=False, require_tensor=False) as tracer:
        outs = tracer.run(x[:1], strict=False)
        in_hw, order = dict(tracer.input_hw), list(tracer.order)
        inputs_from, output_at = tracer.inputs_from, tracer.output_at
    out_hw = {n: (t.shape[-2], t.shape[-1]) if t.dim() >= 4 else None for n, t in outs.items()}
    modules = dict(model.named_modules())
    cl_out, cl_in, looks = find_channels_last(order, modules, outs, tracer, x.shape[-2:])
    out_hw.update({n: (outs[n].shape[1], outs[n].shape[2]) for n in cl_out})
    in_hw.update({n: tracer.input_shape[n][1:3] for n in cl_in})  # type: ignore[misc]
    geometry = trace_geometry(order, modules, in_hw, out_hw, (x.shape[-2], x.shape[-1]))
    # on a batch of 1 the batch axis has length 1: (N, 1, C) is sequence-first tokens
    seq = {n for n, t in outs.items() if t.dim() == 3 and t.shape[0] > 1 and t.shape[1] == 1}
    other = {n for n, t in outs.items() if t.dim() >= 2 and t.shape[0] != 1 and n not in seq}
    counts = {int(t.shape[0] if n in seq else t.shape[1]) for n, t in outs.items()
              if t.dim() == 3 and n not in other}
    reached, spatial = {(x.shape[-2], x.shape[-1])}, set()
    stored = {x.untyped_storage().data_ptr()}
    for name in order:
        hi, ho = in_hw.get(name), out_hw.get(name)
        tokenish = hi is not None and hi[0] in counts and hi[1] in counts
        if hi is not None and tuple(hi) in reached and (
                not tokenish or inputs_from.get(name) in stored):
            spatial.add(name)
            if ho is not None:
                reached.add(tuple(ho))
                stored.add(output_at[name])
    return Trace(geometry, counts, spatial, cl_out, cl_in, looks, seq, other)


def pool_point(values: Sequence[Captured], spatial_input: Sequence[bool] = ()) -> int | None:
    """Index of the pool point among captured layers in forward order: the first
    vector-valued one after the *last* spatial one (map, group map or token grid), or
    whose module read a spatial input (``spatial_input[i]``, :attr:`Trace.spatial`; when
    the maps before it are not measured), however it was computed; ``None`` when there is
    none. Vectors followed by maps again (a squeeze-excitation block's pooled gate) are
    not it. A ``(B, C, 1, 1)`` map directly followed by a vector of the same ``C`` (a
    network whose last map is 1 x 1 at this size, then its global pooling) defers to
    that vector."""
    spatial, found = False, None
    reads = list(spatial_input) + [False] * (len(values) - len(spatial_input))
    for i, c in enumerate(values):
        if c.layout.kind != "vector":
            spatial, found = True, None
            continue
        if found is None and (spatial or reads[i]):
            nxt = values[i + 1] if i + 1 < len(values) else None
            if not (c.squeezed and nxt is not None and nxt.layout.kind == "vector"
                    and nxt.value.shape[1:] == c.value.shape[1:]):
                found = i
            spatial = True
    return found
