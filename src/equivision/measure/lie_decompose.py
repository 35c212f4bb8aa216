"""The layer-wise decomposition of the output's Lie derivative (Gruver et al., sec. 5).

With ``h_l = f_l(h_{l-1})`` the chain rule gives

    L f (x) = sum_l J_{>l} e_l,    e_l = J_{f_l}(h_{l-1}) (L h_{l-1}) - L h_l,

where ``e_l`` is leaf ``l``'s own Lie derivative on the input it actually received and
``J_{>l}`` the Jacobian of the rest of the network at ``h_l``. ``C_l = J_{>l} e_l`` is the
leaf's contribution to the output's equivariance error. The leaf reading the image gets
the image's action (``L x``), every other input its feature action (zero under
photometric generators, so the first layer carries their whole error).

Computation, per chunk of images: one forward pass in which each leaf computes its
``e_l`` for every generator (a forward-mode product of that leaf alone) and returns
``h_l + z_l`` with a zero ``z_l`` that requires grad; then one backward pass per output
number (or per random probe ``r``: ``E[(r . C)^2] = ||C||^2``) gives ``J_{>l}^T`` at every
leaf at once, shared by all generators. Leaves called twice (a reused ``ReLU``) count
once per call (``relu``, ``relu#2``). What no leaf accounts for (``x.mean`` in
``forward``, concatenations, leaves whose inputs have no known layout) is the row
``(unattributed)`` = ``L f(x) - sum_l C_l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .capture import MeasureError, first_tensor, select_layers
from .lie_generators import Generator, image_tangent, map_tangent
from .lie_layouts import LayerLayouts
from .lie_report import LieRow, RunningMean, per_image_norm

__all__ = ["UNATTRIBUTED", "Decomposition", "leaf_jvp", "leaf_names"]

UNATTRIBUTED = "(unattributed)"


def leaf_names(model: nn.Module) -> list[str]:
    """Every leaf module, pass-through ones included (a ``Flatten`` of a map breaks the
    action and contributes)."""
    return select_layers(model, "all", include_pass_through=True)


def leaf_jvp(module: nn.Module, inp: Tensor, v: Tensor) -> Tensor:
    """``J v`` of ``module.forward`` alone at ``inp`` (hooks not run, ``inp`` not changed):
    forward mode, or double-backward where an op has no forward-mode formula."""
    try:
        with torch.no_grad(), fwAD.dual_level():
            out = first_tensor(module.forward(fwAD.make_dual(inp.clone(), v)))
            assert out is not None
            tangent = fwAD.unpack_dual(out).tangent
            return torch.zeros_like(out) if tangent is None else tangent.clone()
    except RuntimeError as err:
        if "forward AD" not in str(err):
            raise
    with torch.enable_grad():
        _, jv = torch.autograd.functional.jvp(
            lambda z: first_tensor(module.forward(z.clone())), inp.detach(), v)
    return jv


def _channels_first(t: Tensor, last: bool) -> Tensor:
    """A channels-last map ``(B, H, W, C)`` as ``(B, C, H, W)`` (``last``), else ``t``."""
    return t.permute(0, 3, 1, 2) if last and t.dim() == 4 else t


def _channels_last(t: Tensor, last: bool) -> Tensor:
    """The inverse of :func:`_channels_first`."""
    return t.permute(0, 2, 3, 1) if last and t.dim() == 4 else t


class _Forward:
    """Hooks of one decomposition forward pass: each leaf's ``e_l`` per generator and the
    zero ``z_l`` added to its output."""

    def __init__(self, dec: Decomposition, x: Tensor) -> None:
        self.dec, self.x = dec, x
        self.inputs: dict[str, Tensor] = {}
        self.errors: dict[str, Tensor] = {}
        self.zeros: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.by_size = {tuple(x.shape[-2:]): (1.0, 1.0)}

    def pre(self, name: str):
        def hook(module: nn.Module, inputs: Any) -> None:
            t = first_tensor(inputs)
            if t is not None:  # a copy: in-place modules change their input
                self.inputs[name] = t.detach().clone()
        return hook

    def post(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            k = self.calls[name] = self.calls.get(name, 0) + 1
            key = name if k == 1 else f"{name}#{k}"
            inp = self.inputs.pop(name, None)
            if not isinstance(output, Tensor) or not output.is_floating_point():
                self.dec.notes.setdefault((key, "*"), "returns no single float tensor")
                return None
            geo = self.dec.layouts.trace.strides.get(name)
            s_out = None if geo is None else geo.stride
            if output.dim() >= 4:
                hw = output.shape[1:3] if name in self.dec.layouts.trace.channels_last \
                    else output.shape[-2:]
                self.by_size.setdefault(tuple(hw), s_out or (1.0, 1.0))
            errors = self._errors(module, key, inp, output, s_out)
            if errors is None:
                return None
            z = torch.zeros_like(output, requires_grad=True)
            self.errors[key], self.zeros[key] = errors, z
            return output + z
        return hook

    def _errors(self, module: nn.Module, key: str, inp: Tensor | None, out: Tensor,
                s_out: Any) -> list[Tensor] | None:
        if inp is None or not inp.is_floating_point():
            self.dec.notes.setdefault((key, "*"), "its input is not a float tensor")
            return None
        trace = self.dec.layouts.trace
        name = key.split("#")[0]
        last_in, last_out = name in trace.channels_last_input, name in trace.channels_last
        is_image = inp.shape == self.x.shape and bool(torch.equal(inp, self.x))
        inp_c, out_c = _channels_first(inp, last_in), _channels_first(out.detach(), last_out)
        s_in = self.by_size.get(tuple(inp_c.shape[-2:])) if inp.dim() >= 4 else None
        lay_in = self.dec.layouts.layout_of(inp_c, s_in)
        lay_out = self.dec.layouts.layout_of(out_c, s_out)
        if lay_in is None or lay_out is None:
            self.dec.notes.setdefault((key, "*"), "input or output has no known layout")
            return None
        errs = []
        g_in: dict[int, Tensor] = {}  # central differences shared by the generators
        g_out: dict[int, Tensor] = {}
        with torch.no_grad():
            for g in self.dec.gens:
                try:
                    v = image_tangent(inp, g) if is_image else _channels_last(
                        map_tangent(inp_c, lay_in, g, g_in), last_in)
                    errs.append(leaf_jvp(module, inp, v) - _channels_last(
                        map_tangent(out_c, lay_out, g, g_out), last_out))
                except ValueError as err:  # this generator only: its share stays unattributed
                    self.dec.notes.setdefault((key, g.name), str(err))
                    errs.append(torch.zeros_like(out))
        return torch.stack(errs)


class Decomposition:
    """Streaming layer-wise decomposition over batches (see the module docstring).

    Args:
        leaves: leaf module names to attribute to (:func:`leaf_names`).
        max_outputs: exact (one backward per output number) when an image's output has
            at most this many numbers, else ``probes`` random Gaussian projections.
        chunk: images per forward pass (memory: every leaf keeps one error per generator).
    """

    def __init__(self, model: nn.Module, leaves: Sequence[str], layouts: LayerLayouts,
                 gens: Sequence[Generator], max_outputs: int = 64, probes: int = 16,
                 chunk: int = 32, seed: int = 0) -> None:
        self.model, self.leaves, self.layouts, self.gens = model, list(leaves), layouts, gens
        self.max_outputs, self.probes, self.chunk = max_outputs, probes, chunk
        self.rng = torch.Generator().manual_seed(seed)
        self.contrib: dict[tuple[str, str], RunningMean] = {}
        self.total: dict[str, RunningMean] = {g.name: RunningMean() for g in gens}
        self.rest: dict[str, RunningMean] = {g.name: RunningMean() for g in gens}
        self.order: list[str] = []
        self.notes: dict[tuple[str, str], str] = {}
        self.exact = True

    def add(self, x: Tensor, output_tangents: Sequence[Tensor]) -> None:
        """Add a batch ``x (B, C, H, W)``; ``output_tangents[i]`` is ``J_f (L_i x)`` of the
        model's output for generator ``i`` (from :func:`~.lie_tangents.layer_jvps`)."""
        for start in range(0, len(x), self.chunk):
            sl = slice(start, start + self.chunk)
            self._add_chunk(x[sl], [t[sl] for t in output_tangents])

    def _add_chunk(self, x: Tensor, tangents: Sequence[Tensor]) -> None:
        fw = _Forward(self, x)
        modules = dict(self.model.named_modules())
        handles = []
        for n in self.leaves:
            handles.append(modules[n].register_forward_pre_hook(fw.pre(n)))
            handles.append(modules[n].register_forward_hook(fw.post(n)))
        try:
            with torch.enable_grad():
                y = first_tensor(self.model(x))
        finally:
            for h in handles:
                h.remove()
        if y is None:
            raise MeasureError("the model returned no tensor")
        keys = [k for k in fw.zeros if fw.zeros[k] is not None]
        self.order += [k for k in keys if k not in self.order]
        lay = self.layouts.layout_of(y.detach(), None)
        deltas = [(t - map_tangent(y.detach(), lay, g)).flatten(1) if lay is not None
                  else t.flatten(1) for t, g in zip(tangents, self.gens)]
        proj, probes = self._project(y, [fw.zeros[k] for k in keys],
                                     [fw.errors[k] for k in keys])
        self._accumulate(keys, proj, deltas, probes)

    def _project(self, y: Tensor, zeros: list[Tensor], errors: list[Tensor]
                 ) -> tuple[Tensor, Tensor]:
        """``proj[l, g, b, p] = r_p . C_{l,g}[b]`` for probes ``r (B, P, K)``."""
        yf = y.flatten(1)
        b, k = yf.shape
        self.exact = k <= self.max_outputs
        r = (torch.eye(k, dtype=yf.dtype).expand(b, k, k) if self.exact else
             torch.randn(b, self.probes, k, generator=self.rng, dtype=yf.dtype))
        r = r.to(yf.device)
        proj = torch.zeros(len(zeros), len(self.gens), b, r.shape[1], dtype=torch.float64,
                           device=yf.device)
        for p in range(r.shape[1]):
            grads = torch.autograd.grad((yf * r[:, p]).sum(), zeros, retain_graph=True,
                                        allow_unused=True) if zeros else []
            for li, gr in enumerate(grads):
                if gr is not None:  # (G, B, ...) errors against (B, ...) gradients
                    proj[li, :, :, p] = (errors[li] * gr).flatten(2).sum(2).double()
        return proj, r

    def _accumulate(self, keys: list[str], proj: Tensor, deltas: list[Tensor],
                    probes: Tensor) -> None:
        def norm(p: Tensor) -> Tensor:  # (B, P) projections -> (B,) norms
            return p.norm(dim=1) if self.exact else (p.pow(2).mean(1)).sqrt()

        for gi, g in enumerate(self.gens):
            for li, key in enumerate(keys):
                self.contrib.setdefault((key, g.name), RunningMean()).add(norm(proj[li, gi]))
            d = deltas[gi].double()
            total = torch.einsum("bk,bpk->bp", d, probes.double())
            self.total[g.name].add(per_image_norm(d) if self.exact else norm(total))
            self.rest[g.name].add(norm(total - proj[:, gi].sum(0)))

    def rows(self) -> list[LieRow]:
        """Contribution rows: every leaf call in forward order, then ``(unattributed)``;
        ``value`` the mean ``||C_l||``, ``share`` relative to the mean ``||L f(x)||``."""
        out = []
        for g in self.gens:
            total = self.total[g.name].summary()[0]
            for key in [*self.order, UNATTRIBUTED]:
                acc = self.rest[g.name] if key == UNATTRIBUTED else self.contrib.get((key, g.name))
                if acc is None or (key, g.name) in self.notes:
                    continue
                mean, std, ci = acc.summary()
                out.append(LieRow(key, g.name, "contribution", mean, std, ci, absolute=mean,
                                  share=mean / total if total > 0 else None, n_images=acc.n,
                                  note="" if self.exact else f"{self.probes} random probes"))
        for (key, gen), why in self.notes.items():
            out.append(LieRow(key, gen, "contribution", note=f"not attributed: {why}"))
        return out
