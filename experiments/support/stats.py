"""Rank correlation between learned equivariance and accuracy (paper section 4.2, Fig. 4).

The statistics come from :mod:`scipy.stats`: ``spearman``/``pearson`` give the
coefficient, ``spearman_test``/``pearson_test`` the coefficient with its two-sided
p-value (:class:`Correlation`). ``spearman_by_part`` correlates, over a set of models,
the per-part mean of a measure (``Report.part_summary``) with the models' accuracies;
``spearman_by_part_test`` adds the p-values. Experiment support for
``experiments/learned_equivariance.py`` (imported as ``support.stats``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

from scipy import stats

from equivision.measure.parts import PARTS
from equivision.measure.report import METRICS, Report
from support.studies import mean_std

__all__ = ["Correlation", "rankdata", "pearson", "pearson_test", "spearman", "spearman_test",
           "spearman_by_part", "spearman_by_part_test", "t_interval"]


class Correlation(NamedTuple):
    """A correlation coefficient, its two-sided p-value (NaN when undefined) and the
    number of pairs it is computed from."""

    rho: float
    p_value: float
    n: int


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


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    """``x`` and ``y`` as float lists, checked: equal length >= 2, no NaN."""
    xs, ys = _floats("x", x), _floats("y", y)
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} vs {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(xs)}")
    return xs, ys


def rankdata(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values``; tied values get the mean of the ranks they span."""
    return [float(r) for r in stats.rankdata(_floats("values", values), method="average")]


def _test(fn: object, xs: list[float], ys: list[float]) -> Correlation:
    """``fn(xs, ys)`` (a scipy.stats correlation) as a :class:`Correlation`; NaN when
    either side is constant."""
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return Correlation(math.nan, math.nan, len(xs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # p-values of n = 2 are undefined: NaN
        res = fn(xs, ys)
    rho = max(-1.0, min(1.0, float(res.statistic)))
    return Correlation(rho, float(res.pvalue), len(xs))


def pearson_test(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson correlation of ``x`` and ``y`` with its two-sided p-value
    (``scipy.stats.pearsonr``)."""
    return _test(stats.pearsonr, *_pairs(x, y))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length sequences; NaN if either is constant."""
    return pearson_test(x, y).rho


def spearman_test(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's rank correlation of ``x`` and ``y`` with its two-sided p-value
    (``scipy.stats.spearmanr``; ties get average ranks).

    Raises:
        ValueError: different lengths, fewer than 2 pairs, NaN or non-numeric values.
    """
    return _test(stats.spearmanr, *_pairs(x, y))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (equal length >= 2): the Pearson
    correlation of the ranks, ``scipy.stats.spearmanr(x, y).statistic``. Returns NaN when
    ``x`` or ``y`` is constant.

    Raises:
        ValueError: different lengths, fewer than 2 pairs, NaN or non-numeric values.
    """
    return spearman_test(x, y).rho


def spearman_by_part(
    reports: Sequence[Report],
    accuracies: Sequence[float],
    metric: str = "equivariance",
    transforms: Sequence[str] | None = None,
) -> dict[str, float]:
    """``{part: rho}``: the coefficients of :func:`spearman_by_part_test`."""
    return {part: c.rho for part, c in
            spearman_by_part_test(reports, accuracies, metric, transforms).items()}


def spearman_by_part_test(
    reports: Sequence[Report],
    accuracies: Sequence[float],
    metric: str = "equivariance",
    transforms: Sequence[str] | None = None,
) -> dict[str, Correlation]:
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
        ``{part: Correlation(rho, p_value, n)}`` for the parts (in the order Early,
        Middle, Late, Pool, Final) that some report has. Models whose value for a part
        is undefined (the part is missing, or every pair in it inexact) are left out of
        that part's correlation; a part with fewer than 2 models left, or a constant
        column, gets NaN.
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
    out: dict[str, Correlation] = {}
    for part in PARTS:
        if not any(part in s for s in summaries):
            continue
        xs, ys = [], []
        for s, acc in zip(summaries, accs):
            v = s.get(part, {}).get(metric)
            if v is not None and not math.isnan(v):
                xs.append(v)
                ys.append(acc)
        out[part] = (spearman_test(xs, ys) if len(xs) >= 2
                     else Correlation(math.nan, math.nan, len(xs)))
    return out


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std, lower, upper) of the 95% t-interval of the mean of ``values``
    (2 or more; with one value the interval is (-inf, inf))."""
    m, sd = mean_std(values)
    if m is None or sd is None:
        raise ValueError("t_interval needs at least one defined value")
    n = sum(v is not None and not math.isnan(v) for v in values)
    if n < 2:
        return m, 0.0, -math.inf, math.inf
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return m, sd, m - half, m + half
