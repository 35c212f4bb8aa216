"""Infinitesimal generators of continuous transformations and their actions.

A one-parameter family ``g_t`` (translation by ``t`` pixels, rotation by ``t`` radians,
scaling by ``e^t``, brightness ``+t``, contrast ``e^t``) acts on an image or a feature map
``h``; its generator is ``L h = d/dt (g_t h) at t = 0``. For the geometric families
``(g_t h)(p) = h(phi_{-t}(p))`` with the flow ``phi`` of a velocity field ``v``, so

    L h (p) = -v(p) . grad h(p)

with ``grad`` the central difference (zero outside the map), which is the ``t -> 0``
limit of the symmetric difference ``(g_eps h - g_-eps h) / (2 eps)`` of the bilinear
:class:`~equivision.transforms.Translation` / ``Rotation`` / ``Scale`` actions. On a map
of stride ``s`` the same motion is ``1 / s`` positions per input pixel for translations;
rotations and scalings about the map's centre look the same at every stride
(the conventions of :mod:`equivision.transforms.affine`: centre ``((h-1)/2, (w-1)/2)``,
counter-clockwise on screen).

Photometric generators change pixel values only: their action on the image is
``1`` (brightness) or ``x`` (contrast, as ``ColorJitter`` multiplies), and they act
on every feature as the identity (``L h = 0``), as ``ColorJitter`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import Registry
from ..transforms.layout import Layout, as_stride, map_to_tokens, tokens_to_map

__all__ = ["GENERATORS", "Generator", "as_generators", "image_tangent", "map_tangent"]


@dataclass(frozen=True)
class Generator:
    """One generator.

    Attributes:
        name: registry name (``"tx"``, ``"ty"``, ``"rotate"``, ``"scale"``,
            ``"brightness"``, ``"contrast"``).
        kind: ``"translate"``, ``"rotate"``, ``"scale"`` or ``"photometric"``.
        axis: ``(ux, uy)`` of a translation, unit length (``(1, 0)`` moves content right).
        unit: what ``t = 1`` means, for reports (``"px"``, ``"rad"``, ...).
    """

    name: str
    kind: str
    axis: tuple[float, float] = (0.0, 0.0)
    unit: str = ""

    @property
    def photometric(self) -> bool:
        """Whether it changes pixel values rather than positions."""
        return self.kind == "photometric"


#: the generators by name
GENERATORS: Registry[Generator] = Registry("Lie generator", normalize=str.lower)
for _g, _d in (
    (Generator("tx", "translate", (1.0, 0.0), "px"), "horizontal translation, per input pixel"),
    (Generator("ty", "translate", (0.0, 1.0), "px"), "vertical translation, per input pixel"),
    (Generator("rotate", "rotate", unit="rad"), "rotation about the centre, per radian"),
    (Generator("scale", "scale", unit="log-scale"), "isotropic scaling e^t about the centre"),
    (Generator("brightness", "photometric", unit="intensity"), "x + t (identity on features)"),
    (Generator("contrast", "photometric", unit="log-contrast"), "x e^t (identity on features)"),
):
    GENERATORS.add(_g.name, _g, description=_d)

#: the default set: the paper's translation, rotation and scale plus one photometric
DEFAULT_GENERATORS = ("tx", "ty", "rotate", "scale", "brightness")


def as_generators(spec: str | Generator | Sequence[str | Generator] | None) -> list[Generator]:
    """Generators from names (``"tx,ty,rotate"``), objects or a mix; None: the default set.

    Raises:
        UnknownNameError: an unknown name (with did-you-mean suggestions and the list).
        ValueError: an empty list.
    """
    if spec is None:
        spec = DEFAULT_GENERATORS
    if isinstance(spec, (str, Generator)):
        spec = [spec]
    out: list[Generator] = []
    for item in spec:
        names = [item] if isinstance(item, Generator) else [
            n for n in str(item).replace(",", " ").split() if n]
        for n in names:
            g = n if isinstance(n, Generator) else GENERATORS.get(n)
            if g not in out:
                out.append(g)
    if not out:
        raise ValueError(f"no Lie generator given; choose from {', '.join(GENERATORS.list())}")
    return out


def _central_diff(h: Tensor, dim: int) -> Tensor:
    """Central difference of ``h`` along ``dim`` (-1 or -2), zero outside the map (the
    zero fill of the transformations and of zero-padded layers); zero on a length-1 axis."""
    n = h.shape[dim]
    out = torch.zeros_like(h)
    if n < 2:
        return out
    out.narrow(dim, 1, n - 2).copy_(h.narrow(dim, 2, n - 2) - h.narrow(dim, 0, n - 2))
    out.narrow(dim, 0, 1).copy_(h.narrow(dim, 1, 1))
    out.narrow(dim, n - 1, 1).copy_(-h.narrow(dim, n - 2, 1))
    return out.mul_(0.5)


def _velocity(gen: Generator, hw: tuple[int, int], stride: tuple[float, float],
              like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """``(v_y, v_x)`` in map positions per unit ``t`` at each position of an ``hw`` map."""
    if gen.kind == "translate":
        return gen.axis[1] / stride[0], gen.axis[0] / stride[1]
    h, w = hw
    y = (torch.arange(h, dtype=like.dtype, device=like.device) - (h - 1) / 2)[:, None]
    x = (torch.arange(w, dtype=like.dtype, device=like.device) - (w - 1) / 2)[None, :]
    if gen.kind == "scale":
        return y, x
    if gen.kind == "rotate":  # counter-clockwise on screen (y points down)
        return -x, y
    raise ValueError(f"{gen.name} is not a geometric generator")


def spatial_tangent(h: Tensor, gen: Generator, stride: float | Sequence[float] = 1.0,
                    cache: dict[int, Tensor] | None = None) -> Tensor:
    """``L h = -v . grad h`` on the last two axes of ``h (..., H, W)`` at ``stride``.

    ``cache``: a dict kept by the caller for one ``h``, in which the central differences
    are stored by axis, so that every generator acting on ``h`` takes them once."""
    hw = (int(h.shape[-2]), int(h.shape[-1]))
    vy, vx = _velocity(gen, hw, as_stride(stride), h)
    cache = {} if cache is None else cache
    out = None
    for v, dim in ((vy, -2), (vx, -1)):
        if isinstance(v, float) and v == 0.0:
            continue
        if dim not in cache:
            cache[dim] = _central_diff(h, dim)
        term = cache[dim] * (-v)
        out = term if out is None else out.add_(term)
    return torch.zeros_like(h) if out is None else out


def image_tangent(x: Tensor, gen: Generator) -> Tensor:
    """The generator's action on an image batch ``(B, C, H, W)``: ``d/dt g_t x``, same shape."""
    if gen.name == "brightness":
        return torch.ones_like(x)
    if gen.name == "contrast":
        return x.clone()
    return spatial_tangent(x, gen, 1.0)


def acts_as_zero(layout: Layout, gen: Generator) -> bool:
    """True where ``gen`` has no action on a feature laid out as ``layout``: vectors, and
    every feature under a photometric generator (:func:`map_tangent` is zero there)."""
    return gen.photometric or layout.kind == "vector"


def map_tangent(h: Tensor, layout: Layout, gen: Generator,
                cache: dict[int, Tensor] | None = None) -> Tensor:
    """The generator's action on a captured feature ``h`` laid out as ``layout``
    (``cache``: as in :func:`spatial_tangent`, one dict per ``h`` and layout).

    Vectors ``(B, C)`` and every feature under a photometric generator: zero. Maps
    ``(B, C, h, w)`` and group maps ``(B, C, G, h, w)`` (translations and scalings act on
    the positions only): ``-v . grad h`` at the layout's stride. Tokens ``(B, N, C)``: the
    same on the patch tokens' grid, zero on prefix tokens ([CLS]).

    Raises:
        ValueError: a rotation on a group map (an infinitesimal rotation has no action on
            the discrete rotation axis of a p4 / p4m map).
    """
    if acts_as_zero(layout, gen):
        return torch.zeros_like(h)
    if layout.kind == "group" and gen.kind == "rotate":
        raise ValueError("an infinitesimal rotation has no action on the rotation axis of a "
                         f"{layout.group} group map")
    if layout.kind == "tokens":
        if layout.grid is None:
            raise ValueError("a token layout needs its grid=(h, w)")
        moved = map_to_tokens(spatial_tangent(tokens_to_map(h, layout.grid, layout.prefix),
                                              gen, layout.stride, cache))
        return torch.cat([torch.zeros_like(h[:, :layout.prefix]), moved], dim=1)
    if layout.kind not in ("map", "group"):
        raise ValueError(f"no action of {gen.name} on a {layout.kind} layout")
    return spatial_tangent(h, gen, layout.stride, cache)
