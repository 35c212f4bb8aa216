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

#: Metrics in the order tables and CSV files show them.
METRICS = (
    "invariance", "equivariance", "invariance_cosine", "equivariance_cosine", "mse", "l1",
    "nmse", "cosine", "activation",
)


@dataclass
class LayerResult:
    """Metrics of one layer under one transformation.

    ``exact`` is False when the transformation has no exact action on this layer
    (e.g. a 3 px shift on a stride-2 map); then ``metrics`` is empty and ``note``
    says why.
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

    def values(self, metric: str, transform: str) -> list[float | None]:
        """One value per layer (forward order); ``None`` where inexact or undefined."""
        out = []
        for layer in self.layers:
            r = self.get(transform, layer)
            out.append(r.metrics.get(metric) if r.exact else None)
        return out

    def part_summary(
        self, metrics: Sequence[str] = METRICS, transforms: Sequence[str] | None = None
    ) -> dict[str, dict[str, dict[str, float | None]]]:
        """``{part: {metric: mean}}`` averaged over layers and the given transforms
        (all by default), skipping inexact pairs and undefined values."""
        chosen = set(self.transforms if transforms is None else transforms)
        out: dict[str, dict[str, float | None]] = {}
        for part in PARTS:
            rs = [r for r in self.results if r.part == part and r.transform in chosen and r.exact]
            if not any(r.part == part for r in self.results):
                continue
            out[part] = {}
            for m in metrics:
                vals = [r.metrics[m] for r in rs if r.metrics.get(m) is not None]
                out[part][m] = sum(vals) / len(vals) if vals else None
        return out

    # ---- output --------------------------------------------------------------
    def table(
        self, metrics: Sequence[str] = ("invariance", "equivariance", "mse", "cosine")
    ) -> str:
        """A plain-text table: one row per layer, columns per metric, one block per
        transformation; inexact pairs show ``inexact``."""
        lines: list[str] = []
        head = f"{'#':>3} {'layer':<28} {'part':<6} {'shape':<14}" + "".join(
            f" {m[:12]:>12}" for m in metrics
        ) + "  const"
        for t in self.transforms:
            lines.append(f"== {t}  ({self.model}, {self.n_images} images)")
            lines.append(head)
            for layer in self.layers:
                r = self.get(t, layer)
                shape = "x".join(str(s) for s in r.shape)
                row = f"{r.index:>3} {r.layer[:28]:<28} {r.part:<6} {shape:<14}"
                if not r.exact:
                    row += f" {'inexact':>12}" + " " * 13 * (len(metrics) - 1)
                else:
                    row += "".join(f" {_fmt(r.metrics.get(m)):>12}" for m in metrics)
                row += f"  {r.n_constant}/{r.n_channels}" if r.n_channels else ""
                lines.append(row)
            lines.append("")
        for layer, why in self.meta.get("skipped", {}).items():
            lines.append(f"note: layer {layer} not measured ({why})")
        summary = self.part_summary(metrics)
        lines.append("== mean per part over all transformations")
        lines.append(f"{'part':<8}" + "".join(f" {m[:12]:>12}" for m in metrics))
        for part, vals in summary.items():
            lines.append(f"{part:<8}" + "".join(f" {_fmt(vals[m]):>12}" for m in metrics))
        return "\n".join(lines)

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
        w.writerow(["transform", "index", "layer", "part", "module", "shape", "stride", "exact",
                    *METRICS, "n_channels", "n_constant", "note"])
        for r in self.results:
            w.writerow([r.transform, r.index, r.layer, r.part, r.module,
                        "x".join(map(str, r.shape)), "x".join(f"{s:g}" for s in r.stride),
                        int(r.exact), *[_csv(r.metrics.get(m)) for m in METRICS],
                        r.n_channels, r.n_constant, r.note])
        return buf.getvalue()

    def plot(
        self, path: str | Path, metrics: Sequence[str] = ("invariance", "equivariance"),
        transforms: Sequence[str] | None = None, title: str | None = None,
    ) -> Path:
        """Measures against depth, one panel per transformation, parts shaded
        (like figures 4-7 of the learned-equivariance paper). Writes a PNG."""
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
        low = min([v for t in ts for m in metrics for v in self.values(m, t) if v is not None],
                  default=0.0)
        for ax, t in zip(axes.flat, ts):
            for i, p in enumerate(parts):
                ax.axvspan(i - 0.5, i + 0.5, color=shades.get(p, "white"), lw=0)
            for m in metrics:
                vals = [float("nan") if v is None else v for v in self.values(m, t)]
                ax.plot(depth, vals, marker="o", ms=3, label=m)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("layer depth")
            ax.set_ylim(min(-0.05, low - 0.05), 1.05)
            ax.grid(alpha=0.3)
        for p in dict.fromkeys(parts):
            first = parts.index(p)
            axes.flat[0].text(first - 0.4, 1.0, p[0], fontsize=7, va="top", color="0.35")
        for ax in list(axes.flat)[len(ts):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(title or f"{self.model}: measures per layer ({self.n_images} images)",
                     fontsize=10)
        fig.tight_layout()
        return fig

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


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _csv(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"
