"""Axis orders of the maps the exactness analyzer's tracer follows: a ``(B, C, H, W)`` map
permuted to channels-last ``(B, H, W, C)`` (ConvNeXt's and Swin's blocks) is the same map
in another layout, not a map whose pixels moved.

An *order* says which axis of the channels-first map each axis of a tensor holds: tensor
axis ``j`` is axis ``order[j]`` of ``(B, C, H, W)``, so :data:`CHANNELS_FIRST` is
``(0, 1, 2, 3)`` and :data:`CHANNELS_LAST` is ``(0, 2, 3, 1)``. A permute (``permute``,
``transpose``, ``movedim``, ...) composes orders; only these two are read as maps, any other
order (H and W swapped, the batch moved, the midpoint of a transpose pair) is kept until a
later permute brings it back, and whatever else reads it cannot be verified.

On a channels-last map the layers that act on the last axis alone (``F.linear``,
``F.layer_norm`` / ``F.rms_norm`` over one axis: the functional side of the measurement's
:data:`equivision.measure.capture.LAST_AXIS` modules) and elementwise functions act pixel
by pixel; normalisations over axis 1 (batch / instance / group norm) do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .norm_pool import GroupBatchNorm2d, GroupGlobalPool, GroupPool

Order = tuple[int, ...]

CHANNELS_FIRST: Order = (0, 1, 2, 3)
CHANNELS_LAST: Order = (0, 2, 3, 1)

#: functions that only reorder the axes of a tensor
PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
#: functions that copy a tensor or change its dtype / device, whatever its axis order
MEMORY = {"contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16",
          "type", "type_as", "requires_grad"}
#: functions that act on the last axis of their first argument (weights from the right)
LAST_AXIS_FUNCS = {"linear", "matmul", "layer_norm", "rms_norm"}
#: elementwise functions whose per-pixel reading holds for channels-first maps only: they
#: normalise over axis 1 and the axes after it
CHANNELS_FIRST_ONLY = {"batch_norm", "instance_norm", "group_norm", "local_response_norm",
                       "layer_norm", "rms_norm", "prelu"}
#: pointwise leaf modules that still treat axis 1 as the channels (a channels-last map's H)
_AXIS_1_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.LocalResponseNorm, nn.Softmax2d, nn.Flatten, nn.Unflatten, nn.PReLU, GroupBatchNorm2d,
    GroupPool, GroupGlobalPool)


def describe(order: Order) -> str:
    """``(0, 2, 3, 1)`` -> ``"(B, H, W, C)"``."""
    return "(" + ", ".join("BCHW"[a] for a in order) + ")"


def spatial_axes(order: Order) -> tuple[int, int]:
    """The tensor axes holding H and W in a tensor of this order."""
    return order.index(2), order.index(3)


def map_size(t: Tensor, order: Order) -> tuple[int, int]:
    """``(H, W)`` of a 4-D map stored in ``order``."""
    h, w = spatial_axes(order)
    return int(t.shape[h]), int(t.shape[w])


def permuted(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
             order: Order) -> Order | None:
    """The order of ``func(x, *args[1:], **kwargs)`` for ``x`` (4-D) in ``order``, read by
    running ``func`` on a shape-only tensor with four different axis lengths; ``None`` when
    that cannot be read."""
    sizes = (2, 3, 4, 5)
    try:
        out = func(torch.empty(sizes, device="meta"), *args[1:], **kwargs)
    except Exception:  # an argument the probe cannot take: read as unknown
        return None
    if not isinstance(out, Tensor) or out.dim() != 4 or sorted(out.shape) != list(sizes):
        return None
    return tuple(order[sizes.index(int(n))] for n in out.shape)


def acts_on_last_axis(fname: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                      x: Tensor, active: Mapping[int, Tensor]) -> bool:
    """Whether ``fname(x, ...)`` acts on the last axis of ``x`` alone: a linear map by
    weights that are not computed from the input, or a normalisation over that axis."""
    if not args or args[0] is not x:
        return False
    if fname in ("layer_norm", "rms_norm"):
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        if isinstance(shape, int):
            return True
        return isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1
    if fname in ("linear", "matmul"):
        weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
        return (isinstance(weight, Tensor) and id(weight) not in active
                and weight.dim() in (1, 2))
    return False


def per_pixel_on_channels_last(module: nn.Module, pointwise: tuple[type[nn.Module], ...]
                               ) -> bool:
    """Whether a leaf module of the pointwise types ``pointwise`` (activations, dropout,
    normalisations) still acts pixel by pixel on a channels-last map."""
    return isinstance(module, pointwise) and not isinstance(module, _AXIS_1_MODULES)


def as_channels_first(t: Tensor) -> Tensor | None:
    """A tensor broadcast against a channels-last map, with its last axis moved before the
    two it meets H and W with; ``None`` when it holds one value per channel (or fewer)."""
    if t.dim() <= 1:
        return None
    full = t.reshape((1,) * max(0, 3 - t.dim()) + tuple(t.shape))
    if tuple(full.shape[-3:-1]) == (1, 1):
        return None
    return full.movedim(-1, -3)


def index_parts(index: Any, ndim: int) -> list[Any] | None:
    """``x[index]`` as one entry per axis (slices, ints, lists), or ``None`` when it adds
    axes or has more than one ellipsis."""
    parts = list(index) if isinstance(index, tuple) else [index]
    if any(p is None for p in parts) or parts.count(Ellipsis) > 1:
        return None
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts = parts[:at] + [slice(None)] * (ndim - len(parts) + 1) + parts[at + 1:]
    parts = parts + [slice(None)] * (ndim - len(parts))
    return parts if len(parts) == ndim else None


def reordered_index(index: Any, order: Order) -> tuple[Any, ...] | None:
    """An index of a tensor in ``order`` as the same index of the channels-first map."""
    parts = index_parts(index, len(order))
    if parts is None:
        return None
    return tuple(parts[order.index(a)] for a in range(len(order)))
