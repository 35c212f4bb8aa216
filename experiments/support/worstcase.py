"""The ``worstcase`` sub-command of ``experiments/defense.py``: per-image worst case of the
undefended model and of each defense over an attack cascade and repeated defended
predictions (:func:`support.cascade.run_cascade`), clean cost, 95 % intervals.

Stages, in order (each attacks only the images still not fooled):

* every column: PGD, MIM and CW (classification) / Houdini (segmentation), ``steps``
  steps, generated on the bare model (transferred to a defense: the paper's standard
  attacks);
* Vanilla: APGD-CE (``apgd_steps``), APGD-T (classification, ``n_targets``) or APGD with
  the SegPGD loss (segmentation), Square (classification, ``queries``): the AutoAttack
  ensemble;
* a defense: the adaptive attack swept over ``lambdas`` (every purifier: its own
  equivariance, invariance or head loss; not the random-noise baseline), BPDA+EOT
  (``bpda_steps`` x ``eot`` draws), then APGD-CE through BPDA with the same draws as a
  convergence stage: if it still breaks images, the attacks before it had not converged.

Scores are the minimum over ``repeats`` seeded defended predictions (draws seeded apart
from the attacks'). ``ctx`` is ``defense.Ctx``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.stats import binomtest
from torch import Tensor, nn

from equivision.measure import write_atomic
from equivision.metrics import ConfusionMeter
from equivision.robust.intervals import bootstrap_interval, wilson_interval
from equivision.robust.registry import build_attack, build_defense, parse_attack

from .cascade import Stage, clean_draws, run_cascade, sweep_stage

__all__ = ["DEFAULT_COLUMNS", "WORST_FULL", "WORST_QUICK", "build_stages", "load_parts",
           "merge_parts", "paired_counts", "paired_markdown", "worstcase", "worstcase_markdown"]

WORST_FULL = dict(n=64, clean_n=500, undefended_n=500, steps=20, bpda_steps=50, eot=8,
                  lambdas=(0.0, 1.0, 10.0, 100.0, 1000.0), repeats=4, apgd_steps=100,
                  n_targets=9, queries=5000, block=64)
WORST_QUICK = dict(n=4, clean_n=6, undefended_n=6, steps=2, bpda_steps=2, eot=2,
                   lambdas=(0.0, 10.0), repeats=2, apgd_steps=2, n_targets=2, queries=8,
                   block=4)
COLUMNS = {"Vanilla": None, "Random": "random", "Rotation": "rotation",
           "Contrastive": "contrastive", "Invariance": "invariance",
           "Equivariance": "equivariance"}
#: the columns run when none are named: those without a trained head (the Rotation and
#: Contrastive columns train theirs on first use, ``defense.Ctx.head``)
DEFAULT_COLUMNS = ("Vanilla", "Random", "Invariance", "Equivariance")
EVAL_SEED = 7


def _stage(spec: dict[str, Any], model: nn.Module, defense: nn.Module | None, eps: float,
           seed: int) -> Stage:
    label = spec.pop("label")
    atk, _ = build_attack(parse_attack(spec), model, defense, eps=eps, seed=seed)
    return (label, atk)


def build_stages(task: str, model: nn.Module, defense: nn.Module | None, eps: float,
                 st: dict[str, Any], kind: str | None) -> list[Stage]:
    """The cascade of one column (see the module docstring)."""
    seg = task == "seg"
    strong = "houdini" if seg else "cw"
    tag = " (transfer)" if defense is not None else ""
    specs: list[dict[str, Any]] = [
        {"name": n, "label": f"{lab}{tag}", "steps": st["steps"]}
        for n, lab in (("pgd", "PGD"), ("mim", "MIM"),
                       (strong, "Houdini" if seg else "CW"))]
    stages = [_stage(s, model, defense, eps, 100 + i) for i, s in enumerate(specs)]
    if defense is None:
        more: list[dict[str, Any]] = [{"name": "apgd-ce", "label": "APGD-CE",
                                       "steps": st["apgd_steps"]}]
        if seg:
            more.append({"name": "apgd-ce", "label": "APGD-SegPGD", "loss": "segpgd",
                         "steps": st["apgd_steps"]})
        else:
            more += [{"name": "apgd-t", "label": "APGD-T", "steps": st["apgd_steps"],
                      "n_targets": st["n_targets"]},
                     {"name": "square", "label": "Square", "queries": st["queries"]}]
        return stages + [_stage(s, model, None, eps, 200 + i) for i, s in enumerate(more)]
    lam = "/".join(f"{v:g}" for v in st["lambdas"])
    if kind != "random":  # every purifier has a loss the attack can fool
        stages.append((f"Adaptive ({lam})", sweep_stage(
            defense, eps, st["lambdas"], steps=st["steps"], seed=300)))
    stages.append(_stage({"name": "bpda-eot", "label": f"BPDA+EOT {st['bpda_steps']}x{st['eot']}",
                          "steps": st["bpda_steps"], "eot_samples": st["eot"]},
                         model, defense, eps, 400))
    stages.append(_stage({"name": "apgd-bpda", "label": f"APGD-CE BPDA {st['bpda_steps']}x"
                          f"{st['eot']} (convergence)", "steps": st["bpda_steps"],
                          "eot_samples": st["eot"]}, model, defense, eps, 500))
    return stages


def _images(data: Any, n: int) -> tuple[Tensor, Tensor]:
    n = min(n, len(data))
    x = torch.stack([data[i][0] for i in range(n)])
    ys = [data[i][1] for i in range(n)]
    y = torch.stack(ys) if isinstance(ys[0], Tensor) and ys[0].dim() > 0 else \
        torch.as_tensor([int(v) for v in ys])
    return x, y


def _interval(scores: Sequence[float], seg: bool) -> list[float]:
    if seg:  # the mean of per-image scores, resampled over images
        s = torch.as_tensor(list(scores), dtype=torch.float64)
        return list(bootstrap_interval(len(s), lambda w: w @ s / len(s), samples=2000))
    return list(wilson_interval(int(round(sum(scores))), len(scores)))


def _clean(system: nn.Module, x: Tensor, y: Tensor, draws: int, seg: bool) -> dict[str, Any]:
    s = clean_draws(system, x, y, draws, EVAL_SEED)
    single, worst = s[0].tolist(), s.min(0).values.tolist()
    return {"n": len(single), "draws": draws, "single": sum(single) / len(single),
            "single_ci": _interval(single, seg), "worst": sum(worst) / len(worst),
            "worst_ci": _interval(worst, seg)}


def _column(ctx: Any, task: str, seed: int, col: str, st: dict[str, Any],
            data: tuple[Tensor, Tensor]) -> dict[str, Any]:
    model = ctx.model(task, seed)
    kind = COLUMNS[col]
    defense = None if kind is None else build_defense(
        kind, model, **ctx.defense_kwargs(task, kind, st["defense_steps"]))
    seg = task == "seg"
    x, y = data
    system = defense if defense is not None else model
    draws = st["repeats"] if bool(getattr(defense, "randomized", False)) else 1
    n_clean = st["clean_n"] if defense is not None else st["undefended_n"]
    n = st["n"] if defense is not None else st["undefended_n"]
    off = st.get("offset", 0)
    # the clean cost is the offset-0 part's (merge_parts keeps the largest): a later slice
    # of the cascade images does not pay for it again
    clean = _clean(system, x[:n_clean], y[:n_clean], draws, seg) if off == 0 else \
        {"n": 0, "draws": draws}
    stages = build_stages(task, model, defense, ctx.eps(task), st, kind)
    casc = run_cascade(system, stages, x[off:off + n], y[off:off + n], eval_draws=draws,
                       seed=EVAL_SEED, block=st["block"], log=lambda m: print(m, flush=True))
    for r in casc["records"]:
        r["index"] += off
    casc["score_ci"] = _interval(casc["score"], seg)
    return {"column": col, "clean": clean, "cascade": casc, "draws": draws, "offset": off,
            "seg": seg}


def load_parts(path: Path) -> dict[str, Any]:
    """Saved columns and slices of one (task, seed): ``path`` (``worstcase-<key>.json``,
    the layout of the first runs) and the files ``worstcase-<key>/<name>.json``, which
    win."""
    done = json.loads(path.read_text()) if path.exists() else {}
    folder = path.with_suffix("")
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            done[f.stem] = json.loads(f.read_text())
    return done


def merge_parts(cols: dict[str, Any]) -> dict[str, Any]:
    """Join the parts ``"<column>@<offset>"`` (``--offset``: one process per slice of the
    cascade images) into their column: per-image records concatenated, the cumulative
    scores, stage counts and interval recomputed; the clean cost is the offset-0 part's."""
    out = {k: v for k, v in cols.items() if "@" not in k}
    for key in sorted((k for k in cols if "@" in k), key=lambda k: int(k.split("@")[1])):
        col, part = key.split("@")[0], cols[key]
        if col not in out:
            out[col] = part
            continue
        a, b = out[col]["cascade"], part["cascade"]
        if a["stages"] != b["stages"]:
            raise ValueError(f"{key}: stages differ from {col}'s")
        records = a["records"] + b["records"]
        names = a["stages"]
        merged = {**a, "records": records, "score": a["score"] + b["score"],
                  "n": a["n"] + b["n"], "seconds": a["seconds"] + b["seconds"],
                  "broken": {s: a["broken"][s] + b["broken"][s] for s in names},
                  "after": [sum(r[f"score_{s}"] for r in records) / len(records)
                            for s in names]}
        merged["score_ci"] = _interval(merged["score"], bool(part.get("seg")))
        if "miou" in a or "miou" in b:
            merged.update(_joined_dataset_figures(a, b))
        clean = max(out[col]["clean"], part["clean"], key=lambda c: c["n"])
        out[col] = {**out[col], "cascade": merged, "clean": clean}
    return out


def _joined_dataset_figures(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Dataset mIoU and pixel accuracy of two joined segmentation cascades, from their
    summed confusion matrices; None (not known) when a part did not save its confusion
    (parts written before it was saved): a part's own figure is not the joined one."""
    if a.get("confusion") is None or b.get("confusion") is None:
        return {"miou": None, "pixel_accuracy": None, "confusion": None}
    conf = torch.tensor(a["confusion"]) + torch.tensor(b["confusion"])
    meter = ConfusionMeter(conf.shape[0])
    meter.confusion += conf
    return {"miou": meter.miou(), "pixel_accuracy": meter.accuracy(),
            "confusion": conf.tolist()}


def worstcase(ctx: Any, st: dict[str, Any], seeds: Sequence[int], columns: Sequence[str],
              tasks: Sequence[str]) -> dict[str, Any]:
    """Run every (task, seed, column); each finished column is written to
    ``<ctx.out>/worstcase-<task>-seed<seed>.json`` at once (partial results survive)."""
    out: dict[str, Any] = {}
    for task in tasks:
        for seed in seeds:
            key = f"{task}-seed{seed}"
            path = Path(ctx.out) / f"worstcase-{key}.json"
            done = load_parts(path)
            x, y = _images(ctx.data(task, "test"), max(st["clean_n"], st["undefended_n"],
                                                      st.get("offset", 0) + st["n"]))
            for col in columns if not st.get("report_only") else ():
                name = col if not st.get("offset") else f"{col}@{st['offset']}"
                if name in done and done[name].get("settings") == _settings(ctx, task, st):
                    continue
                print(f"  {key} {name} ...", flush=True)
                res = _column(ctx, task, seed, col, st, (x, y))
                res["settings"] = _settings(ctx, task, st)
                # one file per column or slice: parallel processes never rewrite each
                # other's results (a shared file lost parts when two wrote at once)
                part = path.with_suffix("") / f"{name}.json"
                part.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(part, json.dumps(res, indent=1, default=str))
                done = load_parts(path)
                print(f"  {key} {name}: {res['cascade']['seconds']:.0f}s", flush=True)
            merged = merge_parts(done)
            out[key] = {c: merged[c] for c in columns if c in merged}
    return out


def _settings(ctx: Any, task: str, st: dict[str, Any]) -> dict[str, Any]:
    return {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in st.items()},
            "eps": ctx.eps(task), "eps_v": ctx.eps_v(task),
            "feature_layer": ctx.tasks[task]["feature_layer"]}


def paired_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired comparison of two classification columns on the cascade images both ran:
    ``{"n", "a_only" (kept by a, lost by b), "b_only", "both", "p", "a_clean", "b_clean"}``,
    ``p`` the exact two-sided sign (McNemar) test of the discordant images (1.0 when there
    are none), ``*_clean`` the images each gets right clean (worst of its draws)."""
    sa = {r["index"]: r["score"] > 0 for r in a["cascade"]["records"]}
    sb = {r["index"]: r["score"] > 0 for r in b["cascade"]["records"]}
    common = sorted(set(sa) & set(sb))
    ca = {r["index"]: r["score_clean"] > 0 for r in a["cascade"]["records"]}
    cb = {r["index"]: r["score_clean"] > 0 for r in b["cascade"]["records"]}
    a_only = sum(1 for i in common if sa[i] and not sb[i])
    b_only = sum(1 for i in common if sb[i] and not sa[i])
    both = sum(1 for i in common if sa[i] and sb[i])
    p = binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
    return {"n": len(common), "a_only": a_only, "b_only": b_only, "both": both,
            "p": float(p), "a_clean": sum(ca[i] for i in common),
            "b_clean": sum(cb[i] for i in common)}


def paired_scores(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired comparison of two segmentation columns on the cascade images both ran:
    ``{"n", "a_clean", "b_clean" (mean clean per-image mIoU), "diff" (mean of the per-image
    worst-case mIoU of a minus b), "diff_ci" (its bootstrap 95 % interval over images),
    "a_higher", "b_higher", "p"}``, ``p`` the exact two-sided sign test of the images where
    one is higher."""
    ra = {r["index"]: r for r in a["cascade"]["records"]}
    rb = {r["index"]: r for r in b["cascade"]["records"]}
    common = sorted(set(ra) & set(rb))
    if not common:
        return {"n": 0}
    d = torch.tensor([ra[i]["score"] - rb[i]["score"] for i in common], dtype=torch.float64)
    a_higher, b_higher = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(a_higher, a_higher + b_higher).pvalue if a_higher + b_higher else 1.0
    return {"n": len(common), "diff": float(d.mean()), "diff_ci": _interval(d.tolist(), True),
            "a_clean": sum(ra[i]["score_clean"] for i in common) / len(common),
            "b_clean": sum(rb[i]["score_clean"] for i in common) / len(common),
            "a_higher": a_higher, "b_higher": b_higher, "p": float(p)}


#: the paired table of each task kind: heading, then one row's cells from the comparison
_PAIRED_HEAD = {
    True: "| pair (a vs b) | common images | clean mIoU a / b | worst-case mIoU a - b [95 %] "
          "| images a higher / b higher | sign test p |\n|---|---|---|---|---|---|\n",
    False: "| pair (a vs b) | common images | clean a / b | kept by a only | kept by b only "
           "| kept by both | sign test p |\n|---|---|---|---|---|---|---|\n"}


def _paired_cells(seg: bool, pc: dict[str, Any]) -> str:
    if seg:
        return (f"{_pct(pc['a_clean'])} / {_pct(pc['b_clean'])} | "
                f"{_pct(pc['diff'], pc['diff_ci'])} | {pc['a_higher']} / {pc['b_higher']}")
    return f"{pc['a_clean']} / {pc['b_clean']} | {pc['a_only']} | {pc['b_only']} | {pc['both']}"


def paired_markdown(cols: dict[str, Any]) -> str:
    """One row per pair of columns of one (task, seed) on their common cascade images:
    classification, the images kept by one and lost by the other and the sign test's p;
    segmentation, the mean per-image difference of the worst-case mIoU with its bootstrap
    interval and the sign test of the images where one is higher."""
    seg = any(c.get("seg") for c in cols.values())
    names = [c for c in cols if bool(cols[c].get("seg")) == seg]
    compare = paired_scores if seg else paired_counts
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pc = compare(cols[a], cols[b])
            if pc["n"]:
                rows.append(f"| {a} vs {b} | {pc['n']} | {_paired_cells(seg, pc)} | "
                            f"{pc['p']:.3g} |")
    return _PAIRED_HEAD[seg] + "\n".join(rows) if rows else ""


def _clean_cell(clean: dict[str, Any], key: str) -> str:
    return _pct(clean[key], clean[f"{key}_ci"]) if key in clean else "-"


def _pct(v: float, ci: Sequence[float] | None = None) -> str:
    s = f"{100 * v:.1f}"
    return s if ci is None else f"{s} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def worstcase_markdown(results: dict[str, Any]) -> str:
    """One block per (task, seed): clean cost, the cumulative worst case after each stage
    (the final row with a 95 % interval), and which stage broke how many images."""
    blocks = []
    for key, cols in results.items():
        names = list(cols)
        head = ["", *names]
        rows = [["n (clean / cascade)", *(f"{c['clean']['n']} / {c['cascade']['n']}"
                                          for c in cols.values())],
                ["clean, one prediction", *(_clean_cell(c["clean"], "single")
                                            for c in cols.values())],
                ["clean, worst of the draws", *(_clean_cell(c["clean"], "worst")
                                                for c in cols.values())]]
        order: list[str] = []
        for c in cols.values():
            prev = -1
            for s in c["cascade"]["stages"]:
                if s not in order:
                    order.insert(prev + 1, s)
                prev = order.index(s)
        for s in order:
            cells = []
            for c in cols.values():
                cas = c["cascade"]
                if s not in cas["stages"]:
                    cells.append("-")
                    continue
                i = cas["stages"].index(s)
                cells.append(f"{_pct(cas['after'][i])} ({cas['broken'][s]})")
            rows.append([f"after {s}" if s != "clean" else "clean (cascade images)", *cells])
        rows.append(["**per-image worst case**", *(
            f"**{_pct(sum(c['cascade']['score']) / c['cascade']['n'], c['cascade']['score_ci'])}**"
            for c in cols.values())])
        if all("miou" in c["cascade"] for c in cols.values()):
            rows.append(["dataset mIoU / pixel acc. of the worst case", *(
                f"{_pct(c['cascade']['miou'])} / {_pct(c['cascade']['pixel_accuracy'])}"
                if c["cascade"]["miou"] is not None else
                "- (a joined slice saved no confusion)" for c in cols.values())])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        paired = paired_markdown(cols)
        blocks.append(f"**{key}**\n\n" + "\n".join(lines)
                      + (f"\n\nPaired, per image:\n\n{paired}" if paired else ""))
    return "\n\n".join(blocks) + (
        "\n\nCells: metric (%) after the stage, cumulative per image (the images it broke, "
        "i.e. whose worst case it produced); [95 % interval]: Wilson (accuracy) or bootstrap "
        "(mean per-image mIoU).")
