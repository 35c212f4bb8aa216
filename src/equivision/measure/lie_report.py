"""The Lie-derivative report: per-layer norms, the layer-wise decomposition, JSON / CSV."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import write_atomic, write_csv

__all__ = ["LIE_FILES", "LieReport", "LieRow", "RunningMean"]

#: files :meth:`LieReport.save` writes into a folder
LIE_FILES = ("lie.json", "lie.csv")


class RunningMean:
    """Mean and standard deviation of per-image values, streamed batch by batch (float64
    sums: memory does not grow with the number of images)."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, values: Tensor) -> None:
        """Add per-image values ``(B,)``."""
        v = values.detach().double().cpu()
        self.n += int(v.numel())
        self.s += float(v.sum())
        self.s2 += float((v * v).sum())

    def summary(self) -> tuple[float, float, float]:
        """``(mean, std, half-width of the normal 95% CI of the mean)``; NaN when empty."""
        if self.n == 0:
            return math.nan, math.nan, math.nan
        mean = self.s / self.n
        var = max(0.0, self.s2 / self.n - mean * mean) * self.n / max(1, self.n - 1)
        std = math.sqrt(var)
        return mean, std, 1.96 * std / math.sqrt(self.n)


@dataclass
class LieRow:
    """One (layer, generator) figure.

    ``kind="layer"``: ``value`` is the mean over images of ``||L f_l(x)|| / ||f_l(x)||``, the
    Lie derivative of the map from the image to this layer's output (``f_l(g_t x)``
    brought back by ``g_t^-1``), relative to the output's norm; ``rms`` the mean of
    ``||L f_l(x)|| / sqrt(D)``. For the model's output (``layer="(output)"``) ``absolute``
    is the mean of ``||L f(x)||``, the paper's figure.
    ``kind="contribution"``: ``value`` is the mean of ``||C_l||``, this leaf's own
    equivariance error carried to the output (``J_{>l} (L f_l)``); ``share`` is
    ``mean ||C_l|| / mean ||L f(x)||``. The row ``"(unattributed)"`` holds
    ``L f(x) - sum_l C_l``: operations in ``forward`` that are no module (``x.mean``,
    ``torch.cat``) or leaves that could not be taken apart.
    """

    layer: str
    generator: str
    kind: str = "layer"
    value: float | None = None
    std: float | None = None
    ci95: float | None = None
    rms: float | None = None
    absolute: float | None = None
    share: float | None = None
    n_images: int = 0
    shape: list[int] = field(default_factory=list)
    stride: list[float] = field(default_factory=list)
    note: str = ""


def _num(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


@dataclass
class LieReport:
    """Everything one Lie-derivative measurement produced.

    ``rows`` holds the per-layer rows (``kind="layer"``) and, when decomposed, the
    per-leaf contributions (``kind="contribution"``). ``meta``: generators and their
    units, skipped layers and why, the AD mode, the image count.
    """

    model: str
    generators: list[str]
    rows: list[LieRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def layer_rows(self, kind: str = "layer") -> list[LieRow]:
        """Rows of one kind, in forward order."""
        return [r for r in self.rows if r.kind == kind]

    def value(self, layer: str, generator: str, kind: str = "layer") -> float | None:
        """The ``value`` of one row (None if absent or not measured)."""
        for r in self.rows:
            if (r.layer, r.generator, r.kind) == (layer, generator, kind):
                return r.value
        return None

    def table(self, kind: str = "layer") -> str:
        """A plain-text table: one line per layer, one column per generator."""
        by_layer: dict[str, dict[str, LieRow]] = defaultdict(dict)
        for r in self.layer_rows(kind):
            by_layer[r.layer][r.generator] = r
        width = max([len(n) for n in by_layer] + [12])
        head = "layer".ljust(width) + "".join(g.rjust(12) for g in self.generators)
        lines = [head, "-" * len(head)]
        for layer, cells in by_layer.items():
            vals = [_num(cells[g].value) if g in cells else "-" for g in self.generators]
            lines.append(layer.ljust(width) + "".join(v.rjust(12) for v in vals))
        return "\n".join(lines)

    def to_json(self) -> str:
        """The whole report as JSON (NaN written as null)."""
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in asdict(r).items()} for r in self.rows]
        return json.dumps({"model": self.model, "generators": self.generators,
                           "meta": self.meta, "rows": rows}, indent=1)

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write ``lie.json`` and ``lie.csv`` into folder ``out`` (atomically, created when
        missing); returns their paths by suffix."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        header = list(LieRow.__dataclass_fields__)
        rows = [[getattr(r, k) for k in header] for r in self.rows]
        return {"json": write_atomic(folder / "lie.json", self.to_json()),
                "csv": write_csv(folder / "lie.csv", header, rows)}


def per_image_norm(t: Tensor, mask: Tensor | None = None) -> Tensor:
    """``||t[b]||`` over all entries, or over the ``(h, w)`` positions in ``mask``: ``(B,)``."""
    if mask is not None and t.dim() >= 4 and not bool(mask.all()):
        t = t[..., mask]
    return torch.linalg.vector_norm(t.flatten(1), dim=1).double()
