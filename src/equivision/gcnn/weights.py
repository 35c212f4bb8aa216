"""Are a layer's weights constrained to the group? The second half of the exactness verdict.

A layer whose sampling grid is aligned (:mod:`equivision.gcnn.exactness`) is equivariant
only if its weights are too. The analyzer accepts three kinds of evidence, and nothing else:

* a :class:`~equivision.gcnn.layers.GroupConv2d` whose group contains the analysed group
  (a p4m layer for p4, p4m or flips; a p4 layer for p4 only): constrained by construction;
* a kernel ``w`` (``(O, I, kh, kw)`` or ``(O, I, 1, kh, kw)`` acting on each group slice
  alike) with ``g·w = w`` for every element ``g`` (checked numerically, relative tolerance
  :data:`SYMMETRY_TOL`): such a convolution commutes with ``g`` when the channels carry no
  group axis;
* any other layer with ``kernel_size`` / ``stride`` attributes (a custom lifting or group
  convolution): run once in float64 on a random input of a size at which its own sampling
  grid is aligned, and ``||f(g x) - g·f(x)|| / ||f(x)||`` measured through the comparison
  core.

Values that cannot be read (a ``meta`` tensor with no real counterpart) give ``None``:
"cannot verify".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..measure.compare import align, per_image_error
from ..transforms import Dihedral, group_elements, hflip, infer_layout
from .layers import GroupConv2d

__all__ = ["SYMMETRY_TOL", "WeightJudge", "elements", "is_lowpass", "kernel_is_symmetric",
           "tensor_is_invariant"]

#: relative tolerance of the numerical symmetry and equivariance checks
SYMMETRY_TOL = 1e-6

#: which analysed groups a GroupConv2d of each group is equivariant to
_COVERS = {"p4": ("p4",), "p4m": ("p4", "p4m", "flip")}


def elements(group: str) -> list[Dihedral]:
    """The non-identity elements of ``group`` (``"flip"``: the horizontal flip alone)."""
    if group == "flip":
        return [hflip()]
    return [g for g in group_elements(group) if not g.is_identity]


def tensor_is_invariant(t: Tensor, group: str) -> tuple[bool | None, str]:
    """Whether ``g·t == t`` on the last two axes for every element of ``group``.

    Returns ``(True, "")``, ``(False, why)``, or ``(None, why)`` for values that cannot be read.
    """
    if t.device.type == "meta":
        return None, "its values are not available (meta tensor)"
    ref = t.detach().double()
    if ref.numel() == 0 or bool((ref == ref.flatten()[0]).all()):
        return True, ""
    h, w = int(t.shape[-2]), int(t.shape[-1])
    if group != "flip" and h != w:
        return False, f"its {h}x{w} extent is not square"
    scale = float(ref.abs().max())
    for g in elements(group):
        diff = float((g.apply_map(ref) - ref).abs().max())
        if diff > SYMMETRY_TOL * max(scale, 1e-30):
            return False, f"it changes under {g}"
    return True, ""


def kernel_is_symmetric(weight: Tensor, group: str) -> tuple[bool | None, str]:
    """Whether every spatial kernel of ``weight`` ``(..., kh, kw)`` is ``group``-symmetric."""
    ok, why = tensor_is_invariant(weight, group)
    if ok is False:
        why = f"kernels not {group}-symmetric ({why})"
    return ok, why


def is_lowpass(weight: Tensor) -> bool | None:
    """Whether ``weight`` ``(C, 1, kh, kw)`` is a fixed blur: depthwise, non-negative, each
    kernel summing to 1 and at least 2 taps wide (a low-pass filter before subsampling, as
    in antialiased-cnns); ``None`` for a meta tensor."""
    if weight.device.type == "meta":
        return None
    if weight.dim() != 4 or weight.shape[1] != 1 or min(weight.shape[-2:]) < 2:
        return False
    w = weight.detach().double()
    sums = w.sum((1, 2, 3))
    return bool((w >= 0).all()) and bool(((sums - 1).abs() < SYMMETRY_TOL).all())


def _aligned_size(kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                  dilation: Sequence[int]) -> int:
    """A square size ``n`` at which ``(n + 2p - k_eff) mod s == 0`` on both axes."""
    for n in range(3, 64):
        if all((n + 2 * p - (d * (k - 1) + 1)) % s == 0 and n + 2 * p >= d * (k - 1) + 1
               for k, s, p, d in zip(kernel, stride, pad, dilation)):
            return n
    raise ValueError("no aligned size below 64")


def layer_is_equivariant(module: nn.Module, x: Tensor, group: str, kernel: Sequence[int],
                         stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]
                         ) -> tuple[bool | None, str]:
    """Measure a conv-like layer's equivariance error at a size where its grid is aligned.

    ``x`` is the traced input ``(B, C, H, W)`` or ``(B, C, G, H, W)``: only its shape is used.
    """
    try:
        n = _aligned_size(kernel, stride, pad, dilation)
        net = copy.deepcopy(module).double().eval()
        for m in net.modules():  # the copy must not carry the tracer's hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        if any(p.device.type == "meta" for p in net.parameters()):
            return None, "weights not available (meta tensor)"
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(2, *x.shape[1:-2], n, n, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y = net(probe)
            layout = infer_layout(y)
            scale = float(torch.linalg.vector_norm(y))
            worst = 0.0
            for g in elements(group):
                gx = g.apply_image(probe) if probe.dim() == 4 else g.apply_group_map(
                    probe, {4: "p4", 8: "p4m"}[probe.shape[2]], 1.0)
                diff = float(torch.linalg.vector_norm(per_image_error(*align(net(gx), y, g,
                                                                             layout))))
                worst = max(worst, diff / scale if scale else float(diff > 0))
    except Exception as err:  # noqa: BLE001 - any failure means: cannot verify
        return None, f"could not test the layer on its own ({type(err).__name__}: {err})"
    if worst < SYMMETRY_TOL:
        return True, f"layer equivariant on its own (error {worst:.1e} at {n}x{n})"
    return False, f"layer not equivariant on its own (error {worst:.2g} at {n}x{n})"


class WeightJudge:
    """Judges the weights of the layers of one model, caching each answer by layer name.

    ``source`` is the model whose values are read: the analysed model itself, or the real
    model behind a shape-only (``meta``) copy, whose tensors are found by name and position.
    """

    def __init__(self, source: nn.Module, group: str) -> None:
        self.group = group
        self.modules = dict(source.named_modules())
        self.cache: dict[str, tuple[bool | None, str]] = {}
        self.real: dict[int, Tensor] = {}

    def link(self, copy_: nn.Module) -> None:
        """Map the tensors of a (``meta``) copy of the source model to the source's."""
        for (_, a), (_, b) in zip(copy_.named_parameters(), self.modules[""].named_parameters()):
            self.real[id(a)] = b
        for (_, a), (_, b) in zip(copy_.named_buffers(), self.modules[""].named_buffers()):
            self.real[id(a)] = b

    def value(self, t: Tensor) -> Tensor:
        """The readable counterpart of ``t`` (``t`` itself unless it is a linked meta copy)."""
        return self.real.get(id(t), t)

    def module(self, name: str, module: nn.Module, x: Tensor, kernel: Sequence[int],
               stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]
               ) -> tuple[bool | None, str]:
        """``(constrained, reason)`` of a conv-like module; ``(True, "")`` without weights."""
        if name not in self.cache:
            real = self.modules.get(name, module)
            self.cache[name] = self._judge(real, x, kernel, stride, pad, dilation)
        return self.cache[name]

    def _judge(self, module: nn.Module, x: Tensor, kernel: Sequence[int],
               stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int]
               ) -> tuple[bool | None, str]:
        if isinstance(module, GroupConv2d):
            if self.group in _COVERS.get(module.group, ()):
                return True, f"{module.group} group convolution"
            return False, f"a {module.group} group convolution is not {self.group}-equivariant"
        weight = getattr(module, "weight", None)
        if not any(True for _ in module.parameters()):
            return True, ""
        if isinstance(module, nn.modules.conv._ConvNd) and isinstance(weight, Tensor) and (
                weight.dim() == 4 or (weight.dim() == 5 and weight.shape[2] == 1)):
            ok, why = kernel_is_symmetric(weight, self.group)
            return ok, why or f"kernels {self.group}-symmetric"
        return layer_is_equivariant(module, x, self.group, kernel, stride, pad, dilation)

    def invariant(self, t: Tensor) -> tuple[bool | None, str]:
        """Whether a tensor mixed into a map (a positional map, coordinates) is invariant."""
        return tensor_is_invariant(self.value(t), self.group)

    def kernel(self, weight: Tensor) -> tuple[bool | None, str]:
        """``(constrained, reason)`` of a kernel passed to a functional convolution."""
        ok, why = kernel_is_symmetric(self.value(weight), self.group)
        return ok, why or f"kernels {self.group}-symmetric"
