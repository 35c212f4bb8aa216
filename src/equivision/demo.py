"""The main job (``make demo``): train or reuse a small CNN on the built-in digits,
measure it, and write ``report.md`` with its plots.

Later parts of the project add their own sections: a section is a function
``(ctx: DemoContext) -> str`` returning Markdown, appended to :data:`SECTIONS`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import get_dataset
from .gcnn.demo import section_exactness
from .io import write_atomic
from .measure import Report, measure
from .measure.lie_demo import section_lie_derivative
from .models import create_model
from .robust.demo import section_defense
from .ssl.demo import section_ser
from .training import TrainConfig, evaluate, train
from .utils import model_device, resolve_device


@dataclass
class DemoContext:
    """What the sections share: output directory, device and options."""

    out: Path
    device: str = "auto"
    epochs: int = 15
    progress: bool = True
    artifacts: dict[str, object] = field(default_factory=dict)


def _digits_model(ctx: DemoContext):
    """Train the paper's 7-layer CNN on digits at 28 px, or reuse the cached run."""
    device = resolve_device(ctx.device)
    train_set = get_dataset("digits", split="train", size=28)
    test_set = get_dataset("digits", split="test", size=28)
    model = create_model("cnn7", in_channels=1, num_classes=10)
    run_dir = ctx.out / "cnn7-digits"
    config = TrainConfig(epochs=ctx.epochs, batch_size=64, lr=0.05, optimizer="sgd",
                         weight_decay=5e-4, seed=0, device=str(device))
    last = run_dir / "last.pt"
    cached = False
    if last.exists():
        state = load_checkpoint(last)
        if int(state.get("epoch", 0)) >= ctx.epochs:
            model.load_state_dict(state["model"])
            cached = True
    t0 = time.time()
    if not cached:
        train(model, train_set, test_set, config, out_dir=run_dir, resume=last.exists(),
              progress=ctx.progress)
    model.to(device).eval()
    metrics = evaluate(model, test_set, batch_size=256, device=device)
    return model, test_set, metrics, cached, time.time() - t0


def section_measurement(ctx: DemoContext) -> str:
    """Learned in/equivariance per layer of a CNN trained on digits, beside the same
    architecture at random initialisation and the channel-redundancy baseline."""
    model, test_set, metrics, cached, seconds = _digits_model(ctx)
    ctx.artifacts["digits_model"] = (model, test_set)
    transforms = "rot90,hflip,shift:1-4"
    t0 = time.time()
    report = measure(model, test_set, transforms, device=model_device(model),
                     model_name="cnn7 (digits, 28 px)", progress=ctx.progress,
                     random_init=True, init_seed=0)
    measure_s = time.time() - t0
    files = report.save(ctx.out / "measure")
    ctx.artifacts["measure_report"] = report
    how = ("reused the cached checkpoint" if cached else
           f"trained for {ctx.epochs} epochs in {seconds:.0f} s")
    rots = [t for t in report.transforms if t.startswith("rot")]
    trained = report.part_summary(("equivariance", "redundancy"), transforms=rots)
    baseline = report.part_summary(("equivariance",), transforms=rots, source="random_init")
    lines = [
        "## Learned equivariance of a 7-layer CNN on digits",
        "",
        f"The paper's 7-layer CNN (`cnn7`, 20 channels, max pooling after layer 2) {how} on "
        f"the built-in digits at 28 px; test accuracy **{metrics['accuracy']:.3f}** on "
        f"{len(test_set)} images. Measured under `{transforms}` on the test split "
        f"({report.n_images} images, {measure_s:.1f} s with the baseline): Pearson "
        "correlation per channel, invariance (same channel) and equivariance "
        "(best-matching channel), over valid positions only, with 95% bootstrap "
        "intervals over images (bands).",
        "",
        "Two baselines sit beside every curve: the same `cnn7` at random initialisation "
        "(seed 0, dashed) and the channel redundancy (dotted), the best correlation of a "
        "channel with another channel of the same map. A pattern the random network "
        "already shows is not learned, and an equivariance no higher than the redundancy "
        "can come from redundant channels alone" + _baseline_sentence(trained, baseline),
        "",
        f"![measures per layer]({files['png'].relative_to(ctx.out)})",
        "",
        _part_table(report),
        "",
        "Shifts that are not a whole number of positions at a layer's stride are reported "
        "as inexact and left out of the part means (see `measure/report.csv`, which also "
        "holds every interval and the channel each channel matches).",
    ]
    return "\n".join(lines)


def _baseline_sentence(trained: dict, baseline: dict) -> str:
    """The end of the baselines sentence: equivariance under rotations, trained against
    random init, and the redundancy, in the Early and Late parts."""
    said = [f"{part} equivariance is {_f(trained[part]['equivariance'])} trained against "
            f"{_f(baseline[part]['equivariance'])} at random initialisation (redundancy "
            f"{_f(trained[part]['redundancy'])})"
            for part in ("Early", "Late") if part in trained and part in baseline]
    return "; under rotations, " + ", ".join(said) + "." if said else "."


def _part_table(report: Report) -> str:
    """Part means per group of transformations, trained and at random initialisation
    (``rand``), with the channel redundancy of both."""
    shown = ("invariance", "equivariance", "redundancy")
    head = ("| transformation | part | invariance | rand | equivariance | rand | redundancy | "
            "rand | MSE |")
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    groups = {"rot90 / 180 / 270": [t for t in report.transforms if t.startswith("rot")],
              "hflip": [t for t in report.transforms if t == "hflip"],
              "shifts": [t for t in report.transforms if t.startswith("shift")]}
    for label, ts in groups.items():
        if not ts:
            continue
        summary = report.part_summary((*shown, "mse"), transforms=ts)
        rand = report.part_summary(shown, transforms=ts, source="random_init")
        for part, vals in summary.items():
            cells = [c for m in shown for c in (_f(vals[m]), _f(rand[part][m]))]
            rows.append(f"| {label} | {part} | " + " | ".join(cells)
                        + f" | {_f(vals['mse'])} |")
    return "\n".join(rows)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def section_studies(ctx: DemoContext) -> str:
    """One plot of the learned-equivariance studies, from cached results: the full
    study trains tens of models, too long for the demo."""
    cached = Path(__file__).resolve().parents[2] / "docs" / "figures" / "le-task-fmnist.png"
    lines = ["## Does a symmetric task make layers equivariant? (cached study)", ""]
    how = ("`experiments/learned_equivariance.py task --data fashion-mnist` (cnn7 on "
           "Fashion-MNIST and its rotation-invariant and rotation-equivariant variants, 3 "
           "seeds, 5 epochs on 6,000 images, each model beside its random-init copy and the "
           "channel redundancy), run on 2026-11-30; numbers and caveats in "
           "`docs/results.md`.")
    if not cached.exists():
        return "\n".join(lines + [f"No cached result found; run {how}"])
    shutil.copyfile(cached, ctx.out / cached.name)
    return "\n".join(lines + [
        f"From cached results made by {how} Equivariance falling with depth, and "
        "equivariance far above invariance, are already there at random initialisation, so "
        "they are not learned; what training adds is a rise after the pooling where the "
        "task imposes the symmetry, and higher Early equivariance. In Early and Middle the "
        "trained equivariance is at or below the channel redundancy for every task.", "",
        f"![task study]({cached.name})"])


#: Report sections, in order. Later parts of the project append theirs.
SECTIONS: list[Callable[[DemoContext], str]] = [
    section_measurement, section_lie_derivative, section_studies, section_exactness,
    section_defense, section_ser]  # from measure/, gcnn/, robust/, ssl/ but the first


def run_demo(out: Path, epochs: int = 15, device: str = "auto", progress: bool = True) -> Path:
    """Run every section and write ``out/report.md``; returns its path."""
    torch.manual_seed(0)
    ctx = DemoContext(out=Path(out), device=device, epochs=epochs, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    parts = [
        "# equivision demo report",
        "",
        f"Made by `make demo` (`equivision demo --out {out}`) on {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}; all data built in (scikit-learn digits).",
        "",
    ]
    for section in SECTIONS:
        parts += [section(ctx), ""]
    parts.append(f"_Total time {time.time() - t0:.0f} s._")
    path = ctx.out / "report.md"
    write_atomic(path, "\n".join(parts) + "\n")
    return path
