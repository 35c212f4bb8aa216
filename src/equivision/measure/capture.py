"""Capture the outputs of chosen layers of any ``nn.Module`` with forward hooks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..transforms import Layout

#: Leaf modules skipped by default: in evaluation mode their output is their input.
PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.Identity, nn.Flatten)
#: Modules treated as global pooling when their output is 1 x 1 (or a vector).
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d)

TokenGrid = tuple[int, int] | tuple[int, int, int]


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


def to_measurable(
    name: str,
    out: Tensor,
    input_hw: tuple[int, int],
    token_grid: TokenGrid | None,
    strides: Mapping[str, float] | None = None,
) -> Captured:
    """Interpret a raw layer output ``out`` and give it a :class:`Layout`.

    Token sequences ``(B, N, C)`` keep only their patch tokens, reshaped to a
    ``(B, C, h, w)`` map; prefix tokens ([CLS]) are dropped.
    """
    if not out.is_floating_point():
        raise MeasureError(
            f"layer {name!r} returns a {out.dtype} tensor; only floating-point outputs can be "
            "measured, leave this layer out with --layers"
        )
    if out.dim() == 2:
        return Captured(out, Layout("vector"))
    if out.dim() == 3:
        if token_grid is None:
            raise MeasureError(
                f"layer {name!r} returns tokens of shape {tuple(out.shape)}; give its grid "
                "with token_grid=(h, w) or (h, w, prefix) (CLI: --token-grid h,w[,prefix])"
            )
        h, w = token_grid[0], token_grid[1]
        prefix = token_grid[2] if len(token_grid) == 3 else 0
        b, n, c = out.shape
        if n - prefix != h * w:
            raise MeasureError(
                f"layer {name!r} has {n} tokens, which is not {prefix} prefix + {h}x{w} grid "
                "tokens; fix token_grid"
            )
        value = out[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
        return Captured(value, Layout("map", _stride(name, input_hw, (h, w), strides)))
    if out.dim() == 4:
        hw = (out.shape[-2], out.shape[-1])
        return Captured(out, Layout("map", _stride(name, input_hw, hw, strides)))
    if out.dim() == 5:
        g = out.shape[2]
        group = {4: "p4", 8: "p4m"}.get(g)
        if group is None:
            raise MeasureError(
                f"layer {name!r} returns a 5-D tensor with a group axis of size {g}; only p4 (4) "
                "and p4m (8) group maps are understood"
            )
        hw = (out.shape[-2], out.shape[-1])
        return Captured(out, Layout("group", _stride(name, input_hw, hw, strides), group=group))
    raise MeasureError(
        f"layer {name!r} returns a {out.dim()}-D tensor {tuple(out.shape)}; expected (B, C), "
        "(B, N, C), (B, C, H, W) or (B, C, G, H, W)"
    )


def _stride(
    name: str, input_hw: tuple[int, int], hw: tuple[int, int], strides: Mapping[str, float] | None
) -> tuple[float, float]:
    """Input pixels per map position: a given or inferred stride (see
    :func:`infer_strides`), else the rounded size ratio."""
    if strides and name in strides:
        s = strides[name]
        return (float(s), float(s)) if isinstance(s, (int, float)) else (float(s[0]), float(s[1]))
    return tuple(float(max(1, round(i / m))) if m else math.inf for i, m in zip(input_hw, hw))


def _local_stride(
    module: nn.Module, hw_in: tuple[int, int], hw_out: tuple[int, int]
) -> list[float]:
    """Stride of one layer: its ``stride`` attribute for convolutions and pooling,
    otherwise 1 for small shrinks (valid convolutions), the rounded ratio for large
    ones and the exact ratio for upsampling."""
    own = getattr(module, "stride", None)
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                           nn.modules.pooling._AvgPoolNd)) and own is not None:
        pair = own if isinstance(own, (tuple, list)) else (own, own)
        return [float(pair[0]), float(pair[-1])]
    out = []
    for i, o in zip(hw_in, hw_out):
        r = i / o if o else math.inf
        out.append(1.0 if 1.0 <= r < 1.5 else float(round(r)) if r >= 1.5 else r)
    return out


def infer_strides(
    order: Sequence[str],
    modules: Mapping[str, nn.Module],
    in_hw: Mapping[str, tuple[int, int] | None],
    out_hw: Mapping[str, tuple[int, int] | None],
    image_hw: tuple[int, int],
) -> dict[str, tuple[float, float]]:
    """Cumulative stride of each spatial layer output relative to the input image.

    Layers are visited in forward order; a layer's input stride is looked up by the
    input's spatial size among the sizes seen so far (the image has stride 1), and
    multiplied by the layer's own stride (:func:`_local_stride`). This gives 2, not
    3, for a valid 3x3 conv that maps 12 -> 10 after a 2x2 pool, and 2 for the
    1x1 stride-2 shortcut of a ResNet.
    """
    by_size: dict[tuple[int, int], tuple[float, float]] = {tuple(image_hw): (1.0, 1.0)}
    out: dict[str, tuple[float, float]] = {}
    for name in order:
        hi, ho = in_hw.get(name), out_hw.get(name)
        if ho is None:
            continue
        if hi is None or tuple(hi) not in by_size:
            s = tuple(float(max(1, round(i / o))) if o else math.inf
                      for i, o in zip(image_hw, ho))
        else:
            base = by_size[tuple(hi)]
            local = _local_stride(modules[name], hi, ho)
            s = (base[0] * local[0], base[1] * local[1])
        out[name] = s  # type: ignore[assignment]
        by_size.setdefault(tuple(ho), s)  # type: ignore[arg-type]
    return out


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
            self.outputs[name] = t.detach()
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


def trace_strides(model: nn.Module, x: Tensor) -> dict[str, tuple[float, float]]:
    """Stride of every leaf module's output, from one forward pass on ``x[:1]`` with
    every leaf hooked (so that layers between the measured ones are seen too)."""
    names = select_layers(model, "all", include_pass_through=True)
    with LayerCapture(model, names) as tracer:
        outs = tracer.run(x[:1], strict=False)
        in_hw = dict(tracer.input_hw)
        order = list(tracer.order)
    out_hw = {n: (t.shape[-2], t.shape[-1]) if t.dim() >= 4 else None for n, t in outs.items()}
    modules = dict(model.named_modules())
    return infer_strides(order, modules, in_hw, out_hw, (x.shape[-2], x.shape[-1]))


def is_global_pool(module: nn.Module, value: Captured) -> bool:
    """Whether a captured layer is the network's global pooling."""
    if isinstance(module, GLOBAL_POOLS):
        v = value.value
        return v.dim() == 2 or (v.dim() >= 4 and v.shape[-1] == 1 and v.shape[-2] == 1)
    return False
