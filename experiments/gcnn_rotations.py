"""Using-and-abusing-equivariance experiments (Edixhoven et al. 2023) on Fashion-MNIST.

    table1  Table 1 / figure 5: Z2CNN, P4CNN exact (28) and approximate (29);
            ``--column upright``: trained upright, tested upright, under the exact
            rotations (90/180/270) and over 0-360° in 15° steps; also logs figure 4's
            equivariance error per part during training (MSE and nmse, rot90, 128 test
            images, from random init on). ``--column rotated``: trained and tested on a
            fixed uniformly rotated copy (the paper's RotMNIST column)
    biased  figure 6: trained on rotations drawn from N(45°, sigma), sigma 20 and 40, for
            Z2CNN and the exact and approximate P4CNN; accuracy against angle
    table2  Table 2 style: plain ResNet vs P4ResNet exact (33) and approximate (32),
            seen (upright) vs unseen (90/180/270, 0-360°) rotations
    report  the tables (mean ± std over seeds) and plots from the records written so far

The paper's recipe: Adam, lr 0.01, no weight decay, batch 64, CircleCrop on train,
validation and test images; a 29 px input is the 28 px image enlarged bilinearly
(torchvision ``Resize(29)``). The paper halves the learning rate every 10 epochs; two
stopping rules here (``--rule``), the best validation epoch's weights tested in both:
``cosine`` (default): ``--max-epochs`` epochs with the learning rate decayed from 0.01 to
0 by a cosine, no early stop; ``plateau`` (the first runs): a constant lr 0.01, stopped
when the validation accuracy (on the training distribution) has not improved for
``--patience`` epochs (at most ``--max-epochs``). Each rule writes to its own folder
(``runs/gcnn-fmnist-<rule>``), so a table never mixes rules.

Data size and epochs: 3,000 training, 600 validation and 2,000 test images (500 for the
curves) and 10 epochs by default; ``--train-size 12000`` is the paper's MNIST-rot size.
Every record holds its rule, sizes and epochs, a study refuses to add runs of another
rule, size or epoch count to a folder, and the default ``--out`` appends the sizes that
differ from the defaults (``runs/gcnn-fmnist-cosine-train12000``). ``report`` also
writes the validation accuracy by epoch of the upright Table 1 runs (``table1-val.md``).

The Z2CNN / P4CNN block layout (``--layout``): ``paper`` (default; the paper's "ReLU
and then batch norm" after each layer, dropout after layers 1-5) or ``bn-relu`` (batch
norm before ReLU, dropout after all 7 layers: the layout of the first runs, in
``runs/gcnn-fmnist-<rule>``). Every Z2CNN / P4CNN record holds its layout, and a study
refuses to add one layout's runs to an ``--out`` folder holding the other's, so a table
never mixes layouts: give each layout its own ``--out``.

Each trained model appends one JSON line to ``--out/<study>.jsonl``; a rerun skips the
(label, seed) pairs already there, so an interrupted study resumes. ``--quick`` runs a
minute-long version on the built-in digits.
Example: ``PYTHONPATH=src:experiments .venv/bin/python experiments/gcnn_rotations.py
table1 --column upright --threads 1``
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
from support.rotations import (
    EarlyStopping,
    RandomRotation,
    StopTraining,
    circular_distance,
    plot_accuracy_vs_rotation,
    prepare_images,
    rotate_fixed,
    take,
)
from support.studies import mean_std
from torch.utils.data import Subset

from equivision.data import ImageDataset, get_dataset
from equivision.evaluation import accuracy_vs_rotation
from equivision.measure import write_atomic
from equivision.measure.callback import EquivarianceErrorCallback
from equivision.models import create_model
from equivision.training import TrainConfig, train
from equivision.utils import seed_everything

CURVE_ANGLES = tuple(float(a) for a in range(0, 360, 15))
RIGHT = (0.0, 90.0, 180.0, 270.0)
TABLE1 = (("z2cnn", 28, "Z2CNN (28)", {}), ("p4cnn", 28, "P4CNN exact (28)", {}),
          ("p4cnn", 29, "P4CNN approximate (29)", {}))
SIGMAS = (20.0, 40.0)
#: --layout: the Z2CNN / P4CNN arguments of each block layout
LAYOUTS = {"paper": {"order": "relu-bn", "dropout_layers": 5},
           "bn-relu": {"order": "bn-relu", "dropout_layers": 7}}
SEVEN_LAYER = ("z2cnn", "p4cnn")
SIZE_FLAGS = ("--train-size", "--val-size", "--test-size", "--curve-size")
#: the default sizes and epochs; other values get their own default --out folder
DEFAULT_SIZES = (3000, 600, 2000, 500)
DEFAULT_EPOCHS = {"cosine": 10, "plateau": 15}


@functools.lru_cache(maxsize=8)
def splits(dataset: str, size: int, n_train: int, n_val: int, n_test: int
           ) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """``(train, val, test)`` at ``size`` px, CircleCropped: train and val are disjoint
    random subsets of the training split, test a random subset of the test split (fixed
    data seed 0, the same images for every model and seed)."""
    full = get_dataset(dataset, split="train")
    test = get_dataset(dataset, split="test")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(full), generator=g)
    if n_train + n_val > len(full):
        raise ValueError(f"--train-size + --val-size = {n_train + n_val} exceeds the "
                         f"{len(full)} training images of {dataset}")
    tr = take(full, perm[:n_train], f"{dataset}/train")
    va = take(full, perm[n_train:n_train + n_val], f"{dataset}/val")
    te = take(test, torch.randperm(len(test), generator=g)[:n_test], f"{dataset}/test")
    return prepare_images(tr, size), prepare_images(va, size), prepare_images(te, size)


def angles_like(n: int, seed: int, mean: float | None, sigma: float = 0.0) -> torch.Tensor:
    """``(n,)`` fixed angles: uniform in [0, 360) (``mean=None``) or ``N(mean, sigma)``."""
    g = torch.Generator().manual_seed(seed)
    if mean is None:
        return torch.rand(n, generator=g) * 360.0
    return mean + sigma * torch.randn(n, generator=g)


def fit(args, model_name: str, size: int, seed: int, train_set, val_set, augment=None,
        callbacks=(), **kwargs) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a fresh model with the paper's recipe and early stopping; returns the model
    at its best validation epoch and ``{"epochs_run", "best_epoch", "val_acc",
    "train_acc"}``."""
    seed_everything(seed)
    model = create_model(model_name, in_channels=1, num_classes=10, **kwargs)
    cosine = args.rule == "cosine"
    stop = EarlyStopping(args.max_epochs if cosine else args.patience)
    cfg = TrainConfig(epochs=args.max_epochs, batch_size=64, lr=0.01, optimizer="adam",
                      weight_decay=0.0, schedule="cosine" if cosine else "constant",
                      seed=seed, device="cpu")
    history: dict[str, list] = {"val_acc": [], "train_acc": []}

    class Log:  # keeps the history when StopTraining ends train() early
        def on_epoch_end(self, epoch, model, h):
            history.update(val_acc=h["val_acc"], train_acc=h["train_acc"])

    for cb in callbacks:  # random-init baseline for error loggers
        cb.on_epoch_end(0, model, {})
    try:
        train(model, train_set, val_set, cfg, augment=augment,
              callbacks=[Log(), *callbacks, stop], progress=False)
    except StopTraining:
        pass
    info = {"epochs_run": len(history["val_acc"]), "best_epoch": stop.best_epoch,
            "val_acc": history["val_acc"], "train_acc": history["train_acc"]}
    return stop.restore(model).eval(), info


def record_layout(rec: dict[str, Any]) -> str | None:
    """A record's ``--layout`` (records written before the option: ``bn-relu``); None for
    models other than Z2CNN / P4CNN."""
    return rec.get("layout", "bn-relu") if rec.get("model") in SEVEN_LAYER else None


def check_layout(out: Path, layout: str) -> None:
    """Raise ``ValueError`` if a Z2CNN / P4CNN record in ``out/*.jsonl`` has another
    layout than ``layout`` (one folder, one layout: its tables never mix them)."""
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            found = record_layout(json.loads(line)) if line.strip() else None
            if found not in (None, layout):
                raise ValueError(f"{path} holds runs of --layout {found}, not {layout}: pass "
                                 f"--layout {found} or another --out folder")


def recipe(args) -> dict[str, Any]:
    """What a study folder holds one of: the stopping rule, the data sizes ``[train, val,
    test, curve]`` and the epochs; every record carries these fields."""
    return {"rule": args.rule, "sizes": [args.train_size, args.val_size, args.test_size,
                                         args.curve_size], "max_epochs": args.max_epochs}


def recipe_conflict(rec: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first field where ``rec`` differs from ``want`` as ``"--flag value"`` of the
    record (records written before ``--rule``: plateau), or None if none differs."""
    rule = rec.get("rule", "plateau")
    if rule != want["rule"]:
        return f"--rule {rule}"
    sizes = rec.get("sizes", want["sizes"])
    for flag, have, wanted in zip(SIZE_FLAGS, sizes, want["sizes"]):
        if have != wanted:
            return f"{flag} {have}"
    if rec.get("max_epochs", want["max_epochs"]) != want["max_epochs"]:
        return f"--max-epochs {rec['max_epochs']}"
    return None


def done_keys(path: Path, want: dict[str, Any]) -> set[tuple[str, int]]:
    """The (label, seed) pairs already recorded in ``path`` (a JSON-lines file); raises
    ``ValueError`` if a record there has another :func:`recipe` than ``want`` (another
    stopping rule, data size or number of epochs), so a table never mixes them."""
    if not path.exists():
        return set()
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for rec in recs:
        found = recipe_conflict(rec, want)
        if found:
            raise ValueError(f"{path} holds runs of {found}, not this run's: pass "
                             f"{found} or another --out folder")
    return {(r["label"], r["seed"]) for r in recs}


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def data_for(args, size: int):
    return splits(args.dataset, size, args.train_size, args.val_size, args.test_size)


def curve_set(args, test: ImageDataset) -> Subset:
    return Subset(test, range(min(args.curve_size, len(test))))


def run_upright(args, model_name: str, size: int, label: str, seed: int, kwargs) -> dict:
    """One Table 1 / Table 2 upright run, with figure 4's error log for group models."""
    tr, va, te = data_for(args, size)
    cbs = []
    if model_name in ("p4cnn", "z2cnn"):
        cbs = [EquivarianceErrorCallback(te, "rot90", max_images=128, metrics=("mse", "nmse"))]
    model, info = fit(args, model_name, size, seed, tr, va, callbacks=cbs, **kwargs)
    right = accuracy_vs_rotation(model, te, RIGHT)
    curve = accuracy_vs_rotation(model, curve_set(args, te), CURVE_ANGLES)
    errors = [{"epoch": h["epoch"], "parts": h["parts"]} for h in cbs[0].history] if cbs else []
    return {**info, "right": right, "curve": curve, "errors": errors}


def run_rotated(args, model_name: str, size: int, label: str, seed: int, kwargs) -> dict:
    """One rotated-training run: train, val and test each rotated once, uniformly."""
    tr, va, te = data_for(args, size)
    tr, va, te = (rotate_fixed(d, angles_like(len(d), 100 + i, None))
                  for i, d in enumerate((tr, va, te)))
    model, info = fit(args, model_name, size, seed, tr, va, **kwargs)
    return {**info, "rotated_test": accuracy_vs_rotation(model, te, (0.0,), crop=True)[0.0]}


def run_biased(args, model_name: str, size: int, label: str, seed: int, kwargs,
               sigma: float) -> dict:
    """One figure 6 run: rotations ~ N(45°, sigma) in training and validation."""
    tr, va, te = data_for(args, size)
    va = rotate_fixed(va, angles_like(len(va), 200, 45.0, sigma))
    model, info = fit(args, model_name, size, seed, tr, va,
                      augment=RandomRotation(45.0, sigma), **kwargs)
    return {**info, "sigma": sigma,
            "curve": accuracy_vs_rotation(model, curve_set(args, te), CURVE_ANGLES)}


def run_study(args, study: str, jobs) -> None:
    """Run ``jobs`` = ``[(label, seed, fn, fn_args)]`` not yet in ``study``'s records."""
    path = args.out / f"{study}.jsonl"
    done = done_keys(path, recipe(args))
    if any(job[3][0] in SEVEN_LAYER for job in jobs):
        check_layout(args.out, args.layout)
    for label, seed, fn, fn_args in jobs:
        if (label, seed) in done or seed < args.first_seed or args.only not in label:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        rec = fn(args, *fn_args)
        rec.update(study=study, label=label, seed=seed, model=fn_args[0], size=fn_args[1],
                   wall_s=round(time.perf_counter() - t0, 1),
                   cpu_s=round(time.process_time() - c0, 1), dataset=args.dataset,
                   patience=args.patience, **recipe(args))
        if fn_args[0] in SEVEN_LAYER:
            rec["layout"] = args.layout
        append_record(path, rec)
        print(f"{study} {label} seed {seed}: best epoch {rec['best_epoch']} of "
              f"{rec['epochs_run']}, {rec['wall_s']} s wall, {rec['cpu_s']} s CPU", flush=True)


def with_dropout(args, study: str) -> tuple[str, dict[str, Any]]:
    """The study's name and the Z2CNN / P4CNN arguments: ``--layout``'s, and ``--dropout``
    (a study of its own, ``<study>-dropout<p>``, so the default dropout's records stay
    apart)."""
    extra: dict[str, Any] = dict(LAYOUTS[args.layout])
    if args.dropout is None:
        return study, extra
    return f"{study}-dropout{args.dropout:g}", {**extra, "dropout": args.dropout}


def cmd_table1(args) -> None:
    fn = run_upright if args.column == "upright" else run_rotated
    study, extra = with_dropout(args, f"table1-{args.column}")
    jobs = [(label, s, fn, (m, size, label, s, {**kw, **extra})) for s in range(args.seeds)
            for m, size, label, kw in TABLE1]
    run_study(args, study, jobs)


def cmd_table2(args) -> None:
    kw = {"depth": args.resnet_depth}
    configs = (("resnet44", 33, "ResNet (33)", kw), ("p4resnet44", 33, "P4ResNet exact (33)", kw),
               ("p4resnet44", 32, "P4ResNet approximate (32)", kw))
    jobs = [(label, s, run_upright, (m, size, label, s, kw)) for s in range(args.seeds)
            for m, size, label, kw in configs]
    run_study(args, "table2", jobs)


def cmd_biased(args) -> None:
    study, extra = with_dropout(args, "biased")
    jobs = [(f"{label} sigma {sigma:g}", s, run_biased,
             (m, size, label, s, {**kw, **extra}, sigma))
            for s in range(args.seeds) for sigma in args.sigmas for m, size, label, kw in TABLE1]
    run_study(args, study, jobs)


def load_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``{label: [record per seed]}`` from a JSON-lines file (empty if there is none)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["label"], []).append(rec)
    return out


def layout_title(recs_by_label: dict[str, list[dict[str, Any]]]) -> str:
    """``", layout <name>"`` for plot titles when the records hold Z2CNN / P4CNN runs."""
    found = {record_layout(r) for rs in recs_by_label.values() for r in rs} - {None}
    return f", layout {', '.join(sorted(found))}" if found else ""


def cell(values, fmt: str = ".3f") -> str:
    """``"mean ± std"`` of the defined values (sample std over seeds), or ``"-"``."""
    m, sd = mean_std(list(values))
    return "-" if m is None else f"{m:{fmt}} ± {sd:{fmt}}"


def mean_curve(recs) -> dict[float, float]:
    return {float(a): sum(r["curve"][a] for r in recs) / len(recs) for a in recs[0]["curve"]}


def rotation_rows(recs_by_label, rotated=None) -> list[str]:
    """Markdown rows: label, seeds, epochs, upright, 90/180/270, 0-360°, rotated column."""
    rows = []
    for label, recs in recs_by_label.items():
        rot = (rotated or {}).get(label, [])
        rows.append(" | ".join([
            f"| {label}", str(len(recs)), cell((r["best_epoch"] for r in recs), ".1f"),
            cell(r["right"]["0.0"] for r in recs),
            cell(sum(r["right"][a] for a in ("90.0", "180.0", "270.0")) / 3 for r in recs),
            cell(sum(r["curve"].values()) / len(r["curve"]) for r in recs),
            cell(r["rotated_test"] for r in rot) + (f" ({len(rot)})" if rot else "")]) + " |")
    return rows


def rotation_table(out: Path, upright: str, rotated: str | None, png: str) -> str:
    """Table 1 / Table 2 from ``out/<upright>.jsonl`` (and the rotated column from
    ``out/<rotated>.jsonl``); draws the mean accuracy-against-angle curves to ``png``."""
    recs = load_records(out / f"{upright}.jsonl")
    rot = load_records(out / f"{rotated}.jsonl") if rotated else {}
    if not recs and not rot:
        return ""
    head = ["| model | seeds | best epoch | upright | rot 90/180/270 | mean 0-345° "
            "| trained+tested rotated (seeds) |", "|---|---|---|---|---|---|---|"]
    if recs:
        plot_accuracy_vs_rotation({k: mean_curve(v) for k, v in recs.items()}, out / png,
                                  "trained upright, CircleCrop, mean over seeds"
                                  + layout_title(recs))
    extra = [f"| {k} (rotated only) | - | - | - | - | - | {cell(r['rotated_test'] for r in v)}"
             f" ({len(v)}) |" for k, v in rot.items() if k not in recs]
    return "\n".join([*head, *rotation_rows(recs, rot), *extra])


def val_table(out: Path, study: str) -> str:
    """The validation accuracy by epoch (mean ± std over seeds) of each model in
    ``out/<study>.jsonl``, to see whether it had stopped improving; markdown, one row per
    model and epoch (empty if there are no records)."""
    recs = load_records(out / f"{study}.jsonl")
    rows = ["| model | epoch | seeds | validation accuracy | gain on the epoch before |",
            "|---|---|---|---|---|"]
    for label, rs in recs.items():
        for e in range(max(len(r["val_acc"]) for r in rs)):
            have = [r["val_acc"] for r in rs if len(r["val_acc"]) > e]
            gain = cell(v[e] - v[e - 1] for v in have) if e else "-"
            rows.append(f"| {label} | {e + 1} | {len(have)} | {cell(v[e] for v in have)} "
                        f"| {gain} |")
    return "\n".join(rows) if recs else ""


def part_error(rec: dict[str, Any], index: int, part: str, metric: str) -> float | None:
    """The logged ``metric`` of ``part`` at entry ``index`` of ``rec``'s error history."""
    return rec["errors"][index]["parts"].get(part, {}).get(metric)


def error_table(out: Path) -> str:
    """Figure 4: error per part at random init, after epoch 1 and at the last epoch."""
    recs = load_records(out / "table1-upright.jsonl")
    rows = ["| model | part | MSE init | MSE ep 1 | MSE last | nmse init | nmse ep 1 | "
            "nmse last | MSE last/ep1 | nmse last/ep1 |", "|---" * 10 + "|"]
    for label, rs in recs.items():
        for part in ("Early", "Middle", "Late", "Pool", "Final"):
            if part_error(rs[0], 0, part, "mse") is None:
                continue
            cells = [cell((part_error(r, i, part, m) for r in rs), ".2e")
                     for m in ("mse", "nmse") for i in (0, 1, -1)]
            cells += [cell((part_error(r, -1, part, m) / part_error(r, 1, part, m) for r in rs
                            if part_error(r, 1, part, m)), ".2f") for m in ("mse", "nmse")]
            rows.append(f"| {label} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def band_mean(curve: dict[str, float], lo: float, hi: float) -> float:
    """Mean accuracy over the angles whose circular distance to 45° is in ``[lo, hi]``."""
    xs = [v for a, v in curve.items() if lo <= circular_distance(float(a), 45.0) <= hi]
    return sum(xs) / len(xs)


def biased_table(out: Path) -> str:
    """Figure 6: accuracy within 45° ± sigma (seen) and beyond 45° ± 2 sigma (unseen)."""
    recs = load_records(out / "biased.jsonl")
    rows = ["| model | sigma | seeds | within 45°±sigma | beyond 45°±2 sigma | mean 0-345° |",
            "|---|---|---|---|---|---|"]
    for label, rs in recs.items():
        sigma = rs[0]["sigma"]
        rows.append(f"| {label.rsplit(' sigma', 1)[0]} | {sigma:g} | {len(rs)} | "
                    f"{cell(band_mean(r['curve'], 0, sigma) for r in rs)} | "
                    f"{cell(band_mean(r['curve'], 2 * sigma + 1e-9, 180) for r in rs)} | "
                    f"{cell(band_mean(r['curve'], 0, 180) for r in rs)} |")
    if recs:
        plot_accuracy_vs_rotation({k: mean_curve(v) for k, v in recs.items()},
                                  out / "biased.png", "trained on rotations ~ N(45°, sigma), "
                                  "CircleCrop, mean over seeds" + layout_title(recs))
    return "\n".join(rows) if recs else ""


def cmd_report(args) -> None:
    parts = {"table1": rotation_table(args.out, "table1-upright", "table1-rotated",
                                      "table1.png"),
             "errors": error_table(args.out), "biased": biased_table(args.out),
             "table2": rotation_table(args.out, "table2", None, "table2.png"),
             "table1-val": val_table(args.out, "table1-upright")}
    suffixes = {path.stem.rsplit("-", 1)[1] for path in args.out.glob("table1-*-dropout*.jsonl")}
    for suffix in sorted(suffixes):  # e.g. "dropout0": its upright and rotated columns
        parts[f"table1-{suffix}"] = rotation_table(
            args.out, f"table1-upright-{suffix}", f"table1-rotated-{suffix}",
            f"table1-{suffix}.png")
    for name, text in parts.items():
        if text:
            write_atomic(args.out / f"{name}.md", text + "\n")
            print(f"## {name}\n{text}\n")


def default_out(args) -> Path:
    """``runs/gcnn-fmnist-<rule>``, with the sizes that differ from the defaults appended
    (``runs/gcnn-fmnist-cosine-train12000``), so each data size has its own folder (another
    ``--max-epochs`` is refused there: give it an ``--out``); ``runs/gcnn-quick`` for
    ``--quick``."""
    if args.quick:
        return Path("runs/gcnn-quick")
    parts = [f"{flag[2:].split('-')[0]}{have}" for flag, have, default in
             zip(SIZE_FLAGS, recipe(args)["sizes"], DEFAULT_SIZES) if have != default]
    return Path("-".join([f"runs/gcnn-fmnist-{args.rule}", *parts]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["table1", "table2", "biased", "report"])
    p.add_argument("--column", choices=["upright", "rotated"], default="upright",
                   help="table1: train upright or on the uniformly rotated copy")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-size", type=int, default=DEFAULT_SIZES[0],
                   help="training images (the paper's MNIST-rot: 12000)")
    p.add_argument("--val-size", type=int, default=DEFAULT_SIZES[1])
    p.add_argument("--test-size", type=int, default=DEFAULT_SIZES[2],
                   help="test images for upright/90°/rotated accuracy")
    p.add_argument("--curve-size", type=int, default=DEFAULT_SIZES[3],
                   help="test images for the accuracy-against-angle curves")
    p.add_argument("--rule", choices=["cosine", "plateau"], default="cosine",
                   help="cosine: lr decayed to 0 over --max-epochs; plateau: constant lr, "
                   "stop after --patience epochs without a validation gain")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs (cosine; default 10) or the cap (plateau; default 15)")
    p.add_argument("--patience", type=int, default=3, help="plateau only")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="skip the seeds below this (to split a study between processes)")
    p.add_argument("--only", default="", help="run only the labels containing this text")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS),
                   help="biased: the standard deviations (degrees) of the training angles")
    p.add_argument("--dropout", type=float, default=None,
                   help="table1, biased: the Z2CNN/P4CNN dropout (default: the models' 0.3); "
                   "recorded as a study of its own, <study>-dropout<p>")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="paper",
                   help="table1, biased: Z2CNN/P4CNN blocks as in the paper (conv, ReLU, batch "
                   "norm; dropout after layers 1-5) or bn-relu (batch norm before ReLU, dropout "
                   "after all 7: the first runs' layout); one layout per --out folder")
    p.add_argument("--resnet-depth", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="digits, 300/100/200 images, 3 epochs, 1 seed")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.train_size, args.val_size = "digits", 300, 100
        args.test_size, args.curve_size, args.max_epochs, args.seeds = 200, 100, 3, 1
    if args.max_epochs is None:
        args.max_epochs = DEFAULT_EPOCHS[args.rule]
    args.out = args.out or default_out(args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    globals()[f"cmd_{args.study}"](args)


if __name__ == "__main__":
    main()
