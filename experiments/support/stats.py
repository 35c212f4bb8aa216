"""Rank correlation between learned equivariance and accuracy (paper section 4.2, Fig. 4).

``spearman`` is Spearman's rank correlation coefficient: the Pearson correlation of the
ranks, ties getting their average rank (as ``scipy.stats.spearmanr``), with no SciPy
dependency. ``spearman_by_part`` correlates, over a set of models, the per-part mean of a
measure (``Report.part_summary``) with the models' accuracies. Experiment support for
``experiments/learned_equivariance.py`` (imported as ``support.stats``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from equivision.measure.parts import PARTS
from equivision.measure.report import METRICS, Report

__all__ = ["rankdata", "pearson", "spearman", "spearman_by_part"]


def _floats(name: str, values: Sequence[float]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold numbers, got {v!r}") from None
        if math.isnan(f):
            raise ValueError(f"{name} holds NaN; drop undefined values first")
        out.append(f)
    return out


def rankdata(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; tied values get the mean of the ranks they span."""
    xs = _floats("values", values)
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # ranks i+1 .. j+1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length sequences; NaN if either is constant."""
    xs, ys = _floats("x", x), _floats("y", y)
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} vs {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(xs)}")
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    dx = [v - mx for v in xs]
    dy = [v - my for v in ys]
    sxx = math.fsum(v * v for v in dx)
    syy = math.fsum(v * v for v in dy)
    if sxx == 0 or syy == 0:
        return math.nan
    r = math.fsum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (equal length >= 2).

    The Pearson correlation of the ranks, ties getting average ranks (equal to
    ``scipy.stats.spearmanr(x, y).statistic``). Returns NaN when ``x`` or ``y`` is constant.

    Raises:
        ValueError: different lengths, fewer than 2 pairs, NaN or non-numeric values.
    """
    xs, ys = _floats("x", x), _floats("y", y)
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} vs {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(xs)}")
    return pearson(rankdata(xs), rankdata(ys))


def spearman_by_part(
    reports: Sequence[Report],
    accuracies: Sequence[float],
    metric: str = "equivariance",
    transforms: Sequence[str] | None = None,
) -> dict[str, float]:
    """Spearman correlation, over models, between each part's mean ``metric`` and accuracy.

    For every model (one :class:`~equivision.measure.report.Report` each, in the same order
    as ``accuracies``), ``report.part_summary([metric], transforms)[part][metric]`` is the
    mean of ``metric`` over the part's layers and the chosen transformations (all of the
    report's by default; name e.g. the shift transforms for translation equivariance).

    Args:
        reports: one report per model.
        accuracies: one accuracy per model.
        metric: any metric of the reports, e.g. ``"equivariance"`` or ``"invariance"``.
        transforms: transformation names to average over (None: each report's all).

    Raises:
        ValueError: an unknown metric, a transformation missing from a report, or a
            different number of reports and accuracies.

    Returns:
        ``{part: rho}`` for the parts (in the order Early, Middle, Late, Pool, Final) that
        some report has. Models whose value for a part is undefined (the part is missing,
        or every pair in it inexact) are left out of that part's correlation; a part with
        fewer than 2 models left, or a constant column, gets NaN.
    """
    reports = list(reports)
    accs = _floats("accuracies", accuracies)
    if len(reports) != len(accs):
        raise ValueError(
            f"got {len(reports)} reports but {len(accs)} accuracies; give one per model"
        )
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if transforms is not None:
        for r in reports:
            missing = [t for t in transforms if t not in r.transforms]
            if missing:
                raise ValueError(
                    f"report of {r.model!r} has no transformation(s) {missing}; it has "
                    f"{r.transforms}"
                )
    summaries = [r.part_summary([metric], transforms) for r in reports]
    out: dict[str, float] = {}
    for part in PARTS:
        if not any(part in s for s in summaries):
            continue
        xs, ys = [], []
        for s, acc in zip(summaries, accs):
            v = s.get(part, {}).get(metric)
            if v is not None and not math.isnan(v):
                xs.append(v)
                ys.append(acc)
        out[part] = spearman(xs, ys) if len(xs) >= 2 else math.nan
    return out
