"""Jacobian-vector products at every captured layer: ``J_l v`` for the map ``x -> f_l(x)``
from the image to layer ``l``'s output, for several input tangents ``v`` at once.

Two ways, same numbers:

* ``"forward"``: forward-mode AD (``torch.autograd.forward_ad``), one dual forward pass
  per tangent; hooks read each layer's tangent.
* ``"double-backward"``: the transpose trick (two reverse passes give a forward
  product): one backward with ``create_graph`` builds ``u -> sum_l J_l^T u_l``, then one
  backward per tangent gives ``J_l v`` for every layer at once: ``1 + len(tangents)``
  backward passes. Used when an operation has no forward-mode formula (PyTorch's CPU
  flash attention).

Both run PyTorch's attention on its math kernel when forward mode fails or for
double-backward (made of differentiable primitives; the fused CPU / CUDA kernels have
neither a forward-mode nor a double-backward formula). ``"auto"`` uses double-backward
(the faster of the two on the CPU: ``benchmarks/bench_lie.py``; it keeps the graph of one
batch) and falls back to forward mode for an operation without a double-backward formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .capture import MeasureError, first_tensor

__all__ = ["MODES", "OUTPUT", "layer_jvps"]

#: the key of the model's own output among the captured layers
OUTPUT = "(output)"
MODES = ("auto", "forward", "double-backward")


def _hooks(model: nn.Module, names: Iterable[str], hook_factory: Any) -> list[Any]:
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            raise MeasureError(f"{type(model).__name__} has no layer named {name!r}")
        handles.append(modules[name].register_forward_hook(hook_factory(name)))
    return handles


def _model_output(model: nn.Module, x: Tensor) -> Tensor:
    out = first_tensor(model(x))
    if out is None:
        raise MeasureError(f"{type(model).__name__} returned no tensor")
    return out


def _forward_mode(model: nn.Module, names: Sequence[str], x: Tensor,
                  tangents: Sequence[Tensor]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    primals: dict[str, Tensor] = {}
    found: list[dict[str, Tensor]] = []

    def factory(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None or name in found[-1]:
                return
            p, d = fwAD.unpack_dual(t)
            # copies: a later in-place op (ReLU(inplace=True), +=) would overwrite them
            if name not in primals:
                primals[name] = p.detach().clone()
            found[-1][name] = torch.zeros_like(p) if d is None else d.clone()
        return hook

    handles = _hooks(model, names, factory)
    try:
        with torch.no_grad(), fwAD.dual_level():
            for v in tangents:
                found.append({})
                out = _model_output(model, fwAD.make_dual(x, v))
                p, d = fwAD.unpack_dual(out)
                if OUTPUT not in primals:
                    primals[OUTPUT] = p.detach().clone()
                found[-1][OUTPUT] = torch.zeros_like(p) if d is None else d.clone()
    finally:
        for h in handles:
            h.remove()
    return primals, found


def _double_backward(model: nn.Module, names: Sequence[str], x: Tensor,
                     tangents: Sequence[Tensor]
                     ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    outs: dict[str, Tensor] = {}

    def factory(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            t = first_tensor(output)
            if t is None or name in outs or not isinstance(output, Tensor):
                return None
            outs[name] = t
            return t.clone()  # later in-place ops change the copy, not the captured tensor
        return hook

    handles = _hooks(model, names, factory)
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            outs[OUTPUT] = _model_output(model, xg)
    finally:
        for h in handles:
            h.remove()
    keys = [k for k, t in outs.items() if t.requires_grad]
    dummies = [torch.zeros_like(outs[k], requires_grad=True) for k in keys]
    if not keys:
        raise MeasureError(f"no output of {type(model).__name__} depends on the image")
    pairing = sum((outs[k] * u).sum() for k, u in zip(keys, dummies))
    (vjp,) = torch.autograd.grad(pairing, xg, create_graph=True)
    found = []
    for v in tangents:
        jv = torch.autograd.grad((vjp * v).sum(), dummies, retain_graph=True, allow_unused=True)
        found.append({k: (torch.zeros_like(outs[k]) if j is None else j.detach())
                      for k, j in zip(keys, jv)})
        for k, t in outs.items():  # outputs that do not depend on the image
            if k not in found[-1]:
                found[-1][k] = torch.zeros_like(t)
    return {k: t.detach() for k, t in outs.items()}, found


def layer_jvps(model: nn.Module, names: Sequence[str], x: Tensor, tangents: Sequence[Tensor],
               mode: str = "auto") -> tuple[dict[str, Tensor], list[dict[str, Tensor]], str]:
    """Outputs of the layers ``names`` and of the model on ``x (B, C, H, W)``, and for each
    tangent ``v`` (same shape as ``x``) the products ``J_l v`` (shaped like each output).

    Returns:
        ``(primals, jvps, mode)``: ``primals[name]`` (raw layer outputs, the model's
        first output tensor under :data:`OUTPUT`), ``jvps[i][name]`` for tangent ``i``,
        and the mode used.

    Raises:
        ValueError: an unknown ``mode``.
        MeasureError: a missing layer, or a model that returns no tensor.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("auto", "double-backward"):
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return (*_double_backward(model, names, x, tangents), "double-backward")
        except (RuntimeError, NotImplementedError) as err:
            if mode == "double-backward" or "not implemented" not in str(err):
                raise
    try:
        return (*_forward_mode(model, names, x, tangents), "forward")
    except (RuntimeError, NotImplementedError) as err:
        if "forward AD" not in str(err):
            raise
    with sdpa_kernel(SDPBackend.MATH):
        return (*_forward_mode(model, names, x, tangents), "forward (math attention)")
