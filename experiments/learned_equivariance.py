"""The studies of the learned-equivariance paper (section 4), at CPU scale.

One sub-command per study; each trains (or reuses) its models under --root, measures
them and writes JSON, a Markdown table and a plot under --out:

    task     section 4.3 / figure 5: rotation in/equivariance for an upright dataset
             (--data: digits6, or fashion-mnist from IDX files), its rotation-invariant
             and its rotation-equivariant variant (cnn7, 3 seeds), beside the same
             network at random initialisation and the channel-redundancy baseline;
             seed by seed, each model logged to records.jsonl as it finishes and
             reused on a rerun (task-rotation-compact.md: † and paired-by-seed tables)
    augment  section 4.4 / figure 6a: translation in/equivariance per augmentation
             (CIFAR-style ResNet, 3 seeds, diagonal shifts, valid region only)
    width    section 4.5 / figure 6b: translation in/equivariance against WRN width
    arch     section 4.6 / figure 7: CNNs against ViT and MLP-Mixer, shifts and rot90
    accuracy section 4.2: Spearman correlation of each part's equivariance with
             accuracy across every model trained by arch and width
    cosine   section 3.3 / figure 2: cosine and correlation invariance against the
             mean activation per layer

    pool     one pool of models on --data (default sizes: 12,000 training images, 6
             epochs, 3 seeds): cnn7 with each augmentation, cnn7 at widths 10 / 20 / 40,
             a ViT and an MLP-Mixer, all 28 px; each is trained once and measured once
             (rot90, hflip, shifts 1-4, a half-pixel shift) beside its random-init copy;
             records are appended as models finish, so a stopped pool resumes
    pool-summary  augment, width, arch (4.4-4.6), accuracy (4.2) and cosine (3.3)
             read from the pool's finished models, with the baselines, the intervals
             and paired-by-seed differences (support.pool_studies)

``--quick`` shrinks epochs, depths and seeds so each study takes a few minutes.
Example: ``.venv/bin/python experiments/learned_equivariance.py task --quick``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from support.pool import (
    POOL_AUGMENTS,
    POOL_WIDTHS,
    finished_records,
    load_reports,
    pool_specs,
    run_pool,
)
from support.pool_studies import cosine_rows, group_runs, spearman_rows, write_study
from support.stats import pearson, spearman, spearman_by_part
from support.studies import (
    BASELINE_COLUMNS,
    RunSpec,
    markdown_table,
    plot_parts,
    summarise,
    summarise_baselines,
    train_and_measure,
    write_results,
)

from equivision.io import save_png
from equivision.measure import Report


def seeds(args) -> list[int]:
    n = args.seeds if args.seeds else (2 if args.quick else 3)
    start = getattr(args, "first_seed", 0)
    return list(range(start, start + n))


def study_seeds(args) -> list[int]:
    """Seeds of the width and arch studies: one at --quick, three in full, or --seeds N."""
    return seeds(args) if args.seeds else seeds(args)[:1 if args.quick else 3]


def study(args, name: str, groups: dict[str, list[RunSpec]], transforms: str, title: str,
          margin: int = 0) -> dict:
    runs = {label: [train_and_measure(s, args.root, transforms, args.images, args.device,
                                      margin=margin) for s in specs]
            for label, specs in groups.items()}
    summ = {label: summarise(rs) for label, rs in runs.items()}
    table = markdown_table(summ)
    plot_parts(summ, args.out / f"{name}.png", title=title)
    write_results(args.out, name, {"transforms": transforms, "runs": runs, "summary": summ},
                  table)
    print(table)
    return runs


def task_specs(args) -> dict[str, list[RunSpec]]:
    """The task study's runs: cnn7 at 28 px on ``args.data`` upright, rotation-invariant
    (``-rotinv``) and rotation-equivariant (``-roteq``), one per seed."""
    ep = args.epochs or (6 if args.quick else 15)
    n_train = args.train_images or (1000 if args.quick else None)
    n_test = args.test_images or (500 if args.quick else None)
    return {label: [RunSpec("cnn7", args.data + suffix, seed=s, size=28, epochs=ep,
                            train_images=n_train, test_images=n_test) for s in seeds(args)]
            for label, suffix in ((f"{args.data} (upright)", ""),
                                  ("rotation-invariant task", "-rotinv"),
                                  ("rotation-equivariant task", "-roteq"))}


def merged_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """The runs of several ``task.json`` files (e.g. seeds split over processes), per
    setting in the order first seen."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        for label, rs in json.loads(Path(path).read_text())["runs"].items():
            runs.setdefault(label, []).extend(rs)
    return runs


def task_runs(records: list[dict], reports: list[Report] | None = None
              ) -> dict[str, list[dict]]:
    """The task study's runs per setting (in the order first seen) from
    :func:`support.pool.run_pool` records: each record plus its report's part means,
    trained (``"parts"``) and at random initialisation (``"parts_random_init"``);
    ``reports``: the records' loaded reports (default: loaded here)."""
    runs: dict[str, list[dict]] = {}
    for rec, rep in zip(records, reports if reports is not None else load_reports(records)):
        runs.setdefault(rec["label"], []).append(
            {**rec, "parts": rep.part_summary(),
             "parts_random_init": rep.part_summary(source="random_init"),
             "seconds": rec["train_seconds"] + rec["measure_seconds"]})
    return runs


#: The task study's docs table (:func:`support.pool_studies.compact_table` columns): the
#: trained values beside random init, the channel redundancy and the bootstrap widths.
TASK_COLUMNS = {"eq": "equivariance", "random-init eq": "random-init equivariance",
                "Δ eq": "Δ equivariance", "redundancy": "redundancy",
                "eq − redundancy": "equivariance - redundancy", "inv": "invariance",
                "random-init inv": "random-init invariance", "Δ inv": "Δ invariance",
                "CI width": "equivariance CI width",
                "random-init CI width": "random-init equivariance CI width"}


def task_tables(out: Path, records: list[dict], labels: list[str], title: str,
                reports: list[Report] | None = None) -> str:
    """``out/task-rotation{.json,.md,.png,-compact.md}`` from the task study's records (and
    their loaded ``reports``, default: loaded here): :data:`TASK_COLUMNS` per setting and
    part with † where the seeds show a difference, and each task paired by seed against
    the first (upright); returns the compact text."""
    reports = reports if reports is not None else load_reports(records)
    runs = group_runs(records, reports, {la: la for la in labels}, "rotation")
    return write_study(out, "task", runs, "rotation", title, columns=TASK_COLUMNS)


def cmd_task(args) -> None:
    """Train and measure the task study seed by seed (every setting's seed 0 first), each
    model logged to ``--out``/records.jsonl as it finishes (a rerun reuses the logged
    models), or summarise ``--merge``'d task.json files; then the tables and plot."""
    title = f"rotation in/equivariance per part (cnn7, {args.data})"
    if args.merge:
        runs = merged_runs(args.merge)
    else:
        specs = task_specs(args)
        records = run_pool(specs, args.root, args.out, args.images, args.device,
                           transforms="rot90")
        reports = load_reports(records)  # once, for both summaries
        runs = task_runs(records, reports)
        print(task_tables(args.out, records, list(specs), title, reports) + "\n")
    summ = {label: summarise_baselines(rs) for label, rs in runs.items()}
    table = markdown_table(summ, metrics=BASELINE_COLUMNS)
    plot_parts(summ, args.out / "task.png", metrics=("equivariance", "random-init equivariance",
                                                     "invariance", "redundancy"),
               title=title)
    write_results(args.out, "task", {"transforms": "rot90", "runs": runs, "summary": summ},
                  table)
    print(table)


def resnet_kwargs(args) -> dict:
    return {"depth": 14 if args.quick else 44}


def cmd_augment(args) -> None:
    ep = 6 if args.quick else 15
    augs = {"none": "none", "random crops": "crop", "horizontal flips": "flip",
            "CutMix": "cutmix:1:1", "RandAugment": "randaugment"}
    groups = {label: [RunSpec("resnet44", "digits", seed=s, size=32, epochs=ep, augment=a,
                              model_kwargs=resnet_kwargs(args)) for s in seeds(args)]
              for label, a in augs.items()}
    study(args, "augment", groups, "shift:1-8",
          "translation in/equivariance per augmentation (CIFAR-style ResNet, digits 32 px)")


def width_specs(args) -> dict[str, list[RunSpec]]:
    ep = 6 if args.quick else 12
    depth = 10 if args.quick else 16
    widths = (1, 2, 4) if args.quick else (1, 2, 4, 8)
    return {f"WRN-{depth}-{w}": [RunSpec("wrn40", "digits", seed=s, size=32, epochs=ep,
                                         model_kwargs={"depth": depth, "width": w})
                                 for s in study_seeds(args)]
            for w in widths}


def cmd_width(args) -> None:
    study(args, "width", width_specs(args), "shift:1-8",
          "translation in/equivariance against width (WRN, digits 32 px)")


def arch_specs(args) -> dict[str, list[RunSpec]]:
    ep = 6 if args.quick else 15
    sd = study_seeds(args)
    small = {"dim": 64, "depth": 4} if args.quick else {}
    return {
        "cnn7": [RunSpec("cnn7", "digits", seed=s, size=28, epochs=ep) for s in sd],
        "ResNet": [RunSpec("resnet44", "digits", seed=s, size=28, epochs=ep,
                           model_kwargs=resnet_kwargs(args)) for s in sd],
        "ViT": [RunSpec("vit-small", "digits", seed=s, size=28, epochs=ep, optimizer="adamw",
                        lr=1e-3, weight_decay=0.05, model_kwargs=small) for s in sd],
        "MLP-Mixer": [RunSpec("mixer-small", "digits", seed=s, size=28, epochs=ep,
                              optimizer="adamw", lr=1e-3, weight_decay=0.05,
                              model_kwargs=small) for s in sd],
    }


def cmd_arch(args) -> None:
    groups = arch_specs(args)
    # shifts by 4 and 8 px: whole token positions for the patch-4 ViT and Mixer
    study(args, "arch-translation", groups, "shift:4,shift:8",
          "translation in/equivariance per architecture (digits 28 px)")
    study(args, "arch-rotation", groups, "rot90",
          "rotation in/equivariance per architecture (digits 28 px)")


def cmd_accuracy(args) -> None:
    specs = [s for g in (arch_specs(args), width_specs(args)) for ss in g.values() for s in ss]
    rows = ["| transformation | metric | " + " | ".join(("Early", "Middle", "Late", "Pool",
                                                         "Final")) + " |", "|---" * 7 + "|"]
    payload = {}
    for label, transforms in (("translation", "shift:4,shift:8"), ("rotation", "rot90")):
        runs = [train_and_measure(s, args.root, transforms, args.images, args.device)
                for s in specs]
        reports = [Report.load_json(r["report"]) for r in runs]
        accs = [r["accuracy"] for r in runs]
        for metric in ("invariance", "equivariance"):
            rho = spearman_by_part(reports, accs, metric=metric)
            payload[f"{label}/{metric}"] = {"rho": rho, "accuracies": accs,
                                            "models": [r["spec"] for r in runs]}
            cells = " | ".join(f"{rho.get(p, float('nan')):.2f}" for p in
                               ("Early", "Middle", "Late", "Pool", "Final"))
            rows.append(f"| {label} | {metric} | {cells} |")
    table = "\n".join(rows) + f"\n\n{len(specs)} models; accuracies " + ", ".join(
        f"{a:.3f}" for a in payload["translation/invariance"]["accuracies"])
    write_results(args.out, "accuracy", payload, table)
    print(table)


def cmd_cosine(args) -> None:
    spec = RunSpec("resnet44", "digits", seed=0, size=32, epochs=6 if args.quick else 15,
                   model_kwargs=resnet_kwargs(args))
    run = train_and_measure(spec, args.root, "rot90:1", args.images, args.device)
    rep = Report.load_json(run["report"])
    t = rep.transforms[0]
    rows = [rep.get(t, layer) for layer in rep.layers if rep.get(t, layer).part not in
            ("Pool", "Final")]
    act = [r.metrics["activation"] for r in rows]
    corr = [r.metrics["invariance"] for r in rows]
    cos = [r.metrics["invariance_cosine"] for r in rows]
    res = {"layers": [r.layer for r in rows], "activation": act, "correlation": corr,
           "cosine": cos,
           "pearson(activation, correlation)": pearson(act, corr),
           "pearson(activation, cosine)": pearson(act, cos),
           "spearman(activation, correlation)": spearman(act, corr),
           "spearman(activation, cosine)": spearman(act, cos)}
    table = "\n".join([
        "| score | Pearson r with mean activation | Spearman rho |", "|---|---|---|",
        f"| correlation invariance | {res['pearson(activation, correlation)']:.2f} | "
        f"{res['spearman(activation, correlation)']:.2f} |",
        f"| cosine invariance | {res['pearson(activation, cosine)']:.2f} | "
        f"{res['spearman(activation, cosine)']:.2f} |",
        "", f"{len(rows)} layers before global pooling of {spec.name}, rot90, "
        f"{rep.n_images} test images; accuracy {run['accuracy']:.3f}"])
    _plot_cosine(res, args.out / "cosine.png")
    write_results(args.out, "cosine", res, table)
    print(table)


def _plot_cosine(res: dict, path: Path) -> None:
    """Per-layer correlation and cosine invariance of one model, as a PNG."""
    import matplotlib.pyplot as plt  # support.studies chose the Agg backend

    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(res["layers"]))
    ax.plot(xs, res["correlation"], "o-", ms=3, label="invariance (correlation)")
    ax.plot(xs, res["cosine"], "o-", ms=3, label="invariance (cosine)")
    top = max(res["activation"]) or 1.0
    ax.plot(xs, [a / top for a in res["activation"]], "o-", ms=3,
            label="mean |activation| (scaled)")
    ax.set_xlabel("layer depth")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def pool_groups(args) -> dict[str, list[RunSpec]]:
    """The shared pool of models on ``args.data`` (:func:`support.pool.pool_specs`):
    12,000 training images, 6 epochs and 3 seeds in full; 300 images, 1 epoch, 2 seeds
    and a one-block ViT/Mixer at ``--quick``; only the groups of ``--studies``."""
    groups = pool_specs(args.data, seeds(args), args.epochs or (1 if args.quick else 6),
                        args.train_images or (300 if args.quick else 12000),
                        args.test_images or (100 if args.quick else 2000),
                        {"dim": 32, "depth": 1} if args.quick else {"dim": 64, "depth": 4})
    wanted = {label for s in pool_studies(args) for label in POOL_STUDIES[s][0]}
    return {label: specs for label, specs in groups.items() if label in wanted}


def pool_studies(args) -> list[str]:
    """``--studies``: the pool studies to train for and summarise (default all)."""
    names = [s.strip() for s in (args.studies or ",".join(POOL_STUDIES)).split(",") if s.strip()]
    bad = [s for s in names if s not in POOL_STUDIES]
    if bad or not names:
        raise SystemExit(f"--studies takes a comma list of {', '.join(POOL_STUDIES)}; "
                         f"got {args.studies!r}")
    return names


def cmd_pool(args) -> None:
    run_pool(pool_groups(args), args.root, args.out, args.images, args.device)


#: The pool studies: name -> (pool label -> label shown, transformation sets, title).
POOL_STUDIES = {
    "augment": ({f"cnn7 {a}": a for a in POOL_AUGMENTS},
                ("translation", "sub-pixel", "flip", "rotation"),
                "in/equivariance per augmentation (cnn7)"),
    "width": ({f"cnn7 width {POOL_WIDTHS[0]}": f"cnn7 width {POOL_WIDTHS[0]}",
               "cnn7 none": "cnn7 width 20",
               **{f"cnn7 width {w}": f"cnn7 width {w}" for w in POOL_WIDTHS[1:]}},
              ("translation", "sub-pixel", "rotation"), "in/equivariance against width"),
    "arch": ({"cnn7 none": "cnn7", "ViT": "ViT", "MLP-Mixer": "MLP-Mixer"},
             ("translation", "sub-pixel", "rotation", "flip"),
             "in/equivariance per architecture"),
}


def cmd_pool_summary(args) -> None:
    """Write every pool study from the finished pool models (the pool may still run)."""
    records = finished_records(pool_groups(args), args.root, args.out)
    if not records:
        raise SystemExit(f"no finished pool model under {args.out}; run `pool` first")
    reports = load_reports(records)
    parts = [f"{len(records)} pool models on {args.data}\n"]
    studies = pool_studies(args)
    for name in studies:
        labels, tsets, title = POOL_STUDIES[name]
        for tset in tsets:
            table = write_study(args.out, name, group_runs(records, reports, labels, tset),
                                tset, f"{title}, {args.data}")
            parts.append(f"## {name}, {tset}\n\n{table}\n")
    if len(studies) == len(POOL_STUDIES):  # both read every model of the pool
        parts.append(_pool_spearman(args, records, reports))
        parts.append(_pool_cosine(args, records, reports))
    text = "\n".join(parts)
    (args.out / "summary.md").write_text(text)
    print(text)


def _pool_spearman(args, records: list[dict], reports: list[Report]) -> str:
    rows = ["| models | transformation | metric | source | " + " | ".join(
        ("Early", "Middle", "Late", "Pool", "Final")) + " |", "|---" * 9 + "|"]
    payload = {}
    for subset, keep in (("all", lambda r: True),
                         ("cnn7", lambda r: r["label"].startswith("cnn7"))):
        more, data = spearman_rows(records, reports, subset, keep)
        rows += more
        payload.update(data)
    payload["accuracies"] = {f"{r['label']} seed {r['spec']['seed']}": r["accuracy"]
                             for r in records}
    table = "\n".join(rows)
    write_results(args.out, "accuracy", payload, table)
    return f"## Spearman with accuracy: rho (two-sided p)\n\n{table}\n"


def _pool_cosine(args, records: list[dict], reports: list[Report]) -> str:
    rows, per = cosine_rows(records, reports)
    table = "\n".join(["| group | models | trained: r(activation, correlation inv) | "
                       "trained: r(activation, cosine inv) | random init: r(activation, "
                       "correlation inv) | random init: r(activation, cosine inv) |",
                       "|---" * 6 + "|"] + rows)
    write_results(args.out, "cosine", per, table)
    return f"## cosine vs activation (rot90, layers before pooling)\n\n{table}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["task", "augment", "width", "arch", "accuracy", "cosine",
                                          "pool", "pool-summary"])
    p.add_argument("--quick", action="store_true", help="a few minutes instead of tens")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first seed (to split one study's seeds over processes)")
    p.add_argument("--images", type=int, default=2000, help="test images measured")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default="digits6",
                   help="task: the upright dataset (digits6, fashion-mnist, ...)")
    p.add_argument("--epochs", type=int, default=None, help="task: training epochs")
    p.add_argument("--train-images", type=int, default=None,
                   help="task: a seeded subset of the training split (default: all)")
    p.add_argument("--test-images", type=int, default=None,
                   help="task: a seeded subset of the test split (default: all)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="task: summarise the runs of these task.json files instead of "
                        "training (seeds split over processes)")
    p.add_argument("--studies", default=None,
                   help="pool, pool-summary: the pool studies to train for and summarise, "
                   "a comma list of augment,width,arch (default all; the accuracy and "
                   "cosine studies read every model, so they need all three)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--root", type=Path, default=Path("runs/le-models"), help="model runs")
    p.add_argument("--out", type=Path, default=None, help="results (default runs/le[-quick])")
    args = p.parse_args()
    args.out = args.out or Path("runs/le-quick" if args.quick else "runs/le")
    if args.threads:
        torch.set_num_threads(args.threads)
    globals()[f"cmd_{args.study.replace('-', '_')}"](args)


if __name__ == "__main__":
    main()
