"""Group convolutions for p4 (rotations by 90°) and p4m (rotations and flips).

A *group feature map* is a tensor ``(B, C, G, H, W)``: ``G = 4`` for p4, ``G = 8`` for p4m,
the group axis ordered as :func:`equivision.transforms.group_elements` lists the elements
(p4: index ``i`` is ``R^i``; p4m: index ``4j + i`` is ``R^i F^j``).

:class:`GroupConv2d` is both the lifting convolution (``in_group=None``: image
``(B, C_in, H, W)`` -> ``(B, C_out, G, H', W')``) and the group-to-group convolution
(``(B, C_in, G, H, W)`` -> ``(B, C_out, G, H', W')``). Its filter for output element ``g``
is ``g`` acting on the weight as a function on the group, ``g.apply_group_map(weight)``
(``g.apply_map`` for a lifting weight). The layer does not rotate or roll anything itself:
:func:`bank_index` applies each element's action to an ``arange`` tensor once, and every
forward builds the whole filter bank with one ``index_select`` (over the flattened
``(C_in / groups, G_in, k, k)`` axis) and runs one ``conv2d``. When no gradient to the
weights is needed (``torch.no_grad``, inference mode, frozen weights) the bank is cached and
rebuilt only when the weight or bias changes (see :meth:`GroupConv2d.filter_bank`).
Then ``f(g x) == g·f(x)`` holds exactly whenever every layer's input size fits the
subsampling rule ``(i + 2p - d(k-1) - 1) mod s == 0`` (always at stride 1), for odd and
even kernels alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import group_elements

__all__ = [
    "PADDING_MODES", "GroupConv2d", "P4ConvP4", "P4ConvZ2", "P4MConvP4M", "P4MConvZ2",
    "bank_index", "check_output_size", "check_restriction", "group_order", "output_size",
    "restrict",
]

IntPair = int | tuple[int, int]
#: padding modes of :class:`GroupConv2d`, as ``nn.Conv2d``
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                             for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def group_order(group: str, who: str = "") -> int:
    """Number of elements G of ``"p4"`` (4) or ``"p4m"`` (8); ``ValueError`` naming the layer
    ``who`` for any other group."""
    if group not in ("p4", "p4m"):
        raise ValueError(f"{who + ': ' if who else ''}unknown group {group!r}; choose 'p4' "
                         "(rotations by 90°) or 'p4m' (rotations and reflections)")
    return len(group_elements(group))


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output side length of a convolution or pooling along one axis (as ``nn.Conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_output_size(
    who: str, hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
) -> tuple[int, int]:
    """Output ``(h, w)`` of a layer on an ``hw`` input; ``ValueError`` naming the layer's
    sizes when either side would be < 1."""
    out = tuple(output_size(*a) for a in zip(hw, kernel, stride, padding, dilation))
    if min(out) < 1:
        raise ValueError(
            f"{who}: input of {hw[0]}x{hw[1]} pixels is too small for kernel_size={kernel}, "
            f"stride={stride}, padding={padding}, dilation={dilation} (output would be "
            f"{out[0]}x{out[1]}); use a larger input or more padding"
        )
    return out  # type: ignore[return-value]


def check_restriction(group: str, subgroup: str) -> int:
    """Number of cosets of ``subgroup`` in ``group`` (1 when they are equal, 2 for p4 in
    p4m); ``ValueError`` for any other pair."""
    if group == subgroup and group in ("p4", "p4m"):
        return 1
    if (group, subgroup) != ("p4m", "p4"):
        raise ValueError(f"restrict: can restrict 'p4m' to 'p4' (or a group to itself), got "
                         f"{group!r} to {subgroup!r}")
    return 2


def restrict(x: Tensor, group: str, subgroup: str = "p4", *, cosets: bool = False) -> Tensor:
    """A ``group`` feature map seen as a ``subgroup`` map (p4m -> p4).

    The p4m axis is ordered ``4j + i`` for ``R^i F^j``, so its first four entries are the
    rotations, in the order of the p4 axis. ``cosets=False`` keeps only them: the map as a
    function on the subgroup. ``cosets=True`` keeps everything: each coset ``{R^i F^j}`` becomes
    a p4 channel, ``(B, C, 8, H, W)`` -> ``(B, 2C, 4, H, W)`` with channel ``2c + j``.
    Either way ``restrict(g·x) == g·restrict(x)`` for every rotation ``g``.

    Shapes: ``(B, C, G, H, W)`` -> ``(B, C, G', H, W)`` or ``(B, C * G / G', G', H, W)``.
    """
    n = check_restriction(group, subgroup)
    g, sub = group_order(group), group_order(subgroup)
    if x.dim() != 5 or x.shape[2] != g:
        raise ValueError(f"restrict: expects a {group} feature map (B, C, G={g}, H, W), got "
                         f"shape {tuple(x.shape)}")
    if n == 1:
        return x
    if not cosets:
        return x[:, :, :sub]
    b, c, _, h, w = x.shape
    return x.reshape(b, c * n, sub, h, w)


@cache
def bank_index(group: str, in_group: str | None, kernel_size: int) -> Tensor:
    """Where each filter-bank entry comes from, derived from the transforms module.

    Row ``g`` lists, for each entry of the flattened ``(G_in, k, k)`` weight of one
    (output, input) channel pair, which entry of the untransformed weight it holds after
    element ``g`` acts: ``g.apply_group_map(arange(G_in * k * k), in_group)``, or
    ``g.apply_map`` when lifting (``in_group=None``, ``G_in = 1``).

    Returns:
        int64 ``(G, G_in * k * k)``, each row a permutation; cached, do not modify.
    """
    k = kernel_size
    rows = []
    for g in group_elements(group):
        if in_group is None:
            rows.append(g.apply_map(torch.arange(k * k).view(1, 1, k, k)).reshape(-1))
        else:
            n = group_order(in_group)
            base = torch.arange(n * k * k).view(1, 1, n, k, k)
            rows.append(g.apply_group_map(base, in_group).reshape(-1))
    return torch.stack(rows)


def _check_channels(in_channels: object, out_channels: object, groups: object) -> None:
    """``ValueError`` unless the channel counts and ``groups`` are integers >= 1 and
    ``groups`` divides both channel counts."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                    ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"GroupConv2d: {name} must be an integer >= 1, got {v!r}")
    if in_channels % groups or out_channels % groups:  # type: ignore[operator]
        raise ValueError(
            f"GroupConv2d: groups={groups} must divide in_channels={in_channels} and "
            f"out_channels={out_channels}; each of the {groups} groups maps its own "
            "in_channels / groups channels (with their whole group axis) to out_channels / "
            "groups channels")


class GroupConv2d(nn.Module):
    """p4 / p4m convolution: lifting (``in_group=None``) or group-to-group.

    Args:
        in_channels / out_channels: channels ``C_in`` / ``C_out`` (each carries a group axis).
        kernel_size: square kernel side ``k`` (int or equal pair); odd or even, p4 or p4m.
        stride, padding, dilation: as ``nn.Conv2d`` (int or pair).
        groups: as ``nn.Conv2d``: the channels split into ``groups`` blocks, block ``j`` of
            the output reads only block ``j`` of the input (each channel with its whole
            group axis), so equivariance holds per block.
        padding_mode: ``"zeros"`` (default), ``"reflect"``, ``"replicate"`` or
            ``"circular"``, as ``nn.Conv2d``. Each commutes with rotations by 90° and flips
            of a square input when the padding is the same on both axes, so the layer stays
            exactly equivariant under the usual size rule.
        bias: one learnable bias per output channel, shared over the group axis.
        group: output group, ``"p4"`` (G = 4) or ``"p4m"`` (G = 8).
        in_group: ``None`` for a lifting convolution on images, ``"same"`` (default) for an
            input group equal to ``group``.

    Parameters:
        weight: ``(C_out, C_in / groups, G_in, k, k)`` with ``G_in = 1`` when lifting,
            ``G_in = G`` otherwise; He normal init, ``std = sqrt(2 / fan_in)``.
        bias: ``(C_out,)``, zero-initialised.

    Shapes:
        lifting: ``(B, C_in, H, W)`` -> ``(B, C_out, G, H', W')``;
        group: ``(B, C_in, G, H, W)`` -> ``(B, C_out, G, H', W')``;
        ``H' = (H + 2p - d(k-1) - 1) // s + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        *,
        bias: bool = True,
        padding_mode: str = "zeros",
        group: str = "p4",
        in_group: str | None = "same",
    ) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels, groups)
        ks = _pair(kernel_size, "kernel_size", 1)
        if ks[0] != ks[1]:
            raise ValueError(f"GroupConv2d: 90° rotations need a square kernel, got {ks}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"GroupConv2d: padding_mode must be one of {PADDING_MODES}, got "
                             f"{padding_mode!r}")
        self.group_size = group_order(group, type(self).__name__)
        if in_group == "same":
            in_group = group
        if in_group is not None and in_group != group:
            raise ValueError(
                f"GroupConv2d: in_group must be None (lifting) or equal to group={group!r}, "
                f"got {in_group!r}")
        self.group, self.in_group = group, in_group
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding_mode = padding_mode
        self.kernel_size = ks
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.in_group_size = 1 if in_group is None else self.group_size
        k = ks[0]
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               self.in_group_size, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        #: smallest input (h, w) with an output of at least 1 x 1: d(k-1)+1 - 2p per axis,
        #: and that reflect (side > p) and circular (side >= p) padding accept
        extra = {"reflect": 1, "circular": 0}.get(padding_mode)
        self._min_input = tuple(max(d * (kk - 1) + 1 - 2 * p, -1 if extra is None else p + extra)
                                for kk, p, d in zip(self.kernel_size, self.padding,
                                                    self.dilation))
        ph, pw = self.padding
        #: F.pad's argument for a padding mode other than zeros, and conv2d's own padding
        self._pad = None if padding_mode == "zeros" else (pw, pw, ph, ph)
        self._conv_padding = self.padding if self._pad is None else (0, 0)
        self.register_buffer("flat_index", self._flat_index(bank_index(group, in_group, k)),
                             persistent=False)
        self.register_buffer("bias_index", torch.arange(out_channels).repeat_interleave(
            self.group_size), persistent=False)
        self._cache: tuple[tuple, Tensor, Tensor | None, list[Tensor]] | None = None
        self.reset_parameters()

    def _flat_index(self, index: Tensor) -> Tensor:
        """Index over the flattened ``(C_in / groups, G_in, k, k)`` axis of the weight.

        Returns:
            int64 ``(G * C_in / groups * n,)`` with ``n = G_in * k * k``: bank entry
            ``(g, i, m)`` reads weight entry ``(i, index[g, m])``.
        """
        offsets = torch.arange(self.in_channels // self.groups)[None, :, None] * index.shape[1]
        return (offsets + index[:, None, :]).reshape(-1)

    @property
    def fan_in(self) -> int:
        """``C_in / groups * G_in * k * k``."""
        return self.in_channels // self.groups * self.in_group_size * self.kernel_size[0] ** 2

    def reset_parameters(self) -> None:
        """He normal init of the weight (``std = sqrt(2 / fan_in)``), zero bias."""
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / self.fan_in))
            if self.bias is not None:
                self.bias.zero_()

    def _build(self) -> tuple[Tensor, Tensor | None]:
        """The filter bank ``(C_out * G, C_in / groups * G_in, k, k)`` (one gather) and the
        bias repeated over the group axis ``(C_out * G,)`` or ``None``."""
        weight, bias = self.weight, self.bias
        co, ci, gi, k, _ = weight.shape
        bank = weight.reshape(co, -1).index_select(1, self.flat_index)
        if bias is not None:
            bias = bias.index_select(0, self.bias_index)
        return bank.view(co * self.group_size, ci * gi, k, k), bias

    def _cache_key(self) -> tuple:
        """What the cached bank depends on: each parameter's storage, version counter,
        dtype, device, shape and strides, and whether inference mode is on."""
        key: list = [torch.is_inference_mode_enabled()]
        for p in (self.weight, self.bias):
            if p is not None:
                key += [p.data_ptr(), p._version, p.dtype, p.device, p.shape, p.stride()]
        return tuple(key)

    def bank_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The filter bank and the repeated bias that ``forward`` passes to ``conv2d``.

        While gradients to the parameters are needed (training) they are built by one
        gather each. Otherwise (``torch.no_grad``, inference mode, or parameters with
        ``requires_grad=False``) they are cached and rebuilt as soon as a parameter changes:
        any in-place write (optimizer steps, ``load_state_dict``, ``copy_`` under
        ``no_grad``) bumps its version counter, and ``.to`` / ``.double()`` / assigning
        ``.data`` give it new storage (the cache keeps the old storage alive, so its
        address is never reused). Writing through ``p.data`` in place bypasses the version
        counter: call :meth:`clear_cache` after such writes.

        Returns:
            ``(C_out * G, C_in / groups * G_in, k, k)`` and ``(C_out * G,)`` or ``None``.
        """
        weight, bias = self.weight, self.bias
        if torch.is_grad_enabled() and (weight.requires_grad or (
                bias is not None and bias.requires_grad)):
            if self._cache is not None:
                self._cache = None
            return self._build()
        params = [weight] if bias is None else [weight, bias]
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                bank, bias = self._build()
            # the detached aliases keep the parameters' storages (and addresses) alive
            self._cache = (key, bank, bias, [p.detach() for p in params])
        return self._cache[1], self._cache[2]

    def clear_cache(self) -> None:
        """Drop the cached filter bank (needed only after in-place writes through ``.data``)."""
        self._cache = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GroupConv2d:
        """``.to`` / ``.cuda`` / ``.double`` ...: drop the cache with the old parameters."""
        self._cache = None
        return super()._apply(fn, recurse)

    def filter_bank(self) -> Tensor:
        """The transformed filters of all output elements, ready for ``conv2d``.

        Returns:
            ``(C_out * G, C_in / groups * G_in, k, k)``; row ``o * G + g`` is element ``g``
            acting on the weight of output channel ``o``.
        """
        return self._build()[0]

    @torch.no_grad()
    def restrict(self, subgroup: str = "p4") -> GroupConv2d:
        """The same layer as a ``subgroup`` layer on coset-restricted maps (p4m -> p4).

        ``restrict(self(x), group, subgroup, cosets=True) ==
        self.restrict(subgroup)(restrict(x, group, subgroup, cosets=True))`` (``x`` itself
        for a lifting layer): each of the ``n = G / G'`` cosets of the input and output
        becomes a channel, so the result has ``n * C_in`` (lifting: ``C_in``) input and
        ``n * C_out`` output channels. Its weight is read off the filter bank (the rows of
        the coset representatives ``F^j``), a copy; a layer of the subgroup is returned as a
        copy.
        """
        n = check_restriction(self.group, subgroup)
        lifting = self.in_group is None
        out = GroupConv2d(self.in_channels * (1 if lifting else n), self.out_channels * n,
                          self.kernel_size, self.stride, self.padding, self.dilation,
                          self.groups, bias=self.bias is not None,
                          padding_mode=self.padding_mode, group=subgroup,
                          in_group=None if lifting else subgroup)
        out.to(self.weight)
        bank = self.filter_bank().view(self.out_channels, n, group_order(subgroup), -1)[:, :, 0]
        out.weight.copy_(bank.reshape(out.weight.shape))
        if self.bias is not None:
            out.bias.copy_(self.bias.repeat_interleave(n))
        return out.train(self.training)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.group}{', lifting' if self.in_group is None else ''})"

    def _check(self, x: Tensor) -> None:
        """Clear errors for a wrong layout, channel count, group size or too small an input
        (a fast test first: this runs on every forward)."""
        shape = x.shape
        lifting = self.in_group is None
        if (len(shape) != (4 if lifting else 5) or shape[1] != self.in_channels
                or (not lifting and shape[2] != self.group_size)):
            if lifting:
                raise ValueError(
                    f"{self._name()} expects images (B, {self.in_channels}, H, W), got shape "
                    f"{tuple(shape)}")
            raise ValueError(
                f"{self._name()} expects a group feature map (B, {self.in_channels}, "
                f"G={self.group_size}, H, W) for group {self.group!r}, got shape "
                f"{tuple(shape)}")
        if shape[-2] < self._min_input[0] or shape[-1] < self._min_input[1]:
            self._too_small((shape[-2], shape[-1]))

    def _too_small(self, hw: tuple[int, int]) -> None:
        """``ValueError`` for an input of ``hw`` pixels that the kernel or the padding mode
        cannot take."""
        check_output_size(self._name(), hw, self.kernel_size, self.stride, self.padding,
                          self.dilation)
        need = "larger than" if self.padding_mode == "reflect" else "at least"
        raise ValueError(
            f"{self._name()}: padding_mode={self.padding_mode!r} needs an input side {need} "
            f"the padding {self.padding}, got {hw[0]}x{hw[1]} pixels; use a larger input, "
            "less padding or padding_mode='zeros'")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` (lifting) or ``(B, C_in, G, H, W)`` -> ``(B, C_out, G, H', W')``."""
        self._check(x)
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        bank, bias = self.bank_and_bias()
        x = x.reshape(b, -1, h, w)
        if self._pad is not None:
            x = F.pad(x, self._pad, mode=self.padding_mode)
        out = F.conv2d(x, bank, bias, self.stride, self._conv_padding, self.dilation,
                       self.groups)
        return out.view(b, self.out_channels, self.group_size, out.shape[-2], out.shape[-1])

    def extra_repr(self) -> str:
        extra = "" if self.groups == 1 else f", groups={self.groups}"
        if self.padding_mode != "zeros":
            extra += f", padding_mode={self.padding_mode!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
                f"{extra}, bias={self.bias is not None}, group={self.group!r}, "
                f"in_group={self.in_group!r}")


class _Fixed(GroupConv2d):
    _group = "p4"
    _in_group: str | None = None

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
        padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, *, bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias=bias, padding_mode=padding_mode, group=self._group,
                         in_group=self._in_group)


class P4ConvZ2(_Fixed):
    """Lifting p4 convolution: ``(B, C_in, H, W)`` -> ``(B, C_out, 4, H', W')``."""


class P4ConvP4(_Fixed):
    """p4 group convolution: ``(B, C_in, 4, H, W)`` -> ``(B, C_out, 4, H', W')``."""

    _in_group = "p4"


class P4MConvZ2(_Fixed):
    """Lifting p4m convolution: ``(B, C_in, H, W)`` -> ``(B, C_out, 8, H', W')``."""

    _group = "p4m"


class P4MConvP4M(_Fixed):
    """p4m group convolution: ``(B, C_in, 8, H, W)`` -> ``(B, C_out, 8, H', W')``."""

    _group = "p4m"
    _in_group = "p4m"
