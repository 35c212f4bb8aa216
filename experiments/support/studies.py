"""Building blocks of the learned-equivariance studies: train a model (or reuse a
finished run), measure it, and summarise measures per part over seeds.

Experiment support, not library API: the scripts in ``experiments/`` import it as
``support.studies`` and only configure these calls and write results.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch

from equivision.augment import build_augment
from equivision.checkpoint import load_checkpoint
from equivision.data import DATASETS, get_dataset
from equivision.data.base import ImageDataset
from equivision.data.rotated import RIGHT_ANGLES, RotatedDataset
from equivision.io import save_png, write_atomic
from equivision.measure import PARTS, Report, measure
from equivision.models import create_model, model_defaults
from equivision.training import TrainConfig, evaluate, train
from equivision.utils import resolve_device, seed_everything

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


@dataclass
class RunSpec:
    """One training run: model, data, augmentation, seed and schedule."""

    model: str
    data: str
    seed: int = 0
    size: int | None = None
    epochs: int = 10
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: str = "none"
    lr: float = 0.05
    optimizer: str = "sgd"
    batch_size: int = 64
    weight_decay: float = 5e-4
    train_images: int | None = None  # a seeded subset of the training split
    test_images: int | None = None  # a seeded subset of the test split

    @property
    def name(self) -> str:
        kw = "-".join(f"{k}{v}" for k, v in sorted(self.model_kwargs.items()))
        sub = "".join(f"{tag}{n}" for tag, n in (("n", self.train_images),
                                                  ("t", self.test_images)) if n)
        parts = [self.model, kw, self.data, sub, f"s{self.size}" if self.size else "",
                 self.augment.replace(",", "+").replace(":", "_"), f"e{self.epochs}",
                 f"seed{self.seed}"]
        return "_".join(p for p in parts if p)


def train_run(spec: RunSpec, root: Path, device: str = "auto", progress: bool = False):
    """Train ``spec`` under ``root/spec.name`` (resuming or reusing a finished run).

    Returns ``(model, test_set, test_accuracy)``; the model is in eval mode.
    """
    dev = resolve_device(device)
    train_set = study_dataset(spec.data, "train", spec.size, spec.train_images)
    test_set = study_dataset(spec.data, "test", spec.size, spec.test_images)
    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("num_classes", train_set.num_classes)
    kwargs.setdefault("in_channels", train_set.image_shape[0])
    if "image_size" in model_defaults(spec.model):
        kwargs.setdefault("image_size", train_set.image_shape[-1])
    seed_everything(spec.seed)
    model = create_model(spec.model, **kwargs)
    run_dir = root / spec.name
    last = run_dir / "last.pt"
    done = last.exists() and int(load_checkpoint(last).get("epoch", 0)) >= spec.epochs
    if done:
        model.load_state_dict(load_checkpoint(last)["model"])
    else:
        augment = build_augment(spec.augment, num_classes=train_set.num_classes)
        config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                             optimizer=spec.optimizer, weight_decay=spec.weight_decay,
                             seed=spec.seed, device=str(dev))
        train(model, train_set, test_set, config, out_dir=run_dir, resume=last.exists(),
              augment=augment if augment.augmentations else None, progress=progress)
    model.to(dev).eval()
    acc = evaluate(model, test_set, batch_size=256, device=dev)["accuracy"]
    return model, test_set, acc


#: Suffixes of a registered dataset's name that give its rotated-label variants (section
#: 4.3): each image rotated by a random multiple of 90°, label kept (``-rotinv``) or
#: ``label * 4 + rotation index`` (``-roteq``).
ROTATED_VARIANTS = {"-rotinv": "keep", "-roteq": "equivariant"}


def study_dataset(data: str, split: str, size: int | None = None,
                  limit: int | None = None) -> ImageDataset:
    """The dataset ``data`` (a registered name, or one plus a :data:`ROTATED_VARIANTS`
    suffix such as ``"fashion-mnist-roteq"``), ``limit`` images of it drawn with a fixed
    seed (0) before rotating; items ``(image (C, H, W), label)``.

    Raises:
        ValueError: ``limit`` below 1, or an unknown name (the registry's message).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"the image limit must be at least 1, got {limit}")
    base_name, mode = data, None
    for suffix, label_mode in ROTATED_VARIANTS.items():
        if data.endswith(suffix) and data not in DATASETS and data[:-len(suffix)] in DATASETS:
            base_name, mode = data[:-len(suffix)], label_mode
    ds = get_dataset(base_name, split=split, size=size, seed=0)
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(0)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[:limit].sort().values)
    if mode is not None:
        ds = RotatedDataset(ds, angles=RIGHT_ANGLES, seed=0, label_mode=mode).materialize()
    ds.name = f"{data}/{split}"
    return ds


def measure_path(root: Path, spec: RunSpec, transforms: str, random_init: bool) -> Path:
    """Where ``spec``'s measurement under ``transforms`` is saved:
    ``root/spec.name/measure-<transforms>[-ri].json`` (``-ri``: with the random-init
    baseline)."""
    return root / spec.name / f"measure-{_slug(transforms)}{'-ri' if random_init else ''}.json"


def train_and_measure(spec: RunSpec, root: Path, transforms: str, max_images: int = 2000,
                      device: str = "auto", progress: bool = False,
                      margin: int = 0, random_init: bool = False) -> dict[str, Any]:
    """Train (or reuse) ``spec``, measure it under ``transforms`` on its test split.

    Returns ``{"spec", "accuracy", "parts": {part: {metric: value}}, "report": path,
    "seconds"}``; the report is saved as ``root/spec.name/measure-<transforms>.json``.
    With ``random_init`` the same architecture at random initialisation (seeded with
    ``spec.seed``) is measured in the same pass and ``"parts_random_init"`` holds its
    part means (the report file then ends in ``-ri.json``).
    """
    t0 = time.time()
    model, test_set, acc = train_run(spec, root, device, progress)
    rep = measure(model, test_set, transforms, max_images=max_images, progress=progress,
                  model_name=spec.name, margin=margin, random_init=random_init,
                  init_seed=spec.seed)
    path = measure_path(root, spec, transforms, random_init)
    rep.save_json(path)
    out = {"spec": asdict(spec), "accuracy": acc, "parts": rep.part_summary(),
           "report": str(path), "seconds": time.time() - t0}
    if random_init:
        out["parts_random_init"] = rep.part_summary(source="random_init")
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the defined values (std 0 for one)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(runs: Sequence[dict[str, Any]], metrics: Sequence[str] = ("invariance",
              "equivariance")) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """``{part: {metric: (mean, std)}}`` over runs (e.g. seeds), plus ``accuracy``."""
    out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for part in PARTS:
        if not any(part in r["parts"] for r in runs):
            continue
        out[part] = {m: mean_std([r["parts"].get(part, {}).get(m) for r in runs])
                     for m in metrics}
    out["accuracy"] = {"accuracy": mean_std([r["accuracy"] for r in runs])}
    return out


#: Columns of :func:`summarise_baselines`: the trained values, the same architecture at
#: random initialisation, their per-seed difference, and the channel-redundancy baseline.
BASELINE_COLUMNS = ("invariance", "random-init invariance", "Δ invariance", "equivariance",
                    "random-init equivariance", "Δ equivariance", "redundancy",
                    "random-init redundancy", "equivariance - redundancy")


def summarise_baselines(runs: Sequence[dict[str, Any]],
                        columns: Sequence[str] = BASELINE_COLUMNS,
                        ) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """``{part: {column: (mean, std)}}`` over runs measured with ``random_init``, for
    ``columns`` (:data:`BASELINE_COLUMNS` by default: ``"random-init <metric>"`` reads the
    random-init part means, any other plain name the trained ones); ``Δ`` is trained
    minus random init and ``equivariance - redundancy`` the trained equivariance above
    its own channel redundancy, both per run and then averaged (so their std is the seed
    spread of the difference). Plus ``accuracy``.
    """
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def column(r: dict[str, Any], part: str, col: str) -> float | None:
        trained, rand = r["parts"].get(part, {}), r["parts_random_init"].get(part, {})
        if col.startswith("Δ "):
            return diff(trained.get(col[2:]), rand.get(col[2:]))
        if " - " in col:
            first, second = col.split(" - ")
            return diff(trained.get(first), trained.get(second))
        if col.startswith("random-init "):
            return rand.get(col[len("random-init "):])
        return trained.get(col)

    out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for part in PARTS:
        if any(part in r["parts"] for r in runs):
            out[part] = {c: mean_std([column(r, part, c) for r in runs])
                         for c in columns}
    out["accuracy"] = {"accuracy": mean_std([r["accuracy"] for r in runs])}
    return out


def markdown_table(groups: dict[str, dict], metrics: Sequence[str] = ("invariance",
                   "equivariance")) -> str:
    """Rows per group and part: ``mean ± std`` of each metric, and accuracy."""
    head = "| setting | accuracy | part | " + " | ".join(metrics) + " |"
    rows = [head, "|" + "---|" * (3 + len(metrics))]
    for label, summ in groups.items():
        acc = _pm(summ["accuracy"]["accuracy"])
        for part in PARTS:
            if part in summ:
                cells = " | ".join(_pm(summ[part][m]) for m in metrics)
                rows.append(f"| {label} | {acc} | {part} | {cells} |")
    return "\n".join(rows)


def _pm(v: tuple[float | None, float | None]) -> str:
    m, sd = v
    if m is None:
        return "-"
    return f"{m:.3f} ± {sd:.3f}" if sd else f"{m:.3f}"


def plot_parts(groups: dict[str, dict], path: Path, metrics: Sequence[str] = ("invariance",
               "equivariance"), title: str = "") -> Path:
    """Per-part bars (mean ± std) per group, one panel per metric, like the paper's
    figures 5-7. Writes a PNG atomically."""

    parts = [p for p in PARTS if any(p in s for s in groups.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / max(1, len(groups))
    for ax, m in zip(axes[0], metrics):
        for gi, (label, summ) in enumerate(groups.items()):
            means = [summ.get(p, {}).get(m, (None, None))[0] for p in parts]
            sds = [summ.get(p, {}).get(m, (None, None))[1] or 0.0 for p in parts]
            xs = [i + gi * width for i in range(len(parts))]
            ax.bar(xs, [v if v is not None else float("nan") for v in means], width,
                   yerr=sds, label=label, capsize=2)
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(parts))])
        ax.set_xticklabels(parts)
        ax.set_title(m, fontsize=9)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def write_results(out: Path, name: str, payload: dict[str, Any], table: str) -> None:
    """``out/name.json`` and ``out/name.md``, both written atomically."""
    write_atomic(out / f"{name}.json", json.dumps(payload, indent=1, default=str))
    write_atomic(out / f"{name}.md", table + "\n")


def load_report(path: str | Path) -> Report:
    """Re-read a saved measurement report."""
    return Report.load_json(path)


__all__ = ["BASELINE_COLUMNS", "ROTATED_VARIANTS", "RunSpec", "load_report", "markdown_table",
           "measure_path",
           "mean_std", "plot_parts", "study_dataset", "summarise", "summarise_baselines",
           "train_and_measure", "train_run", "write_results"]
