"""Capture the outputs of chosen layers of any ``nn.Module`` with forward hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..transforms.layout import (
    Layout,
    LayoutError,
    TokenGrid,
    as_map,
    as_stride,
    infer_layout,
    infer_strides,
)

#: Leaf modules skipped by default: in evaluation mode their output is their input.
PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.Identity, nn.Flatten)
#: Modules treated as global pooling when their output is 1 x 1 (or a vector).
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d)


class MeasureError(ValueError):
    """A layer or input that the measurement cannot handle; the message says what to do."""


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
            ``include_pass_through``); otherwise module names (shell patterns such as
            ``"features.conv*"`` allowed) and/or module types.
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
        else:
            found = [n for n in named if n and fnmatch.fnmatchcase(n, spec)]
        if not found:
            sample = ", ".join(list(n for n in named if n)[:12])
            raise MeasureError(
                f"no layer of {type(model).__name__} matches {spec!r}; layer names include: "
                f"{sample}{', ...' if len(named) > 13 else ''}"
            )
        out.extend(n for n in found if n not in out)
    return out


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


def unknown_layout(out: Tensor, token_counts: Iterable[int], spatial_input: bool = False
                   ) -> str | None:
    """Why the spatial layout of a raw output cannot be known, or ``None`` when it can.

    The rule: in a model with token sequences (``token_counts``: the ``N`` of every
    ``(B, N, C)`` output), a 4-D output whose last two axes both have a token count as
    their length, e.g. an attention map ``(B, heads, N, N)``, indexes tokens, not image
    positions, unless its module's input is a spatial descendant of the image
    (``spatial_input``, :attr:`Trace.spatial`): no transformation acts on it as on an
    image.
    """
    counts = set(token_counts)
    if (out.dim() == 4 and not spatial_input
            and int(out.shape[-2]) in counts and int(out.shape[-1]) in counts):
        return (f"skipped: {tuple(out.shape[1:])} indexes tokens x tokens (e.g. attention), "
                "not image positions")
    return None


def to_measurable(
    name: str,
    out: Tensor,
    input_hw: tuple[int, int],
    token_grid: TokenGrid | None,
    strides: Mapping[str, float | tuple[float, float]] | None = None,
) -> Captured:
    """Interpret a raw layer output ``out`` and give it a :class:`Layout`
    (:func:`~equivision.transforms.layout.infer_layout`).

    Token sequences ``(B, N, C)`` keep only their patch tokens, as a ``(B, C, h, w)`` map
    (:func:`~equivision.transforms.layout.as_map`); prefix tokens ([CLS]) are dropped.
    A ``(B, C, 1, 1)`` map (global pooling) is the vector ``(B, C)``: it has no
    positions, so every transformation acts on it as on a pooled vector.
    The stride is the given or traced one (``strides[name]``), else the size ratio.
    """
    pooled = out.dim() == 4 and out.shape[-2:] == (1, 1)
    if pooled:
        out = out.flatten(1)
    if not out.is_floating_point():
        raise MeasureError(
            f"layer {name!r} returns a {out.dtype} tensor; only floating-point outputs can be "
            "measured, leave this layer out with --layers"
        )
    try:
        layout = infer_layout(out, input_hw, token_grid, (strides or {}).get(name))
    except LayoutError as err:
        raise MeasureError(f"layer {name!r}: {err}") from None
    if pooled and strides and name in strides:  # the stride it was traced at, for the record
        layout = replace(layout, stride=as_stride(strides[name]))
    value, layout = as_map(out, layout)
    return Captured(value, layout)


class LayerCapture:
    """Context manager that records the first output of each named layer per forward.

    Example::

        with LayerCapture(model, ["features.conv1", "fc"]) as cap:
            model(x)
        cap.outputs["fc"]  # tensor (B, K)
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = list(names)
        self.outputs: dict[str, Tensor] = {}
        self.input_hw: dict[str, tuple[int, int] | None] = {}
        self.order: list[str] = []
        self.repeated: set[str] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        modules = dict(self.model.named_modules())
        for name in self.names:
            if name not in modules:
                raise MeasureError(f"{type(self.model).__name__} has no layer named {name!r}")
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self.outputs:
                self.repeated.add(name)
                return
            t = first_tensor(output)
            if t is None:
                raise MeasureError(
                    f"layer {name!r} ({type(module).__name__}) returned no tensor "
                    f"({type(output).__name__}); leave it out with --layers"
                )
            # a copy: the output may be a buffer that a later in-place op (a
            # ``ReLU(inplace=True)``, a residual ``+=``) overwrites in the same forward
            self.outputs[name] = t.detach().clone()
            self.order.append(name)
            first = first_tensor(inputs)
            self.input_hw[name] = (
                (first.shape[-2], first.shape[-1]) if first is not None and first.dim() >= 4
                else None)

        return hook

    def clear(self) -> None:
        self.outputs = {}
        self.input_hw = {}
        self.order = []

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, x: Tensor, strict: bool = True) -> dict[str, Tensor]:
        """Run the model on ``x`` and return the captured outputs (no gradients).
        With ``strict``, a layer that was never called is an error."""
        self.clear()
        with torch.no_grad():
            self.model(x)
        missing = [n for n in self.names if n not in self.outputs]
        if missing and strict:
            raise MeasureError(
                f"layer(s) {missing[:5]} were never called in the forward pass; leave them out"
            )
        return self.outputs


@dataclass
class Trace:
    """What one forward pass with every leaf hooked tells about a model's outputs.

    ``strides``: stride of every spatial leaf output; ``token_counts``: the ``N`` of
    every token output ``(B, N, C)``; ``spatial``: the leaves whose input is a spatial
    descendant of the image (its size is the image's or that of an output of such a
    leaf, seen earlier in the forward pass).
    """

    strides: dict[str, tuple[float, float]]
    token_counts: set[int]
    spatial: set[str]


def trace_layers(model: nn.Module, x: Tensor) -> Trace:
    """Trace every leaf module on ``x[:1]`` (so that layers between the measured ones
    are seen too): strides (:func:`~equivision.transforms.layout.infer_strides`) and
    token counts."""
    names = select_layers(model, "all", include_pass_through=True)
    with LayerCapture(model, names) as tracer:
        outs = tracer.run(x[:1], strict=False)
        in_hw = dict(tracer.input_hw)
        order = list(tracer.order)
    out_hw = {n: (t.shape[-2], t.shape[-1]) if t.dim() >= 4 else None for n, t in outs.items()}
    modules = dict(model.named_modules())
    strides = infer_strides(order, modules, in_hw, out_hw, (x.shape[-2], x.shape[-1]))
    reached, spatial = {(x.shape[-2], x.shape[-1])}, set()
    for name in order:
        hi, ho = in_hw.get(name), out_hw.get(name)
        if hi is not None and tuple(hi) in reached:
            spatial.add(name)
            if ho is not None:
                reached.add(tuple(ho))
    return Trace(strides, {int(t.shape[1]) for t in outs.values() if t.dim() == 3}, spatial)


def is_global_pool(module: nn.Module, value: Captured) -> bool:
    """Whether a captured layer is the network's global pooling."""
    if isinstance(module, GLOBAL_POOLS):
        v = value.value
        return v.dim() == 2 or (v.dim() >= 4 and v.shape[-1] == 1 and v.shape[-2] == 1)
    return False
