"""How the outputs of one model at one input size are laid out, for the Lie derivative:
token grids inferred from token counts, layouts of captured outputs and of leaf inputs,
and the edge mask of a margin."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..transforms.layout import Layout, TokenGrid, infer_layout, infer_token_grid
from .capture import Captured, MeasureError, Trace, to_measurable, unknown_layout

__all__ = ["LayerLayouts", "edge_mask", "guess_grid"]


def guess_grid(n: int, image_hw: Sequence[int], token_grid: Any = None) -> TokenGrid | None:
    """The ``(h, w, prefix)`` grid of ``n`` tokens: ``token_grid`` when it fits, else the
    one :func:`~equivision.transforms.layout.infer_token_grid` infers from the image;
    None if none fits."""
    given = infer_token_grid(n, image_hw, tuple(token_grid)) if token_grid is not None else None
    return given or infer_token_grid(n, image_hw)


@dataclass
class LayerLayouts:
    """How the captured outputs of one model at one input size are laid out."""

    image_hw: tuple[int, int]
    trace: Trace
    token_grid: TokenGrid | Mapping[str, TokenGrid] | None = None

    def grid_for(self, name: str, raw: Tensor) -> TokenGrid | None:
        tg = self.token_grid.get(name) if isinstance(self.token_grid, Mapping) else self.token_grid
        return guess_grid(int(raw.shape[1]), self.image_hw, tg) if raw.dim() == 3 else None

    def measurable(self, name: str, raw: Tensor) -> Captured | str:
        """The captured output with its layout, or why it cannot be measured."""
        reason = unknown_layout(raw, self.trace.token_counts, name in self.trace.spatial,
                                self.trace.layout_note(name))
        if reason:
            return reason
        raw = self.trace.canonical(name, raw)
        if raw.dim() == 3 and self.grid_for(name, raw) is None:
            return (f"skipped: {int(raw.shape[1])} tokens form no grid of the image; pass "
                    "token_grid=(h, w, prefix)")
        try:
            return to_measurable(name, raw, self.image_hw, self.grid_for(name, raw),
                                 self.trace.strides)
        except MeasureError as err:
            return f"skipped: {err}"

    def layout_of(self, raw: Tensor, stride: tuple[float, float] | None) -> Layout | None:
        """Layout of a leaf's input or output (tokens as tokens), or None if unknown."""
        if unknown_layout(raw, self.trace.token_counts):
            return None
        grid = guess_grid(int(raw.shape[1]), self.image_hw, None) if raw.dim() == 3 else None
        if raw.dim() == 3 and grid is None:
            return None
        try:
            return infer_layout(raw, self.image_hw, grid, stride)
        except ValueError:
            return None


def edge_mask(layout: Layout, hw: tuple[int, int], margin: int,
              device: torch.device) -> Tensor | None:
    """``(h, w)`` mask dropping positions within ``margin`` input pixels of the edge
    (None: keep all)."""
    if margin <= 0 or layout.kind not in ("map", "group"):
        return None
    ry = min(hw[0] // 2, math.ceil(margin / layout.stride[0]))
    rx = min(hw[1] // 2, math.ceil(margin / layout.stride[1]))
    mask = torch.zeros(hw, dtype=torch.bool, device=device)
    mask[ry: hw[0] - ry, rx: hw[1] - rx] = True
    return mask
