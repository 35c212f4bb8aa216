"""The measurement report: a table for the terminal, JSON, CSV and a depth plot."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import png_bytes, save_png, write_atomic, write_report_set
from .parts import PARTS

#: Metrics in the order tables and CSV files show them; ``redundancy`` is the layer's
#: channel-redundancy baseline for Eq. 7 (the same for every transformation).
METRICS = (
    "invariance", "equivariance", "invariance_cosine", "equivariance_cosine", "mse", "l1",
    "nmse", "cosine", "activation", "redundancy",
)
#: Where a result's numbers come from: the measured model, or the same architecture at
#: random initialisation (``measure(..., random_init=True)``).
SOURCES = ("trained", "random_init")


@dataclass
class LayerResult:
    """Metrics of one layer under one transformation.

    ``exact`` is False when the transformation has no exact action on this layer
    (e.g. a 3 px shift on a stride-2 map); then ``metrics`` is empty and ``note``
    says why.

    ``ci`` holds the 95% bootstrap interval ``[low, high]`` of each metric (None where
    undefined; empty when intervals were off); ``random_init`` / ``random_init_ci`` the
    same architecture's metrics and intervals at random initialisation (empty unless
    measured); ``per_channel["match"]`` the channel ``c'`` of ``g·f(X)`` that channel
    ``c`` of ``f(gX)`` matches best (Eq. 7's argmax: the learned equivariant groups).
    """

    transform: str
    layer: str
    index: int
    part: str
    module: str
    shape: list[int]
    stride: list[float]
    exact: bool
    metrics: dict[str, float | None] = field(default_factory=dict)
    n_channels: int = 0
    n_constant: int = 0
    per_channel: dict[str, list[float | None]] = field(default_factory=dict)
    note: str = ""
    ci: dict[str, list[float] | None] = field(default_factory=dict)
    random_init: dict[str, float | None] = field(default_factory=dict)
    random_init_ci: dict[str, list[float] | None] = field(default_factory=dict)


@dataclass
class Report:
    """Everything one measurement produced.

    ``results`` holds one :class:`LayerResult` per (transformation, layer); layers are
    in forward order with their depth ``index`` and part.
    """

    model: str
    transforms: list[str]
    layers: list[str]
    results: list[LayerResult]
    n_images: int
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- access --------------------------------------------------------------
    def get(self, transform: str, layer: str) -> LayerResult:
        for r in self.results:
            if r.transform == transform and r.layer == layer:
                return r
        raise KeyError(f"no result for transform {transform!r} and layer {layer!r}")

    def values(self, metric: str, transform: str, source: str = "trained"
               ) -> list[float | None]:
        """One value per layer (forward order); ``None`` where inexact or undefined.
        ``source="random_init"`` gives the random-initialisation baseline's."""
        return [_numbers(self.get(transform, layer), source).get(metric)
                for layer in self.layers]

    def intervals(self, metric: str, transform: str, source: str = "trained"
                  ) -> list[list[float] | None]:
        """The 95% interval ``[low, high]`` of :meth:`values` per layer (None where
        there is none)."""
        return [_intervals(self.get(transform, layer), source).get(metric)
                for layer in self.layers]

    @property
    def has_random_init(self) -> bool:
        """Whether the random-initialisation baseline was measured."""
        return any(r.random_init for r in self.results)

    def part_summary(
        self, metrics: Sequence[str] = METRICS, transforms: Sequence[str] | None = None,
        source: str = "trained",
    ) -> dict[str, dict[str, dict[str, float | None]]]:
        """``{part: {metric: mean}}`` averaged over layers and the given transforms
        (all by default), skipping inexact pairs and undefined values; ``source`` as in
        :meth:`values`."""
        chosen = set(self.transforms if transforms is None else transforms)
        out: dict[str, dict[str, float | None]] = {}
        for part in PARTS:
            rs = [r for r in self.results if r.part == part and r.transform in chosen and r.exact]
            if not any(r.part == part for r in self.results):
                continue
            out[part] = {}
            for m in metrics:
                vals = [v for r in rs if (v := _numbers(r, source).get(m)) is not None]
                out[part][m] = sum(vals) / len(vals) if vals else None
        return out

    # ---- output --------------------------------------------------------------
    def table(
        self, metrics: Sequence[str] = ("invariance", "equivariance", "mse", "cosine")
    ) -> str:
        """A plain-text table: one row per layer, one block per transformation; per
        metric the value and half the width of its 95% interval (``±``), then the
        channel-redundancy baseline, then (when measured) the random-init baseline's
        values (``rand:``); inexact pairs show ``inexact``."""
        metrics = [m for m in metrics if m != "redundancy"]
        rand = [*metrics, "redundancy"] if self.has_random_init else []
        width = 15 * (len(metrics) + 1) + 11 * len(rand)
        head = (f"{'#':>3} {'layer':<28} {'part':<6} {'shape':<14}"
                + "".join(f" {m[:14]:>14}" for m in [*metrics, "redundancy"])
                + "".join(f" {'rand:' + m[:5]:>10}" for m in rand) + "  const")
        lines: list[str] = []
        for t in self.transforms:
            lines.append(f"== {t}  ({self.model}, {self.n_images} images)")
            lines.append(head)
            for layer in self.layers:
                r = self.get(t, layer)
                shape = "x".join(str(s) for s in r.shape)
                row = f"{r.index:>3} {r.layer[:28]:<28} {r.part:<6} {shape:<14}"
                if not r.exact:
                    row += f" {'inexact':>14}" + " " * (width - 15)
                else:
                    row += "".join(f" {_fmt_ci(r.metrics.get(m), r.ci.get(m)):>14}"
                                   for m in [*metrics, "redundancy"])
                    row += "".join(f" {_fmt(r.random_init.get(m), 3):>10}" for m in rand)
                row += f"  {r.n_constant}/{r.n_channels}" if r.n_channels else ""
                lines.append(row)
            lines.append("")
        lines += self._table_notes()
        shown = [*metrics, "redundancy"]
        lines.append("== mean per part over all transformations"
                     + (" (rand: the random-init baseline)" if rand else ""))
        lines.append(f"{'part':<8}" + "".join(f" {m[:12]:>12}" for m in shown)
                     + "".join(f" {'rand:' + m[:5]:>10}" for m in rand))
        summary = self.part_summary(shown)
        baseline = self.part_summary(rand, source="random_init") if rand else {}
        for part, vals in summary.items():
            lines.append(f"{part:<8}" + "".join(f" {_fmt(vals[m]):>12}" for m in shown)
                         + "".join(f" {_fmt(baseline[part][m], 3):>10}" for m in rand))
        return "\n".join(lines)

    def _table_notes(self) -> list[str]:
        """The lines under the table's blocks: skipped layers, what ``±``, redundancy and
        ``rand:`` mean."""
        lines = [f"note: layer {layer} not measured ({why})"
                 for layer, why in self.meta.get("skipped", {}).items()]
        ci = self.meta.get("ci")
        if ci:
            lines.append(f"± half the {ci['level']:.0%} bootstrap interval over images "
                         f"({ci['groups']} image groups, {ci['replicates']} replicates); "
                         "the files give both bounds")
        lines.append("redundancy: mean over channels of the best correlation with another "
                     "channel of the same map (no transformation), the level Eq. 7's max "
                     "reaches without equivariance")
        info = self.meta.get("random_init")
        if info:
            kept = info.get("kept_trained") or []
            lines.append(f"rand: the same architecture at random initialisation (seed "
                         f"{info['seed']}, reset_parameters of every module)"
                         + (f"; kept as trained (no reset method): {', '.join(kept)}"
                            if kept else ""))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "transforms": self.transforms, "layers": self.layers,
            "n_images": self.n_images, "meta": self.meta,
            "results": [asdict(r) for r in self.results],
            "parts": self.part_summary(),
        }

    def json_text(self) -> str:
        """The report as indented JSON (what :meth:`save_json` writes)."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save_json(self, path: str | Path) -> Path:
        write_atomic(path, self.json_text())
        return Path(path)

    @classmethod
    def load_json(cls, path: str | Path) -> Report:
        try:
            d = json.loads(Path(path).read_text())
            results = [LayerResult(**r) for r in d["results"]]
            return cls(d["model"], d["transforms"], d["layers"], results, d["n_images"],
                       d.get("meta", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not an equivision report JSON file: {err}") from None

    def save_csv(self, path: str | Path) -> Path:
        write_atomic(path, self.csv_text())
        return Path(path)

    def csv_text(self) -> str:
        """One CSV row per (transformation, layer) (what :meth:`save_csv` writes)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        bounds = [f"{m}_ci_{end}" for m in METRICS for end in ("low", "high")]
        w.writerow(["transform", "index", "layer", "part", "module", "shape", "stride", "exact",
                    *METRICS, "n_channels", "n_constant", "note", *bounds,
                    *[f"random_init_{m}" for m in METRICS], *[f"random_init_{b}" for b in bounds]])
        for r in self.results:
            w.writerow([r.transform, r.index, r.layer, r.part, r.module,
                        "x".join(map(str, r.shape)), "x".join(f"{s:g}" for s in r.stride),
                        int(r.exact), *[_csv(r.metrics.get(m)) for m in METRICS],
                        r.n_channels, r.n_constant, r.note, *_csv_bounds(r.ci),
                        *[_csv(r.random_init.get(m)) for m in METRICS],
                        *_csv_bounds(r.random_init_ci)])
        return buf.getvalue()

    def plot(
        self, path: str | Path, metrics: Sequence[str] = ("invariance", "equivariance"),
        transforms: Sequence[str] | None = None, title: str | None = None,
    ) -> Path:
        """Measures against depth, one panel per transformation, parts shaded
        (like figures 4-7 of the learned-equivariance paper), with their 95% intervals
        as bands, the random-init baseline dashed in the same colour and the
        channel-redundancy baseline dotted. Writes a PNG."""
        return save_png(self.figure(metrics, transforms, title), path)

    def figure(
        self, metrics: Sequence[str] = ("invariance", "equivariance"),
        transforms: Sequence[str] | None = None, title: str | None = None,
    ) -> Any:
        """The matplotlib figure of :meth:`plot`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ts = list(self.transforms if transforms is None else transforms)
        ncols = min(4, len(ts))
        nrows = math.ceil(len(ts) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False,
                                 sharey=True)
        depth = list(range(len(self.layers)))
        parts = [self.get(ts[0], layer).part for layer in self.layers]
        shades = {"Early": "#f2f2f2", "Middle": "#e2e2e2", "Late": "#d2d2d2", "Pool": "#c4d7ec",
                  "Final": "#f4dcc4"}
        sources = SOURCES if self.has_random_init else SOURCES[:1]
        low = min([v for t in ts for m in [*metrics, "redundancy"] for src in sources
                   for v in self.values(m, t, src) if v is not None], default=0.0)
        for ax, t in zip(axes.flat, ts):
            for i, p in enumerate(parts):
                ax.axvspan(i - 0.5, i + 0.5, color=shades.get(p, "white"), lw=0)
            self._draw_panel(ax, t, metrics, depth)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("layer depth")
            ax.set_ylim(min(-0.05, low - 0.05), 1.05)
            ax.grid(alpha=0.3)
        for p in dict.fromkeys(parts):
            first = parts.index(p)
            axes.flat[0].text(first - 0.4, 1.0, p[0], fontsize=7, va="top", color="0.35")
        for ax in list(axes.flat)[len(ts):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.suptitle(title or f"{self.model}: measures per layer ({self.n_images} images)",
                     fontsize=10)
        fig.tight_layout()
        return fig

    def _draw_panel(self, ax: Any, t: str, metrics: Sequence[str], depth: list[int]) -> None:
        """One transformation's curves: each metric (solid, its interval as a band), its
        random-init baseline (dashed), and the redundancy baselines (dotted)."""
        def nan(vals: list) -> list[float]:
            return [float("nan") if v is None else v for v in vals]

        rand = self.has_random_init
        for i, m in enumerate(metrics):
            color = f"C{i}"
            ax.plot(depth, nan(self.values(m, t)), marker="o", ms=3, color=color, label=m)
            bands = self.intervals(m, t)
            ax.fill_between(depth, nan([b and b[0] for b in bands]),
                            nan([b and b[1] for b in bands]), color=color, alpha=0.2, lw=0)
            if rand:
                ax.plot(depth, nan(self.values(m, t, "random_init")), ls="--", marker="x",
                        ms=3, color=color, alpha=0.8, label=f"{m}, random init")
        ax.plot(depth, nan(self.values("redundancy", t)), ls=":", color="0.25",
                label="channel redundancy")
        if rand:
            ax.plot(depth, nan(self.values("redundancy", t, "random_init")), ls=":",
                    color="0.6", label="channel redundancy, random init")

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.csv`` and ``report.png`` into ``out_dir`` as one
        set (:func:`equivision.io.write_report_set`): after a failure (disk full,
        read-only folder) the folder holds the old set unchanged, never old and new
        files mixed. Other files in ``out_dir`` are left alone."""
        json_name, csv_name, png_name = REPORT_FILES
        content = {json_name: self.json_text().encode(), csv_name: self.csv_text().encode()}
        if plot:
            content[png_name] = png_bytes(self.figure())
        paths = write_report_set(out_dir, content)
        return {name.split(".")[1]: path for name, path in paths.items()}


#: the files :meth:`Report.save` writes
REPORT_FILES = ("report.json", "report.csv", "report.png")


def _numbers(r: LayerResult, source: str) -> dict[str, float | None]:
    """A result's metrics from ``source`` (:data:`SOURCES`); empty where inexact."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not r.exact:
        return {}
    return r.metrics if source == "trained" else r.random_init


def _intervals(r: LayerResult, source: str) -> dict[str, list[float] | None]:
    """A result's intervals from ``source``; empty where inexact."""
    if not _numbers(r, source):
        return {}
    return r.ci if source == "trained" else r.random_init_ci


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_ci(v: float | None, ci: list[float] | None) -> str:
    """``value±half-width`` of the interval (the value alone without one)."""
    if v is None or ci is None:
        return _fmt(v)
    return f"{v:.4f}±{(ci[1] - ci[0]) / 2:.4f}"[:14]


def _csv(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _csv_bounds(ci: dict[str, list[float] | None]) -> list[str]:
    """Low and high bound of every metric's interval (empty cells where none)."""
    out: list[str] = []
    for m in METRICS:
        b = ci.get(m)
        out += [_csv(b[0]), _csv(b[1])] if b else ["", ""]
    return out
