"""The results of :func:`~equivision.robust.evaluate.evaluate_robustness`: one
:class:`RowResult` per row (clean, each attack, the per-image worst case) and the
:class:`RobustnessResult` that holds them, with its Markdown table, JSON and per-image files.

The result has one row for the clean images and one per attack. Each row holds

* ``undefended``: the task metric of the bare model on the row's images
  (``{"accuracy"}`` for classifiers, ``{"miou", "pixel_accuracy"}`` for segmenters,
  from the confusion summed over all images, ``ignore_index`` pixels left out; segmenters also
  get ``mean_image_miou``, the mean of the per-image mIoU);
* ``defended``: the metric of the defended prediction ``model(purify(x))``, worst case over
  ``repeats`` draws of a randomized defense (per image the draw with the lowest
  :func:`~equivision.metrics.per_image_score`: an image counts as correct only if
  every draw is correct; for segmentation the confusion of each image's worst draw is
  accumulated), and ``defended_single`` (the first draw only);
* ``attack_target``: ``"model"`` when the adversarial images were generated on the bare
  model and transferred (the paper's "standard" attacks: fgsm, ifgsm, pgd, mim, cw,
  houdini) or ``"defense"`` when the defense was in the loop (bpda, bpda-eot, full,
  adaptive); without a defense it is always ``"model"``;
* ``equivariance``: the mean :func:`~equivision.robust.defenses.equivariance_score` of the
  clean, attacked and restored (purified attacked) images (paper Table 4), with the
  defense's transforms, feature layer and pairing when it has them, else the default
  transforms on the config's ``feature_layer``; and the mean paired per-image changes
  ``"attacked - clean"`` and ``"restored - attacked"`` (None where not scored);
* ``seconds``: time spent on the row (attack + defended predictions + scores; the
  slowest process under ``torch.distributed``);
* ``intervals``: 95% confidence intervals ``{key: {metric: [low, high]}}`` of every metric
  (Wilson for accuracies, the bootstrap over images for segmentation figures;
  :mod:`equivision.robust.intervals`), and under ``"equivariance"`` the bootstrap
  intervals of every equivariance figure (the paired changes resampled per image);

Beyond the rows the result holds

* ``worst_case``: the **per-image worst case over the attack rows** (a row
  :data:`~equivision.robust.per_image.WORST_CASE`): an image counts as robust only if it
  survives every attack and, defended, every repeat
  (:class:`~equivision.robust.per_image.PerImageResults`); None without attacks;
* ``per_image``: the per-image scores of every row, written by
  :meth:`RobustnessResult.save_per_image` as JSON or CSV;
* ``checks``: the automatic checks (:mod:`equivision.robust.evaluation_checks`, level
  ``config.checks``), printed with their meaning by :meth:`RobustnessResult.report`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import write_atomic, write_csv
from .checks import CheckResult, checks_summary
from .per_image import PerImageResults

__all__ = ["RobustnessResult", "RowResult"]


@dataclass
class RowResult:
    """One row (clean or one attack) of a :class:`RobustnessResult`; see the module
    docstring for the fields. Metrics are None where they do not apply (no defense)."""

    name: str
    attack_target: str | None
    undefended: dict[str, float]
    defended: dict[str, float] | None
    defended_single: dict[str, float] | None
    equivariance: dict[str, float | None]
    seconds: float
    attack: str | None = None
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {"name": self.name, "attack_target": self.attack_target, "attack": self.attack,
                "undefended": self.undefended, "defended": self.defended,
                "defended_single": self.defended_single, "equivariance": self.equivariance,
                "seconds": self.seconds, "intervals": self.intervals}


@dataclass
class RobustnessResult:
    """Output of :func:`evaluate_robustness`.

    Attributes:
        task: ``"classification"`` or ``"segmentation"``.
        n_images: images evaluated (all processes together).
        rows: the clean row then one per attack.
        meta: settings (eps, steps, defense, repeats, world size, ...).
        seconds: wall time of the whole evaluation.
        worst_case: the per-image worst case over the attack rows (None without attacks).
        checks: the automatic checks.
        per_image: the per-image scores of every row.
    """

    task: str
    n_images: int
    rows: list[RowResult]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    worst_case: RowResult | None = None
    checks: list[CheckResult] = field(default_factory=list)
    per_image: PerImageResults | None = None

    @property
    def metric(self) -> str:
        """The headline metric: ``"accuracy"`` or ``"miou"``."""
        return "accuracy" if self.task == "classification" else "miou"

    def row(self, name: str) -> RowResult:
        """The row called ``name`` (``"clean"`` or an attack label)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def check(self, name: str) -> CheckResult:
        """The automatic check called ``name`` (``"randomness"``, ``"gradients"``, ...)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN written as None)."""
        out = {"task": self.task, "metric": self.metric, "n_images": self.n_images,
               "meta": self.meta, "seconds": self.seconds,
               "rows": [r.to_dict() for r in self.rows],
               "worst_case": None if self.worst_case is None else self.worst_case.to_dict(),
               "checks": [{"name": c.name, "flagged": c.flagged, "message": c.message,
                           "details": c.details} for c in self.checks]}
        return _json_safe(out)

    def table(self, worst_case: bool = False) -> str:
        """Markdown table: rows clean + attacks (+ the per-image worst case when
        ``worst_case``); columns target, undefended and defended metric with its 95%
        interval, equivariance score of clean / attacked / restored images."""
        seg = self.task == "segmentation"
        metric = "mIoU / pixel acc." if seg else "accuracy"
        head = (f"| row | attack target | undefended {metric} [95% CI] | defended {metric} "
                "[95% CI] | equiv. clean | equiv. attacked | equiv. restored |")
        lines = [head, "|---|---|---|---|---|---|---|"]
        rows = self.rows + ([self.worst_case] if worst_case and self.worst_case else [])
        for r in rows:
            eq = r.equivariance
            lines.append(f"| {r.name} | {r.attack_target or '-'} | "
                         f"{_cell(r, 'undefended', seg)} | {_cell(r, 'defended', seg)} | "
                         f"{_fmt(eq.get('clean'))} | {_fmt(eq.get('attacked'))} | "
                         f"{_fmt(eq.get('restored'))} |")
        return "\n".join(lines)

    def checks_summary(self) -> str:
        """The automatic checks, one line each, and what each raised flag means."""
        return checks_summary(self.checks)

    def report(self) -> str:
        """The table with the worst-case row, then the checks: what the CLI prints."""
        return f"{self.table(worst_case=True)}\n{self.checks_summary()}"

    def save_per_image(self, path: str | Path) -> Path:
        """Write the per-image results atomically: JSON (``{"task", "metric", "rows":
        [...]}``) for a ``.json`` path, else CSV (one line per image and row; columns
        ``index``, ``row``, the scores of each prediction kind and, for the worst-case
        lines, the row each came from)."""
        if self.per_image is None:
            raise ValueError("this result holds no per-image results")
        records = self.per_image.records()
        path = Path(path)
        if path.suffix.lower() == ".json":
            payload = {"task": self.task, "metric": self.metric, "n_images": self.n_images,
                       "records": records}
            return write_atomic(path, json.dumps(_json_safe(payload), indent=1))
        header = list(dict.fromkeys(k for rec in records for k in rec))
        return write_csv(path, header, ([rec.get(k) for k in header] for rec in records))


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cell(row: RowResult, key: str, seg: bool) -> str:
    """``value [low, high]`` of the row's headline metric(s) for ``key``."""
    m = getattr(row, key)
    if m is None:
        return "-"
    ci = row.intervals.get(key, {})

    def one(name: str) -> str:
        lo, hi = ci.get(name, [None, None])
        return _fmt(m[name]) + ("" if lo is None else f" [{_fmt(lo)}, {_fmt(hi)}]")

    return f"{one('miou')} / {one('pixel_accuracy')}" if seg else one("accuracy")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool, float)) or obj is None:
        return obj
    return str(obj)
