"""Per-image elements: one :class:`~equivision.transforms.Transform` per image of a batch.

SER's equivariant views, the per-image random flips and crops of the training
augmentations and any other "each image gets its own g" computation act through an
:class:`ElementBatch`. It groups the images by equal elements, so each distinct element
acts once on its sub-batch (the work stays batched: a batch of 256 random horizontal
flips is two tensor operations, not 256), and puts the results back in the batch order.

Shapes (``B`` images, one element each):

* images ``(B, C, H, W)`` -> :meth:`ElementBatch.apply_image`,
* feature maps ``(B, C, h, w)`` of stride ``s`` -> :meth:`ElementBatch.apply_map`,
* group maps ``(B, C, G, h, w)`` -> :meth:`ElementBatch.apply_group_map`,
* tokens ``(B, N, C)`` on a grid -> :meth:`ElementBatch.apply_tokens`,
* any captured tensor with its layout -> :meth:`ElementBatch.act`,
* valid masks ``(B, h, w)`` bool -> :meth:`ElementBatch.valid_masks`.

Example::

    g = ElementBatch([hflip(), identity(), hflip()])
    y = g.apply_image(x)                 # x (3, C, H, W): images 0 and 2 mirrored
    g.inverse().apply_image(y)           # == x
    (g @ g).apply_image(x)               # == x: element-wise composition
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

import torch
from torch import Tensor

from .base import ShapeError, Stride, Transform, check_image

if TYPE_CHECKING:
    from .layout import Layout

__all__ = ["ElementBatch", "act_on_maps", "valid_masks"]


class ElementBatch(Sequence[Transform]):
    """A sequence of transformations, ``elements[i]`` acting on image ``i`` of a batch.

    Args:
        elements: one :class:`Transform` per image (any sequence, another
            :class:`ElementBatch` included).

    Every action takes a tensor whose first axis has ``len(self)`` entries and returns a
    tensor of the same length; element ``i`` acts on entry ``i``. Equal elements
    (``Transform.__eq__``) are grouped and act once on their sub-batch. All actions are
    differentiable and run on the device of their input.
    """

    def __init__(self, elements: Iterable[Transform]) -> None:
        self.elements: tuple[Transform, ...] = tuple(elements)
        for i, g in enumerate(self.elements):
            if not isinstance(g, Transform):
                raise TypeError(f"element {i} is a {type(g).__name__}, not a Transform")
        distinct: dict[Transform, int] = {}
        #: index into :attr:`distinct` of each image's element, ``(B,)``
        self.group_ids: list[int] = [distinct.setdefault(g, len(distinct))
                                     for g in self.elements]
        #: the distinct elements, in order of first appearance
        self.distinct: tuple[Transform, ...] = tuple(distinct)
        self._index_cache: dict[torch.device, tuple[list[Tensor], Tensor]] = {}

    @classmethod
    def repeat(cls, element: Transform, n: int) -> ElementBatch:
        """The same ``element`` for each of ``n`` images."""
        return cls([element] * n)

    # ---- sequence protocol -----------------------------------------------------
    def __len__(self) -> int:
        return len(self.elements)

    @overload
    def __getitem__(self, i: int) -> Transform: ...

    @overload
    def __getitem__(self, i: slice) -> ElementBatch: ...

    def __getitem__(self, i: int | slice) -> Transform | ElementBatch:
        if isinstance(i, slice):
            return ElementBatch(self.elements[i])
        return self.elements[i]

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.elements)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ElementBatch) and self.elements == other.elements

    def __hash__(self) -> int:
        return hash(self.elements)

    def __repr__(self) -> str:
        return f"ElementBatch([{', '.join(map(repr, self.elements))}])"

    # ---- grouping --------------------------------------------------------------
    def _indices(self, device: torch.device) -> tuple[list[Tensor], Tensor]:
        """Per distinct element the ``(n_k,)`` indices of its images, and the ``(B,)``
        permutation that puts the concatenated group outputs back in batch order."""
        if device not in self._index_cache:
            members: list[list[int]] = [[] for _ in self.distinct]
            for i, k in enumerate(self.group_ids):
                members[k].append(i)
            order = torch.tensor([i for m in members for i in m], dtype=torch.long)
            restore = torch.empty_like(order)
            restore[order] = torch.arange(len(order))
            self._index_cache[device] = (
                [torch.tensor(m, dtype=torch.long, device=device) for m in members],
                restore.to(device))
        return self._index_cache[device]

    def _per_group(self, x: Tensor, fn: Callable[[Transform, Tensor], Tensor]) -> Tensor:
        """``fn(g, x[images of g])`` for each distinct ``g``, reassembled in batch order.

        Every group's output must have the same shape beyond the first axis.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] != len(self):
            raise ValueError(f"{len(self)} elements for a tensor of shape {tuple(x.shape)}; "
                             "give one element per entry of the first axis")
        if len(self.distinct) <= 1:
            return x if not self.distinct else fn(self.distinct[0], x)
        members, restore = self._indices(x.device)
        outs = [fn(g, x.index_select(0, idx)) for g, idx in zip(self.distinct, members)]
        shapes = {tuple(o.shape[1:]) for o in outs}
        if len(shapes) > 1:
            raise ShapeError(
                f"the elements {list(self.distinct)} give outputs of different shapes "
                f"{sorted(shapes)}; per-image elements must keep one shape per batch "
                "(e.g. no mix of Resize factors)")
        return torch.cat(outs).index_select(0, restore)

    # ---- actions ---------------------------------------------------------------
    def apply_image(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> ``(B, C, H', W')``, image ``i`` transformed by
        ``self[i]`` (``H' = H`` unless the elements resize)."""
        check_image(x)
        return self._per_group(x, lambda g, sub: g.apply_image(sub))

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply_image(x)

    def apply_map(self, x: Tensor, stride: float | Stride = 1.0) -> Tensor:
        """Feature maps ``(B, C, h, w)`` of the given ``stride`` -> same shape."""
        return self._per_group(x, lambda g, sub: g.apply_map(sub, stride))

    def apply_group_map(self, x: Tensor, group: str, stride: float | Stride = 1.0) -> Tensor:
        """Group maps ``(B, C, G, h, w)`` (``group`` ``"p4"`` or ``"p4m"``) -> same shape."""
        return self._per_group(x, lambda g, sub: g.apply_group_map(sub, group, stride))

    def apply_tokens(self, x: Tensor, grid: tuple[int, int], prefix: int = 0,
                     stride: float | Stride = 1.0) -> Tensor:
        """Tokens ``(B, N, C)``, ``N = prefix + h * w`` on ``grid = (h, w)`` -> same shape;
        the ``prefix`` tokens are left as they are."""
        return self._per_group(x, lambda g, sub: g.apply_tokens(sub, grid, prefix, stride))

    def act(self, x: Tensor, layout: Layout) -> Tensor:
        """Act on a captured tensor according to its layout
        (:class:`~equivision.transforms.Layout`: map, group map, tokens or vector)."""
        return self._per_group(x, lambda g, sub: g.act(sub, layout))

    def valid_masks(self, shape: tuple[int, int], stride: float | Stride = 1.0,
                    device: torch.device | str | None = None) -> Tensor:
        """``(B, h, w)`` bool: per image, the positions of ``g·f`` whose value comes from
        inside a map of spatial ``shape = (h, w)`` (see :meth:`Transform.valid_mask`)."""
        if not self.elements:
            return torch.zeros(0, *shape, dtype=torch.bool, device=device)
        masks = torch.stack([g.valid_mask(tuple(shape), stride, device=device)
                             for g in self.distinct])
        ids = torch.tensor(self.group_ids, dtype=torch.long, device=masks.device)
        return masks.index_select(0, ids)

    # ---- group structure -------------------------------------------------------
    def inverse(self) -> ElementBatch:
        """Element-wise inverse: ``self.inverse()[i] == self[i].inverse()``."""
        inverses = {g: g.inverse() for g in self.distinct}
        return ElementBatch(inverses[g] for g in self.elements)

    def compose(self, other: ElementBatch | Transform) -> ElementBatch:
        """Element-wise composition "``other`` first, then ``self``"; a single
        :class:`Transform` ``other`` acts on every image."""
        if isinstance(other, Transform):
            other = ElementBatch.repeat(other, len(self))
        if not isinstance(other, ElementBatch):
            raise TypeError(f"cannot compose an ElementBatch with {type(other).__name__}")
        if len(other) != len(self):
            raise ValueError(f"cannot compose {len(self)} elements with {len(other)}")
        return ElementBatch(g @ h for g, h in zip(self.elements, other.elements))

    def __matmul__(self, other: ElementBatch | Transform) -> ElementBatch:
        return self.compose(other)


def act_on_maps(elements: Sequence[Transform], maps: Tensor,
                stride: float | Stride = 1.0) -> Tensor:
    """Apply ``elements[i]`` to ``maps[i]``: ``(M, D, h, w)`` -> ``(M, D, h, w)``.

    Function form of :meth:`ElementBatch.apply_map`. Flips and 90° rotations permute
    positions; scaling resamples the grid with the same operator as the images.
    Differentiable.
    """
    return ElementBatch(elements).apply_map(maps, stride)


def valid_masks(elements: Sequence[Transform], shape: tuple[int, int],
                device: torch.device | str | None = None,
                stride: float | Stride = 1.0) -> Tensor:
    """``(M, h, w)`` bool: positions of ``elements[i]·map`` that come from inside the map.

    Function form of :meth:`ElementBatch.valid_masks`.
    """
    return ElementBatch(elements).valid_masks(shape, stride, device)
