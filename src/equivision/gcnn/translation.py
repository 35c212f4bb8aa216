"""Translation mode: which integer input shifts each layer of a plain CNN is exactly
equivariant to, and where subsampling aliases (Zhang 2019, "Making convolutional networks
shift-invariant again").

The same tracer as the rotation analyzer (:func:`~equivision.gcnn.exactness.analyze_exactness`)
reads every layer's geometry; this module turns the rows into a translation table:

* A layer's output is equivariant to an input shift ``t`` (per axis) exactly when ``t`` is a
  multiple of its **cumulative stride** ``S`` (the product of the strides of every
  subsampling layer up to it, divided by every upsampling factor): the output then moves by
  ``t / S`` whole pixels. Other shifts move the content by a fraction of an output pixel,
  which a subsampled map cannot represent. Once a map has been subsampled, upsampling it
  again does not bring the lost shifts back: the exact shifts of a layer are the multiples of
  the least common multiple of the numerators of every cumulative stride ``p / q`` up to it.
* "Exact" holds away from the borders (zero padding and zero fill enter at the edges); with
  circular padding and circular shifts, and ``S`` dividing the input size, it holds
  everywhere.
* A stride-``s`` layer **aliases** when it subsamples without a low-pass filter first: max
  pooling, a strided learned convolution, a strided slice. Average pooling with a window at
  least as large as its stride (a box filter) and a fixed blur convolution
  (:func:`~equivision.gcnn.weights.is_lowpass`, antialiased-cnns' BlurPool) do not; their
  outputs change smoothly under the shifts that are not multiples of ``S``.
* Global pooling makes the output invariant (up to the borders); a position-dependent
  tensor breaks translation equivariance; layers the tracer cannot read make the verdict
  "cannot verify", never "exact".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from torch import Tensor, nn

from .exactness import (
    CANNOT_VERIFY,
    EXACT,
    NOT_EXACT,
    LayerExactness,
    infer_in_channels,
    parse_size,
    trace,
)
from .weights import WeightJudge

__all__ = ["TranslationLayer", "TranslationReport", "analyze_translation"]

Pair = tuple[int, int]
_MAX_POOLS = ("MaxPool", "max_pool", "LPPool", "lp_pool")


@dataclass
class TranslationLayer:
    """One layer of the translation table.

    Attributes:
        name, type, kind, input_size, output_size: as in
            :class:`~equivision.gcnn.exactness.LayerExactness`.
        stride: the layer's own ``(H, W)`` subsampling factor (``< 1`` for upsampling).
        cumulative: the cumulative stride ``(S_h, S_w)`` of the layer's output.
        shifts: the input shifts it is exactly equivariant to, per axis: multiples of
            these; ``None`` when it cannot be verified or no shift is exact.
        aliasing: ``True`` when the layer subsamples without a low-pass filter,
            ``False`` when it does not subsample or filters first, ``None`` unknown.
        exact: ``True`` (equivariant to the shifts above), ``False`` (a position-dependent
            layer: to no shift), ``None`` (cannot verify).
        reason: why, in words.
    """

    name: str
    type: str
    kind: str
    input_size: Pair
    output_size: Pair | None
    stride: tuple[Fraction, Fraction]
    cumulative: tuple[Fraction, Fraction]
    shifts: Pair | None
    aliasing: bool | None
    exact: bool | None
    reason: str = ""


@dataclass
class TranslationReport:
    """Result of :func:`analyze_translation`: the table and the network's verdict."""

    input_size: Pair
    layers: list[TranslationLayer] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"not exact"`` if a layer is position-dependent, ``"cannot verify"`` if a layer
        cannot be read, else ``"exact"`` (for the shifts in :attr:`shifts`)."""
        if any(row.exact is False for row in self.layers):
            return NOT_EXACT
        if any(row.exact is None for row in self.layers):
            return CANNOT_VERIFY
        return EXACT

    @property
    def shifts(self) -> Pair | None:
        """The input shifts the output is exactly equivariant to: multiples of these."""
        if self.verdict != EXACT:
            return None
        return self.layers[-1].shifts if self.layers else (1, 1)

    @property
    def aliasing(self) -> list[TranslationLayer]:
        """The layers that subsample without a low-pass filter."""
        return [row for row in self.layers if row.aliasing]

    def to_dict(self) -> dict:
        """Plain values for JSON: input size, verdict, exact shifts, aliasing layer names
        and one dict per layer (strides as strings such as ``"1/2"``)."""

        def plain(row: TranslationLayer) -> dict:
            out = {k: getattr(row, k) for k in ("name", "type", "kind", "exact", "reason",
                                                 "aliasing")}
            out["input_size"] = list(row.input_size)
            out["output_size"] = None if row.output_size is None else list(row.output_size)
            out["stride"] = [str(v) for v in row.stride]
            out["cumulative"] = [str(v) for v in row.cumulative]
            out["shifts"] = None if row.shifts is None else list(row.shifts)
            return out

        return {"input_size": list(self.input_size), "verdict": self.verdict,
                "shifts": None if self.shifts is None else list(self.shifts),
                "aliasing": [row.name for row in self.aliasing],
                "layers": [plain(row) for row in self.layers]}

    def summary(self) -> str:
        """One line: the verdict, the exact shifts and the aliasing layers."""
        h, w = self.input_size
        head = f"translation equivariance at input {h}x{w}: {self.verdict}"
        if self.shifts is not None:
            head += f" for shifts that are multiples of {self.shifts[0]} (H), {self.shifts[1]} (W)"
        if self.aliasing:
            head += "; aliasing at " + ", ".join(row.name for row in self.aliasing)
        return head

    def table(self) -> str:
        """Aligned text table, one row per layer, then the verdict."""

        def frac(v: tuple[Fraction, Fraction]) -> str:
            return str(v[0]) if v[0] == v[1] else f"{v[0]},{v[1]}"

        mark = {True: "yes", False: "NO", None: "?"}
        rows = [("layer", "type", "in", "out", "s", "S", "shifts", "aliasing", "reason")]
        for r in self.layers:
            rows.append((r.name, r.type, f"{r.input_size[0]}x{r.input_size[1]}",
                         "-" if r.output_size is None else
                         f"{r.output_size[0]}x{r.output_size[1]}", frac(r.stride),
                         frac(r.cumulative), "-" if r.shifts is None else
                         f"{r.shifts[0]},{r.shifts[1]}", mark[r.aliasing], r.reason))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        lines = ["  ".join(v.ljust(widths[c]) for c, v in enumerate(r[:-1])) + "  " + r[-1]
                 for r in rows]
        return "\n".join([line.rstrip() for line in lines] + [f"verdict: {self.summary()}"])

    def __str__(self) -> str:
        return self.table()


def _step(row: LayerExactness) -> tuple[tuple[Fraction, Fraction], bool | None, bool | None, str]:
    """``(stride, aliasing, exact, reason)`` of one traced row under translations."""
    one = (Fraction(1), Fraction(1))
    if row.kind in ("upsample", "transposed conv") and row.exact is not None and row.stride:
        return (tuple(Fraction(1, max(1, s)) for s in row.stride), False, True,  # type: ignore
                "upsampling divides the cumulative stride")
    if row.kind in ("conv", "pool", "slice") and row.stride is not None and row.exact is not None:
        stride = (Fraction(row.stride[0]), Fraction(row.stride[1]))
        if stride == one:
            return one, False, True, "stride 1"
        if row.kind == "pool" and not any(m in row.type + row.name for m in _MAX_POOLS):
            box = row.kernel_size is not None and all(
                k >= s for k, s in zip(row.kernel_size, row.stride))
            return stride, not box, True, ("average pooling: a box filter before subsampling"
                                           if box else "average pooling with gaps: aliases")
        if row.kind == "conv" and row.lowpass:
            return stride, False, True, "fixed blur before subsampling (low-pass)"
        return stride, True, True, "subsamples without a low-pass filter: aliases"
    if row.kind == "global pool":
        return one, False, True, "global pooling: invariant (up to the borders)"
    if row.kind in ("pointwise", "padding"):
        return one, False, True, "pixel by pixel" if row.kind == "pointwise" else "padding"
    if row.kind == "reshape" and row.exact:
        return one, False, True, row.reason
    if row.kind == "adaptive pool" and row.output_size is not None and all(
            i % o == 0 for i, o in zip(row.input_size, row.output_size)):
        stride = tuple(Fraction(i // o) for i, o in zip(row.input_size, row.output_size))
        return stride, stride != one, True, "adaptive pooling with equal windows"  # type: ignore
    if row.kind == "positional":
        return one, None, False, row.reason
    return one, None, None, row.reason or "cannot verify"


class _ShiftJudge(WeightJudge):
    """Under translations only a constant tensor is invariant."""

    def invariant(self, t: Tensor) -> tuple[bool | None, str]:
        value = self.value(t)
        if value.device.type == "meta":
            return None, "its values are not available (meta tensor)"
        flat = value.detach().flatten()
        if flat.numel() == 0 or bool((flat == flat[0]).all()):
            return True, ""
        return False, "it is not constant, so it changes under shifts"


def analyze_translation(model: nn.Module, input_size: int | tuple[int, int],
                        in_channels: int | None = None) -> TranslationReport:
    """Which integer shifts each layer of ``model`` is exactly equivariant to at this input
    size, and which layers alias.

    Traces the model once with the rotation analyzer's tracer (whose rows give every layer's
    stride; a position-dependent tensor counts unless it is constant) and accumulates the
    strides.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)`` images.
        input_size: ``H`` (square) or ``(H, W)``.
        in_channels: input channels; inferred if ``None``.

    Returns:
        A :class:`TranslationReport`: ``verdict``, ``shifts``, ``aliasing`` and ``table()``.
    """
    channels = infer_in_channels(model) if in_channels is None else in_channels
    traced = trace(model, parse_size(input_size), channels, "flip",
                    judge=_ShiftJudge(model, "flip"))
    report = TranslationReport(traced.input_size)
    total = (Fraction(1), Fraction(1))
    period = (1, 1)   # every map so far must move by whole pixels: lcm of the numerators
    for row in traced.layers:
        stride, aliasing, exact, reason = _step(row)
        total = (total[0] * stride[0], total[1] * stride[1])
        period = (math.lcm(period[0], total[0].numerator),
                  math.lcm(period[1], total[1].numerator))
        shifts = period if exact else None
        report.layers.append(TranslationLayer(row.name, row.type, row.kind, row.input_size,
                                              row.output_size, stride, total, shifts,
                                              aliasing, exact, reason))
    return report
