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
    """Learned in/equivariance per layer of a CNN trained on digits."""
    model, test_set, metrics, cached, seconds = _digits_model(ctx)
    transforms = "rot90,hflip,shift:1-4"
    t0 = time.time()
    report = measure(model, test_set, transforms, device=model_device(model),
                     model_name="cnn7 (digits, 28 px)", progress=ctx.progress)
    measure_s = time.time() - t0
    files = report.save(ctx.out / "measure")
    ctx.artifacts["measure_report"] = report
    how = ("reused the cached checkpoint" if cached else
           f"trained for {ctx.epochs} epochs in {seconds:.0f} s")
    lines = [
        "## Learned equivariance of a 7-layer CNN on digits",
        "",
        f"The paper's 7-layer CNN (`cnn7`, 20 channels, max pooling after layer 2) {how} on "
        f"the built-in digits at 28 px; test accuracy **{metrics['accuracy']:.3f}** on "
        f"{len(test_set)} images. Measured under `{transforms}` on the test split "
        f"({report.n_images} images, {measure_s:.1f} s): Pearson correlation per channel, "
        "invariance (same channel) and equivariance (best-matching channel), over valid "
        "positions only.",
        "",
        f"![measures per layer]({files['png'].relative_to(ctx.out)})",
        "",
        _part_table(report),
        "",
        "Shifts that are not a whole number of positions at a layer's stride are reported "
        "as inexact and left out of the part means (see `measure/report.csv`).",
    ]
    return "\n".join(lines)


def _part_table(report: Report) -> str:
    head = "| transformation | part | invariance | equivariance | cosine inv. | MSE |"
    rows = [head, "|---|---|---|---|---|---|"]
    groups = {"rot90 / 180 / 270": [t for t in report.transforms if t.startswith("rot")],
              "hflip": [t for t in report.transforms if t == "hflip"],
              "shifts": [t for t in report.transforms if t.startswith("shift")]}
    for label, ts in groups.items():
        if not ts:
            continue
        summary = report.part_summary(("invariance", "equivariance", "invariance_cosine", "mse"),
                                      transforms=ts)
        for part, vals in summary.items():
            cells = [_f(vals[m]) for m in ("invariance", "equivariance", "invariance_cosine",
                                            "mse")]
            rows.append(f"| {label} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def section_studies(ctx: DemoContext) -> str:
    """One plot of the learned-equivariance studies, from cached results: the full
    study trains tens of models, too long for the demo."""
    cached = Path(__file__).resolve().parents[2] / "docs" / "figures" / "le-task.png"
    lines = ["## Does a symmetric task make early layers equivariant? (cached study)", ""]
    how = ("`experiments/learned_equivariance.py task` (cnn7 on digits6 and its "
           "rotation-invariant and rotation-equivariant variants, 3 seeds, 15 epochs), run on "
           "2026-11-26; numbers and caveats in `docs/results.md`.")
    if not cached.exists():
        return "\n".join(lines + [f"No cached result found; run {how}"])
    shutil.copyfile(cached, ctx.out / cached.name)
    return "\n".join(lines + [
        f"From cached results made by {how} Rotation equivariance falls with depth for "
        "every task and rises after the pooling where the task imposes the symmetry; the "
        "tasks differ little before the Late part.", "",
        f"![task study]({cached.name})"])


#: Report sections, in order. Later parts of the project append theirs.
SECTIONS: list[Callable[[DemoContext], str]] = [section_measurement, section_studies,
                                                 section_exactness, section_defense,
                                                 section_ser]  # the last two: robust/, ssl/


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
