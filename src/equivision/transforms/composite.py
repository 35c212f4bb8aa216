"""Composition of transformations that have no closed form together."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import Stride, Transform, check_image, set_composition
from .dihedral import Dihedral


class Compose(Transform):
    """Apply ``transforms[0]`` first, then ``transforms[1]``, and so on."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def _key(self) -> tuple:
        return tuple((type(t).__name__, t._key()) for t in self.transforms)

    @property
    def name(self) -> str:
        return "∘".join(t.name for t in reversed(self.transforms)) or "identity"

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(t.exact for t in self.transforms)

    @property
    def photometric(self) -> bool:  # type: ignore[override]
        return bool(self.transforms) and all(t.photometric for t in self.transforms)

    def apply_image(self, x: Tensor) -> Tensor:
        check_image(x)
        for t in self.transforms:
            x = t.apply_image(x)
        return x

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        for t in self.transforms:
            x = t.apply_map(x, stride)
        return x

    def _check_map(self, shape, stride) -> None:
        for t in self.transforms:
            t._check_map(shape, stride)

    def group_permutation(self, group: str) -> list[int] | None:
        perm: list[int] | None = None
        for t in self.transforms:
            p = t.group_permutation(group)
            if p is not None:
                perm = p if perm is None else [perm[i] for i in p]
        return perm

    def inverse(self) -> Transform:
        return Compose([t.inverse() for t in reversed(self.transforms)]).simplify()

    def simplify(self) -> Transform:
        """Merge neighbours that compose in closed form; drop identities."""
        out: list[Transform] = []
        for t in self.transforms:
            parts = t.transforms if isinstance(t, Compose) else [t]
            for p in parts:
                if out:
                    merged = p._merge(out[-1])
                    if merged is not None:
                        out[-1] = merged
                        continue
                out.append(p)
        out = [t for t in out if not t.is_identity]
        if len(out) == 1:
            return out[0]
        if not out:
            return Dihedral(0)
        c = Compose.__new__(Compose)
        c.transforms = out
        return c



def _compose(first: Transform, then: Transform) -> Transform:
    """"``first``, then ``then``" as a simplified :class:`Compose`."""
    return Compose([first, then]).simplify()


set_composition(_compose)
