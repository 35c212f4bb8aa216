"""Test helper: kernels made symmetric under a group's action."""

from __future__ import annotations

from torch import Tensor

from equivision.transforms import group_elements


def symmetric(w: Tensor, group: str = "p4") -> Tensor:
    """``w`` averaged over the group's action on its last two axes (a D4-symmetric kernel
    for ``"p4m"``, a rot90-symmetric one for ``"p4"``)."""
    return sum(g.apply_map(w) for g in group_elements(group)) / len(group_elements(group))
