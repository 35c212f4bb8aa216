"""Paired tables of the SER arms study (``experiments/ser.py arms``), read from its JSON.

The arms of one method share seeds: seed s of the control (lambda = 0, same r), of SER
and of the plain method start from the same initialisation and see the same images, so
their differences are taken **per seed** and summarised as mean ± sample std with a 95%
t-interval over seeds. The centred equivariance score is listed per block (means over
seeds) and, for SER − control, per seed at the first and last block with a two-sided
sign test.

``python experiments/support/ser_tables.py A/arms.json [B/arms.json ...]`` joins the
files by arm label (seeds run in separate processes, e.g. ``--seeds 0,1`` and
``--seeds 2``; a seed present twice is an error) and prints the tables as markdown.

Experiment support, not library API (imported as ``support.ser_tables``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats as sps

from support.stats import t_interval
from support.studies import mean_std

__all__ = ["ARMS", "METRICS", "join", "paired_rows", "tables", "value_at"]

#: Arm label suffixes of ``ser.py arms`` (after ``"<method> "``).
ARMS = {"control": "baseline (lambda=0)", "SER": "SER", "plain": "plain (no T_eq)"}

#: Table columns: name -> path into a run's record.
METRICS = {"linear top1": "linear/top1", "20-NN top1": "knn/top1",
           "geometric corruptions": "corruptions/mean_geometric",
           "appearance corruptions": "corruptions/mean_appearance"}

#: The paired comparisons: (a, b) reads "a − b".
PAIRS = (("SER", "control"), ("SER", "plain"), ("plain", "control"))

GROUPS = ("rot90", "hflip", "scale")


def value_at(run: dict[str, Any], path: str) -> float | None:
    """The number at ``path`` (keys joined by ``/``) of a run record, None where absent."""
    v: Any = run
    for key in path.split("/"):
        v = v.get(key) if isinstance(v, dict) else None
    return None if v is None else float(v)


def join(payloads: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Arm label -> seed -> run record, over the ``entries`` of several ``arms.json``
    payloads; raises ``ValueError`` when a (label, seed) appears twice."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for payload in payloads:
        for entry in payload["entries"]:
            runs = out.setdefault(entry["label"], {})
            for run in entry["runs"]:
                if run["seed"] in runs:
                    raise ValueError(f"{entry['label']!r} seed {run['seed']} appears twice; "
                                     "join files of disjoint seeds")
                runs[run["seed"]] = run
    return out


def _methods(arms: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    return [label[: -len(ARMS["SER"]) - 1] for label in arms
            if label.endswith(" " + ARMS["SER"])]


def paired_rows(arms: dict[str, dict[int, dict[str, Any]]], method: str
                ) -> list[tuple[str, str, list[float], tuple[float, float, float, float]]]:
    """(comparison, metric, per-seed differences in points, t-interval) for every pair of
    :data:`PAIRS` of ``method`` whose arms share 2 or more seeds."""
    rows = []
    for a, b in PAIRS:
        ra, rb = arms.get(f"{method} {ARMS[a]}", {}), arms.get(f"{method} {ARMS[b]}", {})
        seeds = sorted(set(ra) & set(rb))
        for name, path in METRICS.items():
            diffs = [100 * (va - vb) for s in seeds
                     if (va := value_at(ra[s], path)) is not None
                     and (vb := value_at(rb[s], path)) is not None]
            if len(diffs) >= 2:
                rows.append((f"{a} − {b}", name, diffs, t_interval(diffs)))
    return rows


def _centred(run: dict[str, Any], group: str) -> list[float]:
    return list(((run.get("equivariance") or {}).get("centred") or {}).get(group) or [])


def _arm_table(arms: dict[str, dict[int, dict[str, Any]]], method: str) -> list[str]:
    lines = ["| arm | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    first = None
    for key, suffix in ARMS.items():
        runs = arms.get(f"{method} {suffix}", {})
        if not runs:
            continue
        first = first or next(iter(runs.values()))
        cells = []
        for path in METRICS.values():
            m, sd = mean_std([value_at(r, path) for r in runs.values()])
            cells.append("-" if m is None else f"{100 * m:.1f} ± {100 * sd:.1f}")
        lines.append(f"| {key} | {len(runs)} | " + " | ".join(cells) + " |")
    if first is not None:
        for base in ("raw_pixels", "random_init"):
            lin = value_at(first, f"baselines/{base}/linear/top1")
            knn = value_at(first, f"baselines/{base}/knn/top1")
            if lin is not None:
                lines.append(f"| {base.replace('_', ' ')} (baseline) | - | {100 * lin:.1f} | "
                             f"{'-' if knn is None else f'{100 * knn:.1f}'} | - | - |")
    return lines


def _random_init_equivariance(arms: dict[str, dict[int, dict[str, Any]]], method: str
                              ) -> list[str]:
    """The random-init encoder's centred scores per block (the baseline row; the probe
    gives every run the same fixed-seed encoder, so the first run's is read)."""
    runs = [r for suffix in ARMS.values() for r in arms.get(f"{method} {suffix}", {}).values()]
    base = ((runs[0].get("baselines") or {}).get("random_init") or {}) if runs else {}
    cells = [" / ".join(f"{v:.2f}" for v in _centred(base, g)) or "-" for g in GROUPS]
    return [] if cells == ["-"] * len(GROUPS) else \
        ["| random init (baseline) | " + " | ".join(cells) + " |"]


def _equivariance_lines(arms: dict[str, dict[int, dict[str, Any]]], method: str) -> list[str]:
    lines = ["| arm | " + " | ".join(f"{g} (blocks)" for g in GROUPS) + " |", "|---|---|---|---|"]
    for key, suffix in ARMS.items():
        runs = list(arms.get(f"{method} {suffix}", {}).values())
        if not runs:
            continue
        cells = []
        for g in GROUPS:
            per_block = list(zip(*[_centred(r, g) for r in runs], strict=False))
            cells.append(" / ".join(f"{mean_std(list(b))[0]:.2f}" for b in per_block) or "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += _random_init_equivariance(arms, method)
    ser, ctl = arms.get(f"{method} {ARMS['SER']}", {}), arms.get(f"{method} {ARMS['control']}", {})
    seeds = sorted(set(ser) & set(ctl))
    for where, idx in (("first block", 0), ("last block", -1)):
        for g in GROUPS:
            pairs = [(_centred(ser[s], g), _centred(ctl[s], g)) for s in seeds]
            d = [a[idx] - b[idx] for a, b in pairs if a and b]
            if not d:
                continue
            pos, neg = sum(x > 0 for x in d), sum(x < 0 for x in d)
            p = sps.binomtest(pos, pos + neg).pvalue if pos + neg else 1.0
            lines.append(f"\nSER − control, centred {g}, {where}, per seed: "
                         + " ".join(f"{x:+.3f}" for x in d)
                         + f" ({pos} positive, {neg} negative; sign test p = {p:.3f})")
    return lines


def tables(payloads: Sequence[dict[str, Any]]) -> str:
    """Markdown: per method, the arms (mean ± std, points, with the raw-pixel and
    random-init baselines), the paired differences with 95% t-intervals and per-seed
    values, and the centred equivariance per block."""
    arms = join(payloads)
    out: list[str] = []
    for method in _methods(arms):
        out += [f"## {method}", ""] + _arm_table(arms, method) + [""]
        rows = paired_rows(arms, method)
        if rows:
            out += ["| difference | metric | mean ± std | 95% t-interval | per seed |",
                    "|---|---|---|---|---|"]
            out += [f"| {c} | {name} | {m:+.1f} ± {sd:.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                    + " ".join(f"{d:+.1f}" for d in diffs) + " |"
                    for c, name, diffs, (m, sd, lo, hi) in rows]
            out.append("")
        out += ["Centred equivariance per block (mean over seeds):", ""]
        out += _equivariance_lines(arms, method) + [""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        raise SystemExit("usage: ser_tables.py ARMS.json [ARMS.json ...]")
    payloads = []
    for p in paths:
        try:
            payloads.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read {p}: {exc}; pass the arms.json that "
                             "experiments/ser.py arms wrote") from None
    print(tables(payloads))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
