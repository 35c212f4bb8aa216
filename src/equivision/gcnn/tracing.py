"""The exactness analyzer's tracer: one forward pass with hooks on every module and a
:class:`~torch.overrides.TorchFunctionMode` watching the tensor functions called between
them (and inside leaf modules whose type it does not know), each turned into a row by
:mod:`equivision.gcnn.rules`; the weights are judged by :mod:`equivision.gcnn.weights`.
Maps permuted to channels-last ``(B, H, W, C)`` are followed by their axis order
(:mod:`equivision.gcnn.layouts`): layers acting on their last axis read them pixel by pixel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..utils import evaluating
from . import layouts
from .layouts import CHANNELS_FIRST, CHANNELS_LAST, Order
from .rules import (
    PAD_MODULES,
    POINTWISE_MODULES,
    RESAMPLING_MODULES,
    Rules,
    Unverifiable,
    first_tensor,
    is_adaptive,
    is_conv_like,
    is_transposed,
    is_trusted_leaf,
    iter_tensors,
    map_size,
    padding_pair,
    rotations,
    spatial_pair,
)
from .verdict import ExactnessReport, LayerExactness, Pair
from .weights import WeightJudge, is_lowpass


class TraceError(RuntimeError, ValueError):
    """The model could not run on the trace input; the message names the failing layer."""


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


_RESHAPES = {"view", "reshape", "flatten", "view_as", "reshape_as"}
_FLAT = ("reads a map whose channels hold a flattened group axis (B, C·G, H, W): plain "
         "weights there must be tied across the group, which is not checked; cannot verify")


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


def _reduced_axes(args: tuple, kwargs: Mapping[str, Any], ndim: int) -> set[int] | None:
    """The axes a reduction (``x.mean(dims)``, ``x.sum()``) reduces, or ``None``."""
    dims = _bind(("dim",), args, kwargs).get("dim", kwargs.get("axis"))
    if dims is None and len(args) == 1:
        dims = tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    if isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims):
        return {d % ndim for d in dims}
    return None


class Tracer(TorchFunctionMode):
    """Forward hooks on every module plus a watch on tensor functions called between them."""

    def __init__(self, model: nn.Module, group: str, judge: WeightJudge | None = None) -> None:
        super().__init__()
        self.model = model
        self.judge = judge or WeightJudge(model, group)
        self.rules = Rules(group)
        self.rows: list[LayerExactness] = []
        self.depth = 0          # > 0 inside a module analysed as one layer
        self.paused = False     # True while our own hook code runs
        self.owners: list[str] = []
        self.inputs: list[Tensor | None] = []
        self.active: dict[int, Tensor] = {}   # tensors computed from the input
        self.calls: dict[str, int] = {}
        self.handles: list[Any] = []
        self.pads: dict[int, LayerExactness] = {}   # asymmetric padding, by output tensor
        self.flat: set[int] = set()   # 4-D maps whose channels hide a group axis (C·G)
        self.orders: dict[int, Order] = {}   # 4-D maps not stored (B, C, H, W): their order

    # -- hooks --
    def attach(self) -> None:
        for name, module in self.model.named_modules():
            unit = is_conv_like(module) or (not any(True for _ in module.children())
                                             and is_trusted_leaf(module))
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
                    self.inputs.append(first_tensor((args, kwargs)))
            finally:
                self.paused = False

        return hook

    def _post(self, name: str, module: nn.Module, unit: bool):
        def hook(module_: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.paused = True
            try:
                self.owners.pop()
                for t in iter_tensors(output):
                    self.mark(t)
                x_in = self.inputs[-1] if unit and self.inputs else None
                self._propagate_flat([x_in] if x_in is not None else [], output)
                if unit:
                    self.depth -= 1
                    x = self.inputs.pop()
                    if x is not None and map_size(x) is not None:
                        count = self.calls[name] = self.calls.get(name, 0) + 1
                        label = name if count == 1 else f"{name} (call {count})"
                        order = self.orders.get(id(x))
                        row = (self._module_row(label, module, x, output) if order is None
                               else self._reordered_module_row(label, module, x, order, output))
                        if row.kernel_size is not None and row.exact is not None:
                            row.weights, row.weights_reason = self.judge.module(
                                name, module, x, row.kernel_size, row.stride, row.padding,
                                row.dilation)
                            weight = getattr(self.judge.modules.get(name, module), "weight",
                                             None)
                            if isinstance(weight, Tensor):
                                row.lowpass = is_lowpass(weight)
                        if id(x) in self.flat and any(True for _ in module.parameters()):
                            row.weights, row.weights_reason = None, _FLAT
                        self.rows.append(self.rules.finish(row))
                        self._remember_pad(row, first_tensor(output))
            finally:
                self.paused = False

        return hook

    # -- modules --
    def _module_row(self, name: str, module: nn.Module, x: Tensor,
                    output: Any) -> LayerExactness:
        type_ = type(module).__name__
        in_hw = map_size(x)
        assert in_hw is not None
        y = first_tensor(output)
        out_hw = map_size(y)
        ndim = x.dim()
        rules = self.rules
        if (y is not None and ndim == 5 and y.dim() == 5
                and y.shape[2] not in (x.shape[2], 1) and not is_conv_like(module)):
            return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                                  reason=f"changes the group axis from {x.shape[2]} to "
                                         f"{y.shape[2]}; cannot verify")
        if is_transposed(module):
            return rules.transposed(name, type_, in_hw, out_hw, module.kernel_size,
                                    module.stride, module.padding, module.dilation, ndim)
        if isinstance(module, nn.Upsample):
            return rules.upsample(name, type_, in_hw, out_hw, module.scale_factor,
                                  module.recompute_scale_factor, module.mode, ndim)
        if is_adaptive(module):
            return rules.adaptive(name, type_, in_hw, y, getattr(module, "output_size", None),
                                  ndim)
        if isinstance(module, RESAMPLING_MODULES):
            return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                                  reason="resampling layer; cannot verify")
        if is_conv_like(module):
            kind = "pool" if "pool" in type_.lower() else "conv"
            if y is not None and ndim == 5 and y.dim() == 5 and y.shape[2] != x.shape[2]:
                return LayerExactness(name, type_, kind, in_hw, out_hw, exact=None,
                                      reason=f"changes the group axis from {x.shape[2]} to "
                                             f"{y.shape[2]}; cannot verify")
            try:
                kernel = spatial_pair(module.kernel_size, "kernel_size", ndim, 1)
                raw_stride = module.stride
                stride = kernel if raw_stride is None or raw_stride == () else spatial_pair(
                    raw_stride, "stride", ndim, 1)
                dilation = spatial_pair(getattr(module, "dilation", 1), "dilation", ndim, 1)
                before, after = padding_pair(getattr(module, "padding", 0), kernel, dilation, ndim)
            except Unverifiable as err:
                return LayerExactness(name, type_, kind, in_hw, out_hw, exact=None,
                                      reason=f"{err}; cannot verify")
            return self._strided(x, name, type_, kind, in_hw, out_hw, kernel, stride, before,
                                 after, dilation, bool(getattr(module, "ceil_mode", False)),
                                 str(getattr(module, "padding_mode", "zeros")),
                                 out_is_map=out_hw is not None)
        if isinstance(module, PAD_MODULES):
            return rules.pad(name, type_, in_hw, out_hw, module.padding, ndim)
        if out_hw is None:
            return rules.reshape(name, type_, x, y)
        if out_hw == in_hw:
            return LayerExactness(name, type_, "pointwise", in_hw, out_hw,
                                  reason="spatial size unchanged")
        return LayerExactness(name, type_, "unknown", in_hw, out_hw, exact=None,
                              reason=f"unknown layer changes the size from {in_hw[0]}x"
                                     f"{in_hw[1]} to {out_hw[0]}x{out_hw[1]}; cannot verify")

    def _reordered_module_row(self, name: str, module: nn.Module, x: Tensor, order: Order,
                              output: Any) -> LayerExactness:
        """A leaf module reading a 4-D map stored in another order than ``(B, C, H, W)``:
        pixel by pixel (and its output channels-last) for an activation or dropout on a
        channels-last map, else "cannot verify"."""
        type_ = type(module).__name__
        in_hw = layouts.map_size(x, order)
        y = first_tensor(output)
        if (order == CHANNELS_LAST and y is not None and y.shape == x.shape
                and layouts.per_pixel_on_channels_last(module, POINTWISE_MODULES)):
            self._set_order(output, order)
            return LayerExactness(name, type_, "pointwise", in_hw, in_hw,
                                  reason="pixel by pixel on a channels-last map (B, H, W, C)")
        return LayerExactness(name, type_, "unknown", in_hw, None, exact=None,
                              reason=f"{type_} reads a map stored {layouts.describe(order)} as "
                                     "if it were (B, C, H, W); cannot verify")

    def _set_order(self, out: Any, order: Order) -> None:
        """Record the order of every 4-D tensor in ``out`` (channels-first: nothing kept)."""
        for t in iter_tensors(out):
            if t.dim() == 4 and t.is_floating_point():
                if order == CHANNELS_FIRST:
                    self.orders.pop(id(t), None)
                else:
                    self.orders[id(t)] = order

    # -- group axes flattened into channels --
    def _propagate_flat(self, inputs: list[Tensor], out: Any, fname: str = "") -> None:
        """Mark 4-D outputs that carry a group axis in their channels: a reshape of a
        ``(B, C, G, H, W)`` map to ``(B, C·G, H, W)``, and anything computed from one."""
        for y in iter_tensors(out):
            if y.dim() != 4:
                continue
            for x in inputs:
                reshaped = (fname in _RESHAPES and x.dim() == 5
                            and y.shape[1] == x.shape[1] * x.shape[2])
                if reshaped or id(x) in self.flat:
                    self.flat.add(id(y))
                    break

    # -- padding judged with the layer that reads it --
    def _remember_pad(self, row: LayerExactness, out: Tensor | None) -> None:
        """Keep an asymmetric padding row until the strided layer that reads its output."""
        if row.kind == "padding" and row.exact is False and out is not None:
            self.pads[id(out)] = row

    def _strided(self, x: Tensor, name: str, type_: str, kind: str, in_hw: Pair,
                 out_hw: Pair | None, kernel: Pair, stride: Pair, before: Pair, after: Pair,
                 dilation: Pair, ceil_mode: bool = False, padding_mode: str = "zeros",
                 out_is_map: bool = True) -> LayerExactness:
        """:meth:`Rules.strided`, with an asymmetric padding right before it folded in: the
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
            inputs = [t for t in iter_tensors((args, kwargs)) if id(t) in self.active]
            if inputs:
                for t in iter_tensors(out):
                    self.mark(t)
                self._propagate_flat(inputs, out, _name(func))
                if self.depth == 0:
                    x = next((t for t in inputs if t.dim() in (4, 5)), None)
                    y = args[0] if _name(func) == "__setitem__" else first_tensor(out)
                    if x is not None and isinstance(y, Tensor) and y.is_floating_point():
                        self.paused = True
                        try:
                            done, row = self._layout_row(func, args, kwargs, inputs, x, out)
                            if not done:
                                row = self._function_row(func, args, kwargs, x, y)
                        finally:
                            self.paused = False
                        if row is not None:
                            self.rows.append(self.rules.finish(row))
                            self._remember_pad(row, y)
        return out

    def _layout_row(self, func: Any, args: tuple, kwargs: dict, inputs: list[Tensor],
                    x: Tensor, out: Any) -> tuple[bool, LayerExactness | None]:
        """Permutes of 4-D maps and functions reading a map not stored ``(B, C, H, W)``:
        ``(True, row or None)``, or ``(False, None)`` for :meth:`_function_row`'s rules."""
        fname = _name(func)
        base = fname if fname.startswith("__") else fname.rstrip("_")
        name = f"{self.owners[-1] if self.owners else 'model'}:{fname}()"
        maps = [t for t in inputs if t.dim() == 4]
        orders = [self.orders.get(id(t), CHANNELS_FIRST) for t in maps]
        if x.dim() != 4 or (base not in layouts.PERMUTES and orders.count(CHANNELS_FIRST)
                            == len(orders)):
            return False, None
        order = self.orders.get(id(x), CHANNELS_FIRST)
        in_hw = layouts.map_size(x, order)
        if base in layouts.PERMUTES and args and args[0] is x:
            new = layouts.permuted(func, args, kwargs, order)
            if new is None:
                return True, LayerExactness(name, "function", "unknown", in_hw, None, exact=None,
                                            reason=f"{fname}() of a map, not understood; "
                                                   "cannot verify")
            self._set_order(out, new)
            if new == order or new not in (CHANNELS_FIRST, CHANNELS_LAST):
                return True, None  # judged where the tensor is read
            return True, LayerExactness(
                name, "function", "pointwise", in_hw, in_hw,
                reason=f"layout change {layouts.describe(order)} -> {layouts.describe(new)}: "
                       "no pixel moves")
        odd = next((o for o in orders if o not in (CHANNELS_FIRST, CHANNELS_LAST)), None)
        if odd is not None:
            if base in layouts.MEMORY and len(maps) == 1 and args and args[0] is x:
                self._set_order(out, odd)
                return True, None
            return True, LayerExactness(
                name, "function", "unknown", in_hw, None, exact=None,
                reason=f"{fname}() reads a map whose axes are permuted to "
                       f"{layouts.describe(odd)} (only (B, C, H, W) and channels-last (B, H, W, "
                       "C) maps are read); cannot verify")
        # a per-sample scalar (B, 1, 1, 1) broadcasts alike in both layouts; a pooled
        # (B, C, 1, 1) against a channels-last map scales its rows instead of its channels
        if len({o for o, t in zip(orders, maps) if t.shape[1:].numel() > 1}) > 1:
            return True, LayerExactness(
                name, "function", "unknown", in_hw, None, exact=None,
                reason=f"{fname}() mixes channels-first (B, C, H, W) and channels-last "
                       "(B, H, W, C) maps; cannot verify")
        last = next((t for t, o in zip(maps, orders) if o == CHANNELS_LAST), None)
        if last is None:  # a permute-like call that does not permute its map
            return False, None
        return True, self._channels_last_row(func, fname, base, name, args, kwargs, last, out)

    def _channels_last_row(self, func: Any, fname: str, base: str, name: str, args: tuple,
                           kwargs: dict, x: Tensor, out: Any) -> LayerExactness | None:
        """A function reading a channels-last map ``x`` ``(B, H, W, C)``: ``None`` or an exact
        row when it acts pixel by pixel (its 4-D outputs then channels-last), else a row
        saying why it cannot be verified (or, for a positional tensor mixed in, not exact)."""
        in_hw = layouts.map_size(x, CHANNELS_LAST)
        y = args[0] if base == "__setitem__" else first_tensor(out)
        out_hw = layouts.map_size(y, CHANNELS_LAST) if y is not None and y.dim() == 4 else None
        first_is_x = bool(args) and args[0] is x
        row: LayerExactness | None = None
        ok = False
        if base in layouts.LAST_AXIS_FUNCS:
            ok = layouts.acts_on_last_axis(base, args, kwargs, x, self.active)
            row = LayerExactness(name, "function", "pointwise", in_hw, out_hw,
                                 reason=f"{fname}() on the channel axis of a channels-last "
                                        "map (B, H, W, C): pixel by pixel")
        elif base in _REDUCTIONS and first_is_x:
            reduced = _reduced_axes(args, kwargs, 4)
            if reduced is not None and reduced & {1, 2} == {1, 2}:
                self._set_order(out, CHANNELS_LAST)
                return LayerExactness(name, "function", "global pool", in_hw, None,
                                      reason=f"global {fname} over H and W")
            ok = reduced is not None and not reduced & {1, 2}
        elif base in ("softmax", "log_softmax", "softmin"):
            dim = _bind(("dim",), args, kwargs).get("dim")
            ok = isinstance(dim, int) and dim % 4 in (0, 3)
        elif base in ("__getitem__", "__setitem__") and first_is_x and len(args) > 1:
            index = layouts.reordered_index(args[1], CHANNELS_LAST)
            ok = index is not None and all(isinstance(p, slice) and p == slice(None)
                                           for p in index[2:])
            if not ok and index is not None and base == "__getitem__" and y is not None:
                row = self._slice_row(name, in_hw, out_hw, 4, index, y.movedim(-1, 1))
                ok = row is not None
        else:
            ok = base in _POINTWISE_FUNCS and base not in layouts.CHANNELS_FIRST_ONLY
        if ok and out_hw is not None and (out_hw == in_hw or row is not None):
            self._set_order(out, CHANNELS_LAST)
            if base in layouts.LAST_AXIS_FUNCS:  # its other tensors act on the channels
                return row
            return self._mixed_in(name, fname, list(iter_tensors((args, kwargs))), in_hw,
                                  channels_last=True) or row
        if ok and out_hw is None and y is not None and y.dim() < 4:
            return self.rules.reshape(name, "function", x.movedim(-1, 1), y)
        return LayerExactness(name, "function", "unknown", in_hw, out_hw, exact=None,
                              reason=f"{fname}() on a channels-last map (B, H, W, C) is not known "
                                     "to act pixel by pixel; cannot verify")

    def _function_row(self, func: Any, args: tuple, kwargs: dict, x: Tensor,
                      y: Tensor) -> LayerExactness | None:
        fname = _name(func)
        owner = self.owners[-1] if self.owners else "model"
        name = f"{owner}:{fname}()"
        in_hw = map_size(x)
        assert in_hw is not None
        out_hw = map_size(y)
        ndim = x.dim()
        rules = self.rules
        first_is_x = bool(args) and args[0] is x
        try:
            if fname in _CONV_FUNCS and first_is_x:
                p = _bind(("weight", "bias", "stride", "padding", "dilation"), args, kwargs)
                weight = p["weight"]
                if weight.dim() == 5 and weight.shape[2] != 1:
                    raise Unverifiable(f"a {tuple(weight.shape[2:])} kernel mixes the group axis")
                kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
                stride = spatial_pair(p.get("stride", 1), "stride", ndim, 1)
                dilation = spatial_pair(p.get("dilation", 1), "dilation", ndim, 1)
                before, after = padding_pair(p.get("padding", 0), kernel, dilation, ndim)
                row = self._strided(x, name, "function", "conv", in_hw, out_hw, kernel, stride,
                                    before, after, dilation, out_is_map=out_hw is not None)
                row.weights, row.weights_reason = (None, _FLAT) if id(x) in self.flat else (
                    self.judge.kernel(weight))
                row.lowpass = is_lowpass(self.judge.value(weight))
                return row
            if fname in _POOL_ARGS and first_is_x:
                p = _bind(_POOL_ARGS[fname], args, kwargs)
                kernel = spatial_pair(p["kernel_size"], "kernel_size", ndim, 1)
                raw = p.get("stride")
                stride = kernel if raw is None or raw == () or raw == [] else spatial_pair(
                    raw, "stride", ndim, 1)
                dilation = spatial_pair(p.get("dilation", 1), "dilation", ndim, 1)
                before, after = padding_pair(p.get("padding", 0), kernel, dilation, ndim)
                return self._strided(x, name, "function", "pool", in_hw, out_hw, kernel, stride,
                                     before, after, dilation, bool(p.get("ceil_mode", False)),
                                     out_is_map=out_hw is not None)
        except Unverifiable as err:
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
            reduced = _reduced_axes(args, kwargs, ndim)
            if reduced is not None:
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
        elif base in ("layer_norm", "rms_norm"):  # over W alone unless over H and W too
            shape = _bind(("normalized_shape",), args, kwargs).get("normalized_shape")
            moves = not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 2
        elif base in _POINTWISE_FUNCS:
            moves = False
        if moves is not False:
            return LayerExactness(name, "function", "unknown", in_hw, in_hw, exact=None,
                                  reason=f"{fname}() keeps the {in_hw[0]}x{in_hw[1]} size but "
                                         "is not known to act pixel by pixel (it may move "
                                         "pixels); cannot verify")
        tensors = list(iter_tensors((args, kwargs)))
        if any(id(t) in self.flat for t in tensors) and any(
                id(t) not in self.active and t.numel() > 1 for t in tensors):
            return LayerExactness(name, "function", "unknown", in_hw, in_hw, exact=True,
                                  reason=f"{fname}() with parameters", weights=None,
                                  weights_reason=_FLAT)
        return self._mixed_in(name, fname, tensors, in_hw)

    def _mixed_in(self, name: str, fname: str, tensors: list[Tensor], in_hw: Pair,
                  channels_last: bool = False) -> LayerExactness | None:
        """A "positional" row for the first tensor not computed from the input that a
        pixel-by-pixel function mixes into a map and that is not invariant (on a
        channels-last map its axes ``-3, -2`` meet H and W), else ``None``."""
        for t in tensors:
            if id(t) in self.active:
                continue
            shown = t
            if channels_last:
                t = layouts.as_channels_first(self.judge.value(t))  # type: ignore[assignment]
                if t is None:
                    continue
            if t.dim() < 2 or tuple(t.shape[-2:]) == (1, 1):
                continue
            ok, why = self.judge.invariant(t)
            if ok is not True:
                return LayerExactness(
                    name, "function", "positional", in_hw, in_hw, exact=ok,
                    reason=f"{fname}() mixes in a position-dependent tensor of shape "
                           f"{tuple(shown.shape)} ({why})" + ("" if ok is False else
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
        if rotations(self.rules.group) and (steps[0] != steps[1] or (
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
def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
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
        if isinstance(weight, Tensor) and weight.dim() >= 4 and is_conv_like(module):
            c = getattr(module, "in_channels", None)
            if isinstance(c, int) and not isinstance(c, bool):
                return c
            return int(weight.shape[1]) * int(getattr(module, "groups", 1))
    raise ValueError(f"cannot infer the input channels of {type(model).__name__}: it has no "
                     "convolution with a weight; pass in_channels=")


def _failure(model: nn.Module, hw: Pair, in_channels: int, tracer: Tracer,
             err: Exception) -> str:
    """The one-line :class:`TraceError` message for ``model`` failing on the trace input:
    the innermost layer running when it failed, the error's first line, what to do."""
    layer = tracer.owners[-1] if tracer.owners else "model"
    first = (str(err).strip().splitlines() or [""])[0][:200]
    if layer == "model" and isinstance(err, TypeError):
        advice = ("its forward must take one image batch (B, C, H, W); wrap the model in a "
                  "module whose forward does")
    else:
        advice = ("try another input size (exact_sizes lists the sizes that run) or pass "
                  "in_channels")
    return (f"cannot trace {type(model).__name__} at input {hw[0]}x{hw[1]} with in_channels="
            f"{in_channels}: layer '{layer}' failed ({type(err).__name__}: {first}); {advice}")


def trace(model: nn.Module, hw: Pair, in_channels: int, group: str,
           device: torch.device | None = None, dtype: torch.dtype | None = None,
           judge: WeightJudge | None = None) -> ExactnessReport:
    dev, dt = device_dtype(model)
    device, dtype = device or dev, dtype or dt
    tracer = Tracer(model, group, judge)
    x = torch.zeros(1, in_channels, *hw, device=device, dtype=dtype)
    tracer.mark(x)
    tracer.attach()
    try:
        with torch.no_grad(), evaluating(model), tracer:
            out = model(x)
    except Exception as err:
        raise TraceError(_failure(model, hw, in_channels, tracer, err)) from err
    finally:
        tracer.detach()
    if first_tensor(out) is None:
        raise TraceError(
            f"cannot trace {type(model).__name__} at input {hw[0]}x{hw[1]}: it returned "
            f"{type(out).__name__}, no tensor; the analyzer compares outputs, so wrap the model "
            "in a module whose forward returns a tensor (or a tuple, list or dict holding one)")
    for t in iter_tensors(out):
        order = tracer.orders.get(id(t))
        if order is not None:
            size = layouts.map_size(t, order)
            tracer.rows.append(LayerExactness(
                "model output", "output", "unknown", size, size, exact=None,
                reason=f"the model returns a map stored {layouts.describe(order)}; the verdict "
                       "is about (B, C, H, W) maps: permute it back to compare it; cannot "
                       "verify"))
            break
    report = ExactnessReport(hw, group, tracer.rows)
    if rotations(group) and hw[0] != hw[1]:
        report.notes.append(f"the input {hw[0]}x{hw[1]} is not square: a 90° rotation turns it "
                            f"into {hw[1]}x{hw[0]}; the verdict is about f(R x) = R f(x) with "
                            "both sizes going through the network")
    if not report.layers:
        report.notes.append("no spatial layer was found")
    return report

