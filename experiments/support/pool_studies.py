"""The studies of section 4 read from one pool of measured models (:mod:`support.pool`):
augmentations (4.4), width (4.5), architectures (4.6), Spearman correlation with
accuracy (4.2) and cosine against correlation (3.3), each beside the random-init and
channel-redundancy baselines and the 95% intervals.

Every table cell is a mean ± sample std over seeds; ``Δ`` (trained − random init) and
``eq − redundancy`` are taken per seed first. A difference is marked ``†`` when its 95%
t-interval over seeds (``mean ± t_{0.975, n-1} · sd / sqrt(n)``) excludes 0, i.e. when
the seeds show it. ``CI width`` is the widest per-layer 95% bootstrap interval over
images of a part (the image sample's share of the uncertainty), largest over seeds.

Experiment support, not library API (imported as ``support.pool_studies``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from equivision.measure import PARTS, Report
from support.stats import pearson, spearman_test, t_interval
from support.studies import (
    BASELINE_COLUMNS,
    mean_std,
    plot_parts,
    summarise_baselines,
    write_results,
)

#: Transformation subsets of a pool report, by the names ``measure`` gives them.
TRANSFORM_SETS: dict[str, Callable[[str], bool]] = {
    "translation": lambda t: t.startswith("shift("),
    "sub-pixel": lambda t: t.startswith("subshift("),
    "rotation": lambda t: t.startswith("rot"),
    "flip": lambda t: t == "hflip",
}

#: Columns of the study tables: :data:`support.studies.BASELINE_COLUMNS` and the widest
#: per-layer 95% bootstrap interval of the equivariance, trained and at random init.
STUDY_COLUMNS = BASELINE_COLUMNS + ("equivariance CI width",
                                    "random-init equivariance CI width")

#: Differences below this are float32 round-off (exact layers, trained and random).
ROUND_OFF = 1e-6

#: Columns that are differences (marked † where the seeds show them).
DIFF_COLUMNS = ("Δ invariance", "Δ equivariance", "equivariance - redundancy")


def transforms_of(rep: Report, name: str) -> list[str]:
    """The names of ``rep``'s transformations in the set ``name`` of :data:`TRANSFORM_SETS`."""
    return [t for t in rep.transforms if TRANSFORM_SETS[name](t)]


def ci_widths(rep: Report, transforms: Sequence[str], source: str = "trained"
              ) -> dict[str, float]:
    """``{part: widest 95% interval of the equivariance}`` over the part's layers and
    ``transforms`` (parts without an interval are left out)."""
    out: dict[str, float] = {}
    for t in transforms:
        for layer, ci in zip(rep.layers, rep.intervals("equivariance", t, source)):
            if ci is not None and None not in ci:
                part = rep.get(t, layer).part
                out[part] = max(out.get(part, 0.0), ci[1] - ci[0])
    return out


def run_parts(rep: Report, accuracy: float, tset: str, seed: int = 0) -> dict[str, Any]:
    """One model's run dict for :func:`support.studies.summarise_baselines` restricted to
    the transformation set ``tset``, with the CI widths as an extra metric."""
    ts = transforms_of(rep, tset)
    run: dict[str, Any] = {"accuracy": accuracy, "seed": seed}
    for key, source in (("parts", "trained"), ("parts_random_init", "random_init")):
        parts = rep.part_summary(transforms=ts, source=source)
        for part, width in ci_widths(rep, ts, source).items():
            parts.setdefault(part, {})["equivariance CI width"] = width
        run[key] = parts
    return run


def group_runs(records: Sequence[dict], reports: Sequence[Report], labels: dict[str, str],
               tset: str) -> dict[str, list[dict[str, Any]]]:
    """``{shown label: [run dict per seed]}`` for the pool groups ``labels`` (pool label ->
    label shown), in the order of ``labels``; groups without a finished model are left
    out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for pool_label, shown in labels.items():
        runs = [run_parts(rep, rec["accuracy"], tset, rec["spec"]["seed"])
                for rec, rep in zip(records, reports) if rec["label"] == pool_label]
        if runs:
            out[shown] = runs
    return out


def seeds_show(values: Sequence[float | None]) -> bool:
    """Whether the 95% t-interval over ``values`` (seeds) excludes 0 (needs 2 or more)."""
    xs = [v for v in values if v is not None]
    if len(xs) < 2:
        return False
    m, sd, lo, hi = t_interval(xs)
    if sd < ROUND_OFF:  # identical seeds: shown when not zero up to round-off
        return abs(m) > ROUND_OFF
    return lo > 0 or hi < 0


def study_table(runs: dict[str, list[dict[str, Any]]], columns: Sequence[str] = STUDY_COLUMNS
                ) -> tuple[str, dict[str, dict]]:
    """The Markdown table (setting, seeds, accuracy, part, columns) and the summaries."""
    summ = {label: summarise_baselines(rs, columns) for label, rs in runs.items()}
    rows = ["| setting | seeds | accuracy | part | " + " | ".join(columns) + " |",
            "|" + "---|" * (4 + len(columns))]
    for label, rs in runs.items():
        acc = _pm(summ[label]["accuracy"]["accuracy"])
        for part in PARTS:
            if part not in summ[label]:
                continue
            cells = []
            for col in columns:
                cell = _pm(summ[label][part][col])
                if col in DIFF_COLUMNS and seeds_show(_column_values(rs, part, col)):
                    cell += " †"
                cells.append(cell)
            rows.append(f"| {label} | {len(rs)} | {acc} | {part} | {' | '.join(cells)} |")
    return "\n".join(rows), summ


#: The columns of :func:`compact_table`: shown name -> column of :data:`STUDY_COLUMNS`.
COMPACT_COLUMNS = {"eq": "equivariance", "random-init eq": "random-init equivariance",
                   "Δ eq": "Δ equivariance", "inv": "invariance", "Δ inv": "Δ invariance",
                   "eq − redundancy": "equivariance - redundancy",
                   "CI width": "equivariance CI width"}


def compact_table(runs: dict[str, list[dict[str, Any]]], parts: Sequence[str] = PARTS,
                  columns: dict[str, str] | None = None) -> str:
    """A narrower table for the docs: ``columns`` (shown name -> column of
    :data:`STUDY_COLUMNS`; default :data:`COMPACT_COLUMNS`) for ``parts``, the setting
    with its accuracy (mean ± std) and seed count, † as in :func:`study_table`."""
    columns = columns or COMPACT_COLUMNS
    rows = ["| setting (accuracy, seeds) | part | " + " | ".join(columns) + " |",
            "|" + "---|" * (2 + len(columns))]
    for label, rs in runs.items():
        summ = summarise_baselines(rs, STUDY_COLUMNS)
        acc = _pm(summ["accuracy"]["accuracy"])
        for part in (p for p in parts if p in summ):
            cells = []
            for col in columns.values():
                m, sd = summ[part][col]
                cell = "-" if m is None else (f"{m:.3f}" if col.endswith("CI width")
                                              else f"{m:.3f} ± {sd:.3f}")
                if col in DIFF_COLUMNS and seeds_show(_column_values(rs, part, col)):
                    cell += " †"
                cells.append(cell)
            rows.append(f"| {label} ({acc}, {len(rs)}) | {part} | {' | '.join(cells)} |")
    return "\n".join(rows)


def paired_table(runs: dict[str, list[dict[str, Any]]], reference: str,
                 metrics: Sequence[str] = ("equivariance", "invariance"),
                 parts: Sequence[str] = PARTS) -> str:
    """Each setting minus ``reference``, per seed (runs paired by ``spec.seed``: the same
    seed gives the same initialisation), mean ± std over the shared seeds, † where the
    95% t-interval over them excludes 0; one row per setting and part."""
    ref = {r["seed"]: r for r in runs[reference]}
    rows = [f"| setting − {reference} | part | " + " | ".join(f"Δ {m}" for m in metrics)
            + " |", "|" + "---|" * (2 + len(metrics))]
    for label, rs in runs.items():
        if label == reference:
            continue
        pairs = [(r, ref[r["seed"]]) for r in rs if r["seed"] in ref]
        for part in parts:
            cells = []
            for m in metrics:
                d = [_diff(a["parts"].get(part, {}).get(m), b["parts"].get(part, {}).get(m))
                     for a, b in pairs]
                mean, sd = mean_std(d)
                cells.append("-" if mean is None else f"{mean:+.3f} ± {sd:.3f}"
                             + (" †" if seeds_show(d) else ""))
            if any(c != "-" for c in cells):
                rows.append(f"| {label} ({len(pairs)}) | {part} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _column_values(runs: Sequence[dict[str, Any]], part: str, col: str) -> list[float | None]:
    """Per-run values of a difference column (as :func:`summarise_baselines` takes them)."""
    out = []
    for r in runs:
        tr, ri = r["parts"].get(part, {}), r["parts_random_init"].get(part, {})
        if col == "equivariance - redundancy":
            a, b = tr.get("equivariance"), tr.get("redundancy")
        else:
            a, b = tr.get(col[2:]), ri.get(col[2:])
        out.append(None if a is None or b is None else a - b)
    return out


def _pm(v: tuple[float | None, float | None]) -> str:
    m, sd = v
    return "-" if m is None else f"{m:.3f} ± {sd:.3f}"


def write_study(out: Path, name: str, runs: dict[str, list[dict[str, Any]]], tset: str,
                title: str, columns: dict[str, str] | None = None) -> str:
    """``out/<name>-<tset>.{json,md,png}`` and ``-compact.md`` (:func:`compact_table` with
    ``columns``, then each setting paired by seed against the first); returns the
    compact table."""
    table, summ = study_table(runs)
    stem = f"{name}-{tset}"
    plot_parts(summ, out / f"{stem}.png", metrics=("equivariance", "random-init equivariance",
                                                    "invariance", "redundancy"),
               title=f"{title}, {tset}")
    write_results(out, stem, {"transform_set": tset, "runs": runs, "summary": summ}, table)
    compact = compact_table(runs, columns=columns)
    first = next(iter(runs))
    compact += f"\n\nPaired by seed against {first}:\n\n" + paired_table(runs, first)
    (out / f"{stem}-compact.md").write_text(compact + "\n")
    return compact


def spearman_rows(records: Sequence[dict], reports: Sequence[Report], subset: str,
                  keep: Callable[[dict], bool]) -> tuple[list[str], dict[str, Any]]:
    """Spearman rho (p) of each part's mean with accuracy over the kept models, per
    transformation set, metric and source (trained, random init, Δ)."""
    chosen = [(rec, rep) for rec, rep in zip(records, reports) if keep(rec)]
    accs = [rec["accuracy"] for rec, _ in chosen]
    rows, payload = [], {}
    for tset in ("translation", "sub-pixel", "rotation"):
        for metric in ("invariance", "equivariance"):
            for source in ("trained", "random init", "Δ"):
                cells = []
                for part in PARTS:
                    xs, ys = [], []
                    for (_, rep), acc in zip(chosen, accs):
                        v = _part_value(rep, tset, metric, part, source)
                        if v is not None:
                            xs.append(v)
                            ys.append(acc)
                    c = spearman_test(xs, ys) if len(xs) >= 3 else None
                    payload[f"{subset}/{tset}/{metric}/{source}/{part}"] = (
                        None if c is None else c._asdict())
                    cells.append("-" if c is None or math.isnan(c.rho)
                                 else f"{c.rho:.2f} ({c.p_value:.2g})")
                rows.append(f"| {subset} ({len(chosen)}) | {tset} | {metric} | {source} | "
                            + " | ".join(cells) + " |")
    return rows, payload


def _part_value(rep: Report, tset: str, metric: str, part: str, source: str) -> float | None:
    ts = transforms_of(rep, tset)
    if source == "Δ":
        a = _part_value(rep, tset, metric, part, "trained")
        b = _part_value(rep, tset, metric, part, "random init")
        return None if a is None or b is None else a - b
    src = "random_init" if source == "random init" else "trained"
    return rep.part_summary([metric], ts, source=src).get(part, {}).get(metric)


def cosine_rows(records: Sequence[dict], reports: Sequence[Report]
                ) -> tuple[list[str], dict[str, Any]]:
    """Per pool group: Pearson r over the layers before pooling (rot90) between the mean
    |activation| and the correlation / cosine invariance, mean ± std over seeds, for the
    trained models and at random init."""
    per: dict[str, dict[str, list[float]]] = {}
    for rec, rep in zip(records, reports):
        layers = [la for la in rep.layers if rep.get("rot90", la).part not in ("Pool", "Final")]
        for source in ("trained", "random_init"):
            vals = {m: [_numbers(rep, "rot90", la, source).get(m) for la in layers]
                    for m in ("activation", "invariance", "invariance_cosine")}
            for m in ("invariance", "invariance_cosine"):
                pairs = [(a, b) for a, b in zip(vals["activation"], vals[m])
                         if a is not None and b is not None]
                if len(pairs) >= 3:
                    r = pearson([a for a, _ in pairs], [b for _, b in pairs])
                    per.setdefault(rec["label"], {}).setdefault(f"{source}/{m}", []).append(r)
    rows = []
    for label, d in per.items():
        cells = [_pm(mean_std(d.get(k, []))) for k in
                 ("trained/invariance", "trained/invariance_cosine",
                  "random_init/invariance", "random_init/invariance_cosine")]
        rows.append(f"| {label} | {len(d.get('trained/invariance', []))} | "
                    + " | ".join(cells) + " |")
    return rows, per


def _numbers(rep: Report, t: str, layer: str, source: str) -> dict[str, float | None]:
    r = rep.get(t, layer)
    return r.random_init if source == "random_init" else r.metrics


__all__ = ["COMPACT_COLUMNS", "DIFF_COLUMNS", "ROUND_OFF", "STUDY_COLUMNS", "TRANSFORM_SETS",
           "ci_widths", "compact_table", "cosine_rows", "group_runs", "paired_table", "run_parts",
           "seeds_show", "spearman_rows", "study_table", "transforms_of", "write_study"]
