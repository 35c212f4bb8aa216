"""The exactness analyzer's answer: one row per layer (:class:`LayerExactness`) and the
network's two-part verdict (:class:`ExactnessReport`): the sampling geometry aligned or not,
the weights constrained or not; "exact" means both."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ALIGNED", "CANNOT_VERIFY", "CONSTRAINED", "EXACT", "GROUPS", "MISALIGNED", "NOT_EXACT",
    "UNCONSTRAINED", "ExactnessReport", "LayerExactness", "Pair",
]

EXACT = "exact"
NOT_EXACT = "not exact"
CANNOT_VERIFY = "cannot verify"
ALIGNED = "aligned"
MISALIGNED = "misaligned"
CONSTRAINED = "constrained"
UNCONSTRAINED = "unconstrained"
#: groups the analyzer understands: p4 (rotations by 90°), p4m (rotations and flips) and
#: "flip" (horizontal reflection only, which looks at the width axis alone)
GROUPS = ("p4", "p4m", "flip")

Pair = tuple[int, int]


def _tri(values: Iterable[bool | None]) -> str:
    """``"misaligned"`` if any value is False, else ``"cannot verify"`` if any is None, else
    ``"aligned"``."""
    seen = list(values)
    if any(v is False for v in seen):
        return MISALIGNED
    return CANNOT_VERIFY if any(v is None for v in seen) else ALIGNED


# ---- report ----------------------------------------------------------------------------------
@dataclass
class LayerExactness:
    """One spatial layer (or tensor function) met during the trace, in forward order.

    Attributes:
        name: module name (``"features.conv1"``); a second call of a shared module gets
            ``" (call 2)"``; tensor functions called in a ``forward`` are named
            ``"<module>:<function>()"``.
        type: class name of the module, or ``"function"``.
        kind: ``"conv"``, ``"pool"``, ``"adaptive pool"``, ``"global pool"``, ``"padding"``,
            ``"slice"``, ``"pointwise"`` (spatial size unchanged), ``"reshape"`` or
            ``"unknown"``.
        input_size: ``(H, W)`` of the layer's input.
        output_size: ``(H, W)`` of its output, ``None`` when the output is not a map.
        kernel_size, stride, padding, dilation: per axis ``(height, width)``; ``padding``
            is the padding before the map (top, left) when the two sides differ.
        remainder: ``(r_h, r_w)``, ``(i + 2p - k_eff) mod s`` per axis (for slices: the
            pixels left out at the end minus those left out at the start).
        exact: the sampling geometry: ``True`` (aligned: keeps exact equivariance given
            equivariant weights), ``False`` (misaligned: breaks it) or ``None`` (cannot
            verify).
        reason: why, in words.
        weights: the weights: ``True`` (constrained to the group, or no weights),
            ``False`` (unconstrained: a plain kernel that is not symmetric) or ``None``
            (cannot verify); see :mod:`equivision.gcnn.weights`.
        weights_reason: why, in words; empty for a layer without weights.
        lowpass: for convolutions, whether the kernel is a fixed blur (depthwise,
            non-negative, each kernel summing to 1: antialiased-cnns' BlurPool), which
            subsamples without aliasing; ``None`` when not known. Used by the translation
            mode (:mod:`equivision.gcnn.translation`).
    """

    name: str
    type: str
    kind: str
    input_size: Pair
    output_size: Pair | None = None
    kernel_size: Pair | None = None
    stride: Pair | None = None
    padding: Pair | None = None
    dilation: Pair | None = None
    remainder: Pair | None = None
    exact: bool | None = True
    reason: str = ""
    weights: bool | None = True
    weights_reason: str = ""
    lowpass: bool | None = None


@dataclass
class ExactnessReport:
    """Result of :func:`analyze_exactness`.

    Attributes:
        input_size: ``(H, W)`` of the network input that was analysed.
        group: ``"p4"``, ``"p4m"`` or ``"flip"``.
        layers: one :class:`LayerExactness` per spatial layer, in forward order.
        notes: network-level remarks (e.g. a non-square input under rotations).
    """

    input_size: Pair
    group: str
    layers: list[LayerExactness] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> str:
        """The sampling geometry: ``"aligned"`` if every layer's grid is, ``"misaligned"`` if
        any layer's is not (even when others cannot be verified), else ``"cannot verify"``."""
        return _tri(row.exact for row in self.layers)

    @property
    def weights(self) -> str:
        """The weights: ``"constrained"`` if every layer's are (or it has none),
        ``"unconstrained"`` if any layer's are not, else ``"cannot verify"``."""
        return {ALIGNED: CONSTRAINED, MISALIGNED: UNCONSTRAINED}.get(
            _tri(row.weights for row in self.layers), CANNOT_VERIFY)

    @property
    def verdict(self) -> str:
        """``"exact"`` when the geometry is aligned and the weights constrained; ``"not
        exact"`` when the geometry is misaligned or the weights unconstrained (even when other
        layers cannot be verified); else ``"cannot verify"``."""
        if self.geometry == MISALIGNED or self.weights == UNCONSTRAINED:
            return NOT_EXACT
        if self.geometry == ALIGNED and self.weights == CONSTRAINED:
            return EXACT
        return CANNOT_VERIFY

    @property
    def exact(self) -> bool | None:
        """``True`` / ``False`` / ``None`` for the verdicts exact / not exact / cannot verify."""
        return {EXACT: True, NOT_EXACT: False}.get(self.verdict)

    @property
    def breaking(self) -> list[LayerExactness]:
        """The layers whose sampling grid is misaligned or whose weights are unconstrained."""
        return [row for row in self.layers if row.exact is False or row.weights is False]

    @property
    def unverified(self) -> list[LayerExactness]:
        """The layers the analyzer cannot reason about (geometry or weights)."""
        return [row for row in self.layers if row not in self.breaking
                and (row.exact is None or row.weights is None)]

    def summary(self) -> str:
        """One line: the verdict, its two parts and the layers responsible for it."""
        h, w = self.input_size
        head = (f"{self.group} equivariance at input {h}x{w}: {self.verdict} (sampling "
                f"geometry: {self.geometry}; weights: {self.weights})")
        for word, rows in (("broken by ", self.breaking), ("unverified: ", self.unverified)):
            if rows:
                return head + f" ({word}" + ", ".join(r.name for r in rows[:6]) + (
                    ", ..." if len(rows) > 6 else "") + ")"
        return head

    def table(self, all_layers: bool = True) -> str:
        """Aligned text table, one row per layer.

        Args:
            all_layers: ``False`` keeps only the rows that matter for the verdict: layers
                that change the spatial size, subsample, or are not exact.
        """

        def pair(v: Pair | None) -> str:
            if v is None:
                return "-"
            return str(v[0]) if v[0] == v[1] else f"{v[0]},{v[1]}"

        def size(v: Pair | None) -> str:
            return "-" if v is None else f"{v[0]}x{v[1]}"

        mark = {True: "yes", False: "NO", None: "?"}
        header = ("layer", "type", "in", "out", "k", "s", "p", "d", "r", "grid", "weights",
                  "reason")
        rows = [header]
        for row in self.layers:
            if not all_layers and row.kind == "pointwise" and row.exact is True and (
                    row.weights is True):
                continue
            why = "; ".join(r for r in (row.reason, row.weights_reason) if r)
            rows.append((row.name, row.type, size(row.input_size), size(row.output_size),
                         pair(row.kernel_size), pair(row.stride), pair(row.padding),
                         pair(row.dilation), pair(row.remainder), mark[row.exact],
                         mark[row.weights] if row.weights_reason else "-", why))
        widths = [max(len(r[c]) for r in rows) for c in range(len(header) - 1)]
        lines = []
        for n, r in enumerate(rows):
            lines.append("  ".join(v.ljust(widths[c]) for c, v in enumerate(r[:-1]))
                         + "  " + r[-1])
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        lines = [line.rstrip() for line in lines]
        lines.append(f"sampling geometry: {self.geometry}")
        lines.append(f"weights: {self.weights}")
        lines.append(f"verdict: {self.summary()}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary (tuples become lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {
            "input_size": list(self.input_size),
            "group": self.group,
            "verdict": self.verdict,
            "geometry": self.geometry,
            "weights": self.weights,
            "notes": list(self.notes),
            "layers": [plain(asdict(row)) for row in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return self.table()

