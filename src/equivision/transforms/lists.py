"""Transformations given in either accepted form: a spec string or a list."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Transform
from .spec import parse_transforms


def as_transforms(transforms: Sequence[Transform] | str) -> list[Transform]:
    """A non-empty list of transformations from a list of :class:`Transform` objects or a
    spec string such as ``"rot90,flip,shift:1-8"`` (see :func:`parse_transforms`).

    Raises:
        TypeError: an empty list or items that are not ``Transform`` objects.
        ValueError: an invalid spec string.
    """
    out = parse_transforms(transforms) if isinstance(transforms, str) else list(transforms)
    if not out or not all(isinstance(g, Transform) for g in out):
        raise TypeError("transforms must be a non-empty list of equivision Transform objects "
                        "or a spec string such as 'rot90,flip'")
    return out
