"""Batch norm and pooling for group feature maps ``(B, C, G, H, W)``.

* :class:`GroupBatchNorm2d`: one mean / variance / affine pair per channel, shared over the
  group axis and space (so it commutes with the group action).
* :class:`GroupMaxPool2d`, :class:`GroupAvgPool2d`: spatial pooling of every group slice.
* :class:`GroupPool`: coset pooling over the group axis, ``(B, C, G, H, W) -> (B, C, H, W)``,
  which turns group equivariance into invariance of the values (the map still rotates).
* :class:`GroupGlobalPool`: coset pooling then global spatial average, ``-> (B, C)``; an
  ``nn.AdaptiveAvgPool2d`` so that :mod:`equivision.measure` recognises it as the global pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import IntPair, _pair, check_output_size, check_restriction, group_order

__all__ = ["GroupAvgPool2d", "GroupBatchNorm2d", "GroupGlobalPool", "GroupMaxPool2d",
           "GroupPool", "check_group_map", "copy_repeated"]

PoolMode = Literal["max", "mean"]


def check_group_map(who: str, x: Tensor, groups: int | None = None,
                    channels: int | None = None) -> None:
    """``ValueError`` unless ``x`` is ``(B, C, G, H, W)`` with the given ``G`` / ``C``."""
    if (x.dim() != 5 or (groups is not None and x.shape[2] != groups)
            or (channels is not None and x.shape[1] != channels)):
        g = "G" if groups is None else f"G={groups}"
        c = "C" if channels is None else str(channels)
        raise ValueError(f"{who} expects a group feature map (B, {c}, {g}, H, W), got shape "
                         f"{tuple(x.shape)}")


@torch.no_grad()
def copy_repeated(src: nn.modules.batchnorm._BatchNorm, dst: nn.modules.batchnorm._BatchNorm,
                  n: int) -> None:
    """Copy ``src``'s running statistics and affine parameters ``(C,)`` into ``dst``
    ``(C * n,)``, each entry repeated ``n`` times in a row (channel ``c * n + j``)."""
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = getattr(src, name)
        if value is not None:
            getattr(dst, name).copy_(value.repeat_interleave(n))
    if src.num_batches_tracked is not None:
        dst.num_batches_tracked.copy_(src.num_batches_tracked)


class GroupBatchNorm2d(nn.BatchNorm3d):
    """Batch norm of a group feature map with statistics shared over the group axis.

    Shapes: ``(B, C, G, H, W)`` -> same; ``C = num_features``, ``G`` = 4 (p4) or 8 (p4m).
    """

    def __init__(self, num_features: int, group: str = "p4", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.group = group
        self.group_size = group_order(group, type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, G, H, W)`` -> ``(B, C, G, H, W)``."""
        check_group_map(f"GroupBatchNorm2d({self.group})", x, self.group_size, self.num_features)
        return super().forward(x)

    @torch.no_grad()
    def restrict(self, subgroup: str = "p4") -> GroupBatchNorm2d:
        """The same batch norm on coset-restricted ``subgroup`` maps (see
        :func:`~equivision.gcnn.layers.restrict` with ``cosets=True``): ``n = G / G'`` times
        the channels, every statistic and affine parameter repeated ``n`` times (a copy).
        In eval mode outputs match exactly; in training mode each coset channel gets its
        own batch statistics."""
        n = check_restriction(self.group, subgroup)
        ref = self.running_mean if self.running_mean is not None else self.weight
        out = GroupBatchNorm2d(self.num_features * n, subgroup, self.eps, self.momentum,
                               self.affine, self.track_running_stats, device=ref.device,
                               dtype=ref.dtype)
        copy_repeated(self, out, n)
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group!r}"


def _sizes(pool: nn.MaxPool2d | nn.AvgPool2d) -> tuple[tuple[int, int], ...]:
    """Validated ``(kernel, stride, padding)`` pairs of a pooling layer."""
    return (_pair(pool.kernel_size, "kernel_size", 1), _pair(pool.stride, "stride", 1),
            _pair(pool.padding, "padding", 0))


def _spatial(pool: GroupMaxPool2d | GroupAvgPool2d, fn: Callable[[Tensor], Tensor],
             x: Tensor) -> Tensor:
    """Apply the 2-D pooling ``fn`` to every group slice of ``x`` ``(B, C, G, H, W)``."""
    who = type(pool).__name__
    check_group_map(who, x)
    check_output_size(who, (x.shape[-2], x.shape[-1]), *pool.sizes)
    b, c, g, h, w = x.shape
    out = fn(x.reshape(b, c * g, h, w))
    return out.view(b, c, g, out.shape[-2], out.shape[-1])


class _GroupSpatialPool:
    """Mixin for an ``nn`` pooling class: pool each group slice of ``(B, C, G, H, W)``;
    arguments as the ``nn`` class (``stride`` defaults to ``kernel_size``)."""

    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None,
                 padding: IntPair = 0) -> None:
        super().__init__(kernel_size, stride, padding)  # type: ignore[call-arg]
        self.sizes = _sizes(self)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, G, H, W)`` -> ``(B, C, G, H', W')``."""
        return _spatial(self, super().forward, x)  # type: ignore[misc, arg-type]


class GroupMaxPool2d(_GroupSpatialPool, nn.MaxPool2d):
    """Spatial max pooling of each group slice; arguments as ``nn.MaxPool2d``
    (``stride`` defaults to ``kernel_size``).

    Shapes: ``(B, C, G, H, W)`` -> ``(B, C, G, H', W')``.
    """


class GroupAvgPool2d(_GroupSpatialPool, nn.AvgPool2d):
    """Spatial average pooling of each group slice (zero padding counted, as
    ``nn.AvgPool2d``); ``stride`` defaults to ``kernel_size``.

    Shapes: ``(B, C, G, H, W)`` -> ``(B, C, G, H', W')``.
    """


def _coset(x: Tensor, mode: PoolMode) -> Tensor:
    return x.amax(2) if mode == "max" else x.mean(2)


def _check_mode(mode: str) -> PoolMode:
    if mode not in ("max", "mean"):
        raise ValueError(f"coset pooling mode must be 'max' or 'mean', got {mode!r}")
    return mode  # type: ignore[return-value]


class GroupPool(nn.Module):
    """Coset pooling: max or mean over the group axis.

    Shapes: ``(B, C, G, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, mode: PoolMode = "max") -> None:
        super().__init__()
        self.mode = _check_mode(mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, G, H, W)`` -> ``(B, C, H, W)``."""
        check_group_map("GroupPool", x)
        return _coset(x, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class GroupGlobalPool(nn.AdaptiveAvgPool2d):
    """Rotation-invariant global pooling: coset pooling (``mode``) at every position, then
    the spatial average.

    Shapes: ``(B, C, G, H, W)`` -> ``(B, C)``.
    """

    def __init__(self, mode: PoolMode = "max") -> None:
        super().__init__(1)
        self.mode = _check_mode(mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, G, H, W)`` -> ``(B, C)``."""
        check_group_map("GroupGlobalPool", x)
        return F.adaptive_avg_pool2d(_coset(x, self.mode), 1).flatten(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
