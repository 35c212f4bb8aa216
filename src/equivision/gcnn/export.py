"""Export of p4 / p4m layers and networks to plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` for
inference.

A group feature map ``(B, C, G, H, W)`` becomes the plain map ``(B, C * G, H, W)``
(``x.flatten(1, 2)``: channel ``c * G + g``). On that layout

* :class:`~equivision.gcnn.GroupConv2d` is an ``nn.Conv2d`` with ``C_out * G`` output
  channels whose weight is the expanded filter bank (same stride, padding, dilation,
  ``groups``, ``padding_mode``; the bias repeated ``G`` times);
* :class:`~equivision.gcnn.GroupBatchNorm2d` (running statistics) is an
  ``nn.BatchNorm2d`` over ``C * G`` channels with every statistic and affine parameter
  repeated ``G`` times;
* :class:`~equivision.gcnn.GroupMaxPool2d` / :class:`~equivision.gcnn.GroupAvgPool2d` are
  ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with the same arguments;
* coset pooling over the group axis (:class:`~equivision.gcnn.GroupPool`,
  :class:`~equivision.gcnn.GroupGlobalPool`) is :class:`CosetPool` /
  :class:`CosetGlobalPool`, the same reduction over each run of ``G`` channels.

:func:`export` converts one of these layers or walks a whole network and replaces each of
them (the network's own ``forward`` code must treat group maps as opaque tensors, as the
models in :mod:`equivision.models.gcnn` do); the result is a copy in eval mode, plain
``torch.nn`` modules that ``torch.jit.trace`` accepts, with outputs equal to the original's
(float rounding only). Given an ``example`` input, :func:`export` also runs both networks
and names the first layer whose output differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .layers import GroupConv2d
from .norm_pool import (
    GroupAvgPool2d,
    GroupBatchNorm2d,
    GroupGlobalPool,
    GroupMaxPool2d,
    GroupPool,
    _check_mode,
    copy_repeated,
)

__all__ = ["CosetGlobalPool", "CosetPool", "ExportError", "export", "export_batch_norm",
           "export_conv", "export_pool"]

PoolMode = Literal["max", "mean"]

#: layers that act on each entry alone (or not at all in eval mode): exported as they are
POINTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
             nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
             nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
#: plain layers that would read the group axis of a group map as a third spatial axis
VOLUMETRIC = (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.MaxPool3d,
              nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.LPPool3d)


class ExportError(ValueError):
    """A layer :func:`export` cannot turn into plain layers; the message names it."""


def _coset(x: Tensor, group_size: int, mode: PoolMode) -> Tensor:
    """``(B, C * G, H, W)`` -> ``(B, C, H, W)``: max or mean over each run of ``G`` channels."""
    x = x.unflatten(1, (-1, group_size))
    return x.amax(2) if mode == "max" else x.mean(2)


class CosetPool(nn.Module):
    """:class:`~equivision.gcnn.GroupPool` on flattened maps.

    Shapes: ``(B, C * G, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, group_size: int, mode: PoolMode = "max") -> None:
        super().__init__()
        self.group_size, self.mode = group_size, _check_mode(mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C * G, H, W)`` -> ``(B, C, H, W)``."""
        return _coset(x, self.group_size, self.mode)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, mode={self.mode!r}"


class CosetGlobalPool(nn.AdaptiveAvgPool2d):
    """:class:`~equivision.gcnn.GroupGlobalPool` on flattened maps: coset pooling, then the
    spatial average (an ``nn.AdaptiveAvgPool2d``, as the original).

    Shapes: ``(B, C * G, H, W)`` -> ``(B, C)``.
    """

    def __init__(self, group_size: int, mode: PoolMode = "max") -> None:
        super().__init__(1)
        self.group_size, self.mode = group_size, _check_mode(mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C * G, H, W)`` -> ``(B, C)``."""
        return super().forward(_coset(x, self.group_size, self.mode)).flatten(1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, mode={self.mode!r}"


@torch.no_grad()
def export_conv(layer: GroupConv2d) -> nn.Conv2d:
    """The ``nn.Conv2d`` equal to ``layer`` on flattened maps.

    ``conv(x.flatten(1, 2)) == layer(x).flatten(1, 2)`` (``conv(x)`` for a lifting layer on
    images ``x``); weight ``(C_out * G, C_in / groups * G_in, k, k)`` (the filter bank, a
    copy), bias ``(C_out * G,)``.
    """
    w = layer.weight
    conv = nn.Conv2d(layer.in_channels * layer.in_group_size,
                     layer.out_channels * layer.group_size, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None,
                     padding_mode=layer.padding_mode, device=w.device, dtype=w.dtype)
    bank, bias = layer._build()
    conv.weight.copy_(bank)
    if bias is not None:
        conv.bias.copy_(bias)
    return conv.eval()


@torch.no_grad()
def export_batch_norm(bn: GroupBatchNorm2d, name: str = "") -> nn.BatchNorm2d:
    """The ``nn.BatchNorm2d`` over ``C * G`` channels equal to ``bn`` in eval mode on
    flattened maps: running mean / variance and affine parameters repeated ``G`` times.

    Raises:
        ExportError: ``bn`` keeps no running statistics (eval mode then normalises with
            batch statistics shared over the group axis, which no plain layer does).
    """
    if not bn.track_running_stats or bn.running_mean is None:
        raise ExportError(
            f"export: {name or 'the layer'} ({type(bn).__name__}) keeps no running statistics "
            "(track_running_stats=False), so it normalises with batch statistics shared over "
            "the group axis, which nn.BatchNorm2d cannot; build it with "
            "track_running_stats=True and train it, or leave it out")
    g = bn.group_size
    ref = bn.running_mean
    out = nn.BatchNorm2d(bn.num_features * g, bn.eps, bn.momentum, bn.affine,
                         device=ref.device, dtype=ref.dtype)
    copy_repeated(bn, out, g)
    return out.eval()


def export_pool(pool: nn.Module, group_size: int, name: str = "") -> nn.Module:
    """The plain pooling layer equal to a group pooling layer on flattened maps;
    ``group_size`` is G of the maps it receives (coset pooling needs it)."""
    if isinstance(pool, GroupMaxPool2d):
        return nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                            ceil_mode=pool.ceil_mode)
    if isinstance(pool, GroupAvgPool2d):
        return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                            pool.count_include_pad, pool.divisor_override)
    if not isinstance(pool, (GroupPool, GroupGlobalPool)):
        raise ExportError(f"export: {name or type(pool).__name__} is not a group pooling layer")
    if group_size < 2:
        raise ExportError(
            f"export: {name or 'the layer'} ({type(pool).__name__}) pools over the group axis "
            "but the group size is unknown (no group convolution or batch norm next to it); "
            "use export_pool(pool, group_size)")
    cls = CosetGlobalPool if isinstance(pool, GroupGlobalPool) else CosetPool
    return cls(group_size, pool.mode)


_Exporter = Callable[[nn.Module, int, str], nn.Module]
#: exported group layers, base class -> (module, G, name) -> plain module
EXPORTERS: dict[type, _Exporter] = {
    GroupConv2d: lambda m, g, name: export_conv(m),  # type: ignore[arg-type]
    GroupBatchNorm2d: lambda m, g, name: export_batch_norm(m, name),  # type: ignore[arg-type]
    GroupMaxPool2d: export_pool,
    GroupAvgPool2d: export_pool,
    GroupPool: export_pool,
    GroupGlobalPool: export_pool,
}


def _exporter(module: nn.Module, name: str) -> _Exporter | None:
    """The exporter of ``module``'s class, ``None`` for other layers; ``ExportError`` for a
    subclass of a group layer that overrides ``forward`` (its meaning is unknown)."""
    for base in type(module).__mro__:
        if base in EXPORTERS:
            if type(module).forward is not base.forward:
                raise ExportError(
                    f"export: {name or 'the layer'} ({type(module).__name__}) subclasses "
                    f"{base.__name__} but overrides forward, so its plain equivalent is "
                    f"unknown; register it in EXPORTERS (from equivision.gcnn.export import "
                    "EXPORTERS) or export its parts")
            return EXPORTERS[base]
    return None


def _group_size(model: nn.Module) -> int:
    """G of the model's group layers (0 if it has none); ``ExportError`` when they mix p4
    and p4m."""
    sizes = {m.group_size for m in model.modules() if isinstance(m, (GroupConv2d,
                                                                        GroupBatchNorm2d))}
    if len(sizes) > 1:
        raise ExportError(f"export: the network mixes group sizes {sorted(sizes)}; coset "
                          "pooling needs one")
    return sizes.pop() if sizes else 0


def _replace(model: nn.Module, group_size: int) -> None:
    """Replace every group layer below ``model`` in place (a layer used at several places
    by one plain layer used at the same places)."""
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        exporter = _exporter(module, name)
        if isinstance(module, VOLUMETRIC) and exporter is None and group_size:
            raise ExportError(
                f"export: {name} ({type(module).__name__}) is a 3-D layer in a group network: "
                "on a group map (B, C, G, H, W) it mixes the group axis like a spatial axis, "
                "which has no plain 2-D equivalent; replace it by a group layer")
        if exporter is None or not name:
            continue
        if id(module) not in done:
            done[id(module)] = exporter(module, group_size, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, done[id(module)])


def export(module: nn.Module, example: Tensor | None = None, *, tol: float = 1e-5) -> nn.Module:
    """Plain-layer copy of a group layer or a p4 / p4m network, for inference.

    Args:
        module: a :class:`GroupConv2d`, :class:`GroupBatchNorm2d`, group pooling layer, or
            any network built from them and from plain layers (left as they are).
        example: optional input; when given, both networks run on it and the exported one
            must match to ``tol`` (relative to the largest output), else the first layer
            whose output differs is named.
        tol: see ``example``.

    Returns:
        A new module in eval mode with its own parameters (a copy; ``module`` is not
        changed). A network keeps its input and output shapes; group maps inside it become
        ``(B, C * G, H, W)``. A single group layer becomes its plain equivalent on flattened
        maps (see :func:`export_conv`).

    Raises:
        ExportError: a layer without a plain equivalent (named), or a mismatch on
            ``example``.
    """
    group_size = _group_size(module)
    exporter = _exporter(module, "")
    if exporter is not None:
        out = exporter(module, group_size, type(module).__name__)
    else:
        out = copy.deepcopy(module)
        _replace(out, group_size)
    out.eval()
    if example is not None:
        _verify(module, out, example, tol, flatten_input=exporter is not None)
    return out


def _outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor], list[str]]:
    """The output of ``model`` (eval mode, no grad) and of every named submodule (group maps
    flattened to ``(B, C * G, H, W)``), in the order they finished, plus the leaf modules
    that received a group map."""
    seen: dict[str, Tensor] = {}
    fed_group_maps: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
            if isinstance(out, Tensor):
                seen[name] = out.flatten(1, 2) if out.dim() == 5 else out
            if (not list(mod.children()) and args and isinstance(args[0], Tensor)
                    and args[0].dim() == 5):
                fed_group_maps.append(name)

        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            y = model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return y, seen, fed_group_maps


def _verify(original: nn.Module, exported: nn.Module, x: Tensor, tol: float,
            flatten_input: bool = False) -> None:
    """``ExportError`` naming an unknown layer fed group maps, or the first layer whose
    exported output differs from the original's by more than ``tol`` (relative);
    ``flatten_input``: the exported module is one layer that takes flattened maps."""
    ref, ref_parts, fed = _outputs(original, x)
    for name in fed:
        m = original.get_submodule(name)
        if _exporter(m, name) is None and not isinstance(m, POINTWISE):
            raise ExportError(
                f"export: {name} ({type(m).__name__}) receives a group feature map "
                "(B, C, G, H, W) and is neither a group layer nor pointwise, so its plain "
                "equivalent on (B, C * G, H, W) is unknown; replace it by a group layer")
    out, parts, _ = _outputs(exported, x.flatten(1, 2) if flatten_input and x.dim() == 5 else x)
    if ref.dim() == 5 and out.dim() == 4:
        ref = ref.flatten(1, 2)
    for name, value in ref_parts.items():
        other = parts.get(name)
        if other is not None and not _close(value, other, tol):
            m = original.get_submodule(name)
            raise ExportError(
                f"export: {name} ({type(m).__name__}) gives different outputs after export "
                f"({_difference(value, other)}); its forward code probably "
                "reshapes group maps, which export cannot see: export its parts instead")
    if not _close(ref, out, tol):
        raise ExportError(f"export: the exported network's output differs "
                          f"({_difference(ref, out)})")


def _difference(a: Tensor, b: Tensor) -> str:
    """How ``b`` differs from ``a``: the shapes, or the largest absolute difference."""
    if a.shape != b.shape:
        return f"shape {tuple(b.shape)} instead of {tuple(a.shape)}"
    return f"max error {float((a - b).abs().max()):.3g}"


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    """Same shape and ``max |a - b| <= tol * max(1, max |a|)``."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
    return float((a - b).abs().max()) <= tol * scale if a.numel() else True
