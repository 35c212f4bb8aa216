"""The transformation abstraction shared by every part of equivision.

A :class:`Transform` is one group element (or, for non-group transformations such
as bilinear rotation by an arbitrary angle, one transformation). It knows how to act

* on an input image batch ``(B, C, H, W)`` (:meth:`Transform.apply_image`),
* on a feature map of any resolution ``(B, C, h, w)`` whose stride relative to the
  input is ``stride`` (:meth:`Transform.apply_map`),
* on a feature map with a group axis ``(B, C, G, h, w)`` (p4 / p4m,
  :meth:`Transform.apply_group_map`),
* on a ViT token sequence ``(B, N, C)`` laid out on a grid
  (:meth:`Transform.apply_tokens`),
* and on a pooled vector ``(B, C)`` (identity for every built-in transformation),

and gives its inverse, its composition with another element, whether it is exact
on a pixel grid, and the mask of positions that are valid after acting (no
wrap-around: translated or rotated content leaves an invalid border).

Every action is made of differentiable torch operations and runs on the device of
its input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .layout import Layout, Stride, as_stride, map_to_tokens, tokens_to_map

__all__ = ["InexactActionError", "Layout", "ShapeError", "Stride", "Transform", "as_stride",
           "check_image", "set_composition"]


class InexactActionError(ValueError):
    """The transformation has no exact action on this feature map.

    Raised, for example, by a translation of 3 px acting on a map of stride 2
    (the shift would have to be rounded) or by a flip acting on a p4 feature map.
    Measurement reports such pairs as *inexact* rather than rounding silently.
    """


class ShapeError(ValueError):
    """The map has the wrong shape for this action (e.g. a 90° rotation of a 7x9 map)."""


def check_image(x: Tensor, what: str = "image batch") -> None:
    """Raise a clear error unless ``x`` is a floating tensor of shape (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"expected a {what} of shape (B, C, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point {what}, got {x.dtype}; use x.float() / 255")


class Transform:
    """Base class of all transformations. Subclasses override :meth:`apply_map`.

    ``g(x)`` is shorthand for ``g.apply_image(x)`` and ``g @ h`` is the composition
    "first h, then g".
    """

    #: True when the action involves no interpolation (it permutes or shifts pixels).
    exact: bool = True
    #: True when the transformation changes pixel values rather than positions.
    photometric: bool = False

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Transform) and type(self) is type(other) and (
            self._key() == other._key()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def _key(self) -> tuple:
        return (self.name,)

    @property
    def is_identity(self) -> bool:
        """True when the element acts as the identity (dropped from compositions)."""
        return False

    # ---- actions -------------------------------------------------------------
    def apply_image(self, x: Tensor) -> Tensor:
        """Act on an image batch ``(B, C, H, W)``; returns the same shape."""
        check_image(x)
        return self.apply_map(x, (1.0, 1.0))

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply_image(x)

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        """Act on a feature map ``(B, C, h, w)`` of the given stride; same shape out.

        Raises:
            InexactActionError: when no exact action exists at this stride.
        """
        raise NotImplementedError

    def map_exact(self, shape: tuple[int, int], stride: float | Stride = 1.0) -> bool:
        """Whether :meth:`apply_map` is defined exactly for a map of ``shape``/``stride``."""
        try:
            self._check_map(shape, as_stride(stride))
        except InexactActionError:
            return False
        return True

    def _check_map(self, shape: tuple[int, int], stride: Stride) -> None:
        """Raise :class:`InexactActionError` if the action on this map is inexact."""

    def group_permutation(self, group: str) -> list[int] | None:
        """Index map of the group axis: output index ``i`` reads input ``perm[i]``.

        ``None`` means the group axis is left as it is (translations, photometric).
        """
        return None

    def apply_group_map(self, x: Tensor, group: str, stride: float | Stride = 1.0) -> Tensor:
        """Act on a group feature map ``(B, C, G, h, w)``: spatial action, then the
        permutation of the group axis given by :meth:`group_permutation`."""
        if x.dim() != 5:
            raise ValueError(f"expected a group feature map (B, C, G, h, w), got {tuple(x.shape)}")
        b, c, g, h, w = x.shape
        out = self.apply_map(x.reshape(b, c * g, h, w), stride).reshape(b, c, g, h, w)
        perm = self.group_permutation(group)
        if perm is not None:
            if len(perm) != g:
                raise ValueError(f"group {group!r} has {len(perm)} elements but the map has G={g}")
            out = out[:, :, perm]
        return out

    def apply_tokens(
        self, x: Tensor, grid: tuple[int, int], prefix: int = 0, stride: float | Stride = 1.0
    ) -> Tensor:
        """Act on ViT tokens ``(B, N, C)``: the ``N - prefix`` patch tokens form a
        ``grid = (h, w)`` map that is transformed; prefix tokens ([CLS], registers)
        are left as they are."""
        patches = tokens_to_map(x, grid, prefix)
        moved = map_to_tokens(self.apply_map(patches, stride))
        return torch.cat([x[:, :prefix], moved], dim=1)

    def act(self, x: Tensor, layout: Layout) -> Tensor:
        """Act on a captured tensor according to its :class:`Layout`: maps ``(B, C, h, w)``,
        group maps ``(B, C, G, h, w)``, tokens ``(B, N, C)`` or vectors ``(B, C)`` (left as
        they are). ``layout.size`` is used by transformations that change the map size."""
        if layout.kind == "map":
            return self.apply_map(x, layout.stride)
        if layout.kind == "group":
            return self.apply_group_map(x, layout.group or "p4", layout.stride)
        if layout.kind == "tokens":
            if layout.grid is None:
                raise ValueError("a token layout needs grid=(h, w)")
            return self.apply_tokens(x, layout.grid, layout.prefix, layout.stride)
        if layout.kind == "vector":
            return x
        raise ValueError(f"unknown layout kind {layout.kind!r}")

    def valid_mask(
        self,
        shape: tuple[int, int],
        stride: float | Stride = 1.0,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Boolean mask ``(h, w)``: positions of ``g·f`` whose value comes from inside
        the map (1 for every position under rot90 / flips; a border is invalid after
        translations, rotations by arbitrary angles and zooming out)."""
        ones = torch.ones(1, 1, *shape, device=device)
        return self.apply_map(ones, stride)[0, 0] > 1.0 - 1e-3

    # ---- group structure -----------------------------------------------------
    def inverse(self) -> Transform:
        raise NotImplementedError

    def compose(self, other: Transform) -> Transform:
        """``self.compose(other)`` acts as ``other`` first, then ``self``."""
        merged = self._merge(other)
        if merged is not None:
            return merged
        if _COMPOSITION is None:  # pragma: no cover - set when the package is imported
            raise RuntimeError("import equivision.transforms to compose transformations")
        return _COMPOSITION(other, self)

    def _merge(self, other: Transform) -> Transform | None:
        """Closed form of "``other`` then ``self``" when one exists, else ``None``."""
        return None

    def __matmul__(self, other: Transform) -> Transform:
        return self.compose(other)


#: "first ``h``, then ``g``" for elements with no closed form together; set by
#: :mod:`.composite` (which depends on this module, not the other way round).
_COMPOSITION: Callable[[Transform, Transform], Transform] | None = None


def set_composition(compose: Callable[[Transform, Transform], Transform]) -> None:
    """Install the general composition ``compose(first, then)`` used by
    :meth:`Transform.compose` when no closed form exists (done once by
    :mod:`equivision.transforms.composite`)."""
    global _COMPOSITION
    _COMPOSITION = compose
