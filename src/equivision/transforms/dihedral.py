"""The dihedral group D4 acting on square pixel grids: rotations by k·90° and flips.

An element is ``R^k F^f``: first a horizontal flip ``F`` (mirror left-right, when
``f = 1``), then a rotation ``R^k`` by ``k·90°`` counter-clockwise as displayed
with row 0 at the top (``torch.rot90(x, k, dims=(-2, -1))``).
Composition follows ``F R = R^{-1} F``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import InexactActionError, ShapeError, Stride, Transform


class Dihedral(Transform):
    """Element ``R^k F^flip`` of D4; exact on any pixel grid, any resolution.

    Rotations by an odd multiple of 90° need square maps; flips and 180° act on any.
    """

    exact = True

    def __init__(self, k: int = 0, flip: bool = False) -> None:
        self.k = int(k) % 4
        self.flip = bool(flip)

    def _key(self) -> tuple:
        return (self.k, self.flip)

    @property
    def name(self) -> str:
        if self.flip:
            return {0: "hflip", 2: "vflip", 1: "transpose", 3: "antitranspose"}[self.k]
        return "identity" if self.k == 0 else f"rot{90 * self.k}"

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and not self.flip

    def _check_map(self, shape: tuple[int, int], stride: Stride) -> None:
        if self.k % 2 == 1 and shape[0] != shape[1]:
            raise ShapeError(
                f"{self.name} needs a square map, got {shape[0]}x{shape[1]}; crop or pad the "
                "input to a square size, exclude this layer, or measure flips / shifts instead"
            )

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        self._check_map((x.shape[-2], x.shape[-1]), (1.0, 1.0))
        if self.flip:
            x = torch.flip(x, dims=(-1,))
        if self.k:
            x = torch.rot90(x, self.k, dims=(-2, -1))
        return x

    def valid_mask(self, shape, stride=1.0, device=None) -> Tensor:  # noqa: D102
        self._check_map(tuple(shape), (1.0, 1.0))
        return torch.ones(*shape, dtype=torch.bool, device=device)

    # ---- group structure -----------------------------------------------------
    def inverse(self) -> Dihedral:
        return Dihedral(self.k, True) if self.flip else Dihedral(-self.k, False)

    def _merge(self, other: Transform) -> Transform | None:
        if isinstance(other, Dihedral):
            sign = -1 if self.flip else 1
            return Dihedral(self.k + sign * other.k, self.flip != other.flip)
        return None

    def group_permutation(self, group: str) -> list[int] | None:
        """p4: index ``i`` is ``R^i``; p4m: index ``4j + i`` is ``R^i F^j``.

        ``(g·f)(h) = f(g^{-1} h)``, so output ``h`` reads input ``g^{-1} h``.
        """
        elements = group_elements(group)
        if self.flip and group == "p4":
            raise InexactActionError(
                "a flip does not act on p4 feature maps (p4 has no reflections); "
                "use a p4m network or measure rotations only"
            )
        inv = self.inverse()
        index = {e._key(): i for i, e in enumerate(elements)}
        return [index[inv.compose(h)._key()] for h in elements]


def group_elements(group: str) -> list[Dihedral]:
    """Elements of ``"p4"`` (4 rotations) or ``"p4m"`` (rotations and reflections)
    in the order used for the group axis of feature maps."""
    if group == "p4":
        return [Dihedral(i) for i in range(4)]
    if group == "p4m":
        return [Dihedral(i, bool(j)) for j in range(2) for i in range(4)]
    raise ValueError(f"unknown group {group!r}; choose 'p4' or 'p4m'")


def identity() -> Dihedral:
    """The identity element."""
    return Dihedral(0)


def rot90(k: int = 1) -> Dihedral:
    """Rotation by ``k·90°`` counter-clockwise."""
    return Dihedral(k)


def hflip() -> Dihedral:
    """Mirror left-right (flip the width axis)."""
    return Dihedral(0, True)


def vflip() -> Dihedral:
    """Mirror top-bottom (flip the height axis)."""
    return Dihedral(2, True)
