"""The demo's Lie-derivative section: per-layer Lie derivative of the trained digits CNN
next to the same architecture at random initialisation, and where the output's
equivariance error comes from (the layer-wise decomposition)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import get_dataset
from ..models import create_model
from ..utils import model_device, resolve_device, seed_everything
from .baselines import random_init_copy
from .lie import OUTPUT, lie_derivative
from .lie_decompose import UNATTRIBUTED
from .lie_report import LieReport

__all__ = ["section_lie_derivative"]

#: generators shown in the demo (ty behaves as tx on digits; contrast as brightness)
DEMO_GENERATORS = ("tx", "rotate", "scale", "brightness")
#: images and random-init seeds of the demo
DEMO_IMAGES, DEMO_SEEDS = 32, (0, 1, 2)


def _model_and_data(ctx: Any) -> tuple[nn.Module, Dataset, str]:
    """``ctx.artifacts["digits_model"]`` or, when absent, a fresh cnn7 (said in the text)."""
    found = getattr(ctx, "artifacts", {}).get("digits_model")
    if found is not None:
        model, test_set = found
        return model, test_set, ""
    seed_everything(0)
    model = create_model("cnn7", in_channels=1, num_classes=10)
    model.to(resolve_device(getattr(ctx, "device", "auto")))
    note = ("> No trained digits model was found in this run (`ctx.artifacts"
            "['digits_model']`), so the 'trained' column is a fresh cnn7 at random "
            "initialisation (seed 0): the two columns show seed-to-seed spread, not a "
            "learned effect.\n\n")
    return model, get_dataset("digits", split="test", size=28), note


def _cell(value: float | None, spread: list[float] | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if spread:
        sd = statistics.stdev(spread) if len(spread) > 1 else 0.0
        return f"{value:.3f} ± {sd:.3f}"
    return f"{value:.3f}"


def _table(trained: LieReport, random: list[LieReport]) -> list[str]:
    gens = trained.generators
    head = "| layer | " + " | ".join(f"{g}: trained | {g}: random init" for g in gens) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(gens))]
    for row in [r for r in trained.layer_rows() if r.generator == gens[0]]:
        cells = []
        for g in gens:
            base = [r.value(row.layer, g) for r in random]
            base_ok = [b for b in base if b is not None]
            mean = statistics.fmean(base_ok) if base_ok else None
            cells += [_cell(trained.value(row.layer, g)), _cell(mean, base_ok)]
        lines.append(f"| {row.layer} | " + " | ".join(cells) + " |")
    return lines


def _decomposition(trained: LieReport) -> list[str]:
    lines = ["| generator | total ‖L f(x)‖ | largest contributions (share of the total) | "
             "unattributed |", "|---|---|---|---|"]
    for g in trained.generators:
        total = next((r.absolute for r in trained.layer_rows()
                      if r.layer == OUTPUT and r.generator == g), None)
        rows = [r for r in trained.layer_rows("contribution")
                if r.generator == g and r.layer != UNATTRIBUTED and r.share is not None]
        top = sorted(rows, key=lambda r: -r.share)[:3]
        rest = trained.value(UNATTRIBUTED, g, "contribution")
        lines.append(f"| {g} | {_cell(total)} | "
                     + ", ".join(f"{r.layer} ({r.share:.2f})" for r in top)
                     + f" | {_cell(rest)} |")
    return lines


def section_lie_derivative(ctx: Any) -> str:
    """Markdown: the per-layer Lie derivative ``||L f_l(x)|| / ||f_l(x)||`` of the trained
    digits cnn7 beside the same architecture at random init (mean ± sd over
    :data:`DEMO_SEEDS`), and the decomposition of the trained model's output Lie
    derivative into the contributions of its layers."""
    t0 = time.time()
    model, test_set, note = _model_and_data(ctx)
    device = model_device(model)
    images = Subset(test_set, range(min(DEMO_IMAGES, len(test_set))))  # type: ignore[arg-type]
    kw = dict(generators=DEMO_GENERATORS, batch_size=DEMO_IMAGES, device=device)
    with torch.random.fork_rng(devices=[]):
        trained = lie_derivative(model, images, model_name="cnn7 (trained)", **kw)
        random = []
        for seed in DEMO_SEEDS:
            fresh, _ = random_init_copy(model, seed)
            random.append(lie_derivative(fresh, images, decompose=False, **kw))
    units = ", ".join(f"{g}: per {u}" for g, u in trained.meta["units"].items())
    return "\n".join([
        "## The Lie derivative per layer", "",
        note + "Gruver et al. (ICLR 2023) measure equivariance to *continuous* "
        "transformations by the Lie derivative `L f_l(x) = d/dt g_t^-1 f_l(g_t x)` at t = 0: "
        "zero for an equivariant layer. Each cell is the mean over "
        f"{trained.meta['n_images']} test images of `‖L f_l(x)‖ / ‖f_l(x)‖` ({units}; "
        "brightness acts on the image only, so every layer's whole response to it counts). "
        "Random init: the same architecture re-initialised with seeds "
        f"{', '.join(map(str, DEMO_SEEDS))}, mean ± sd.", "",
        *_table(trained, random), "",
        "Where the trained model's output error comes from: the contribution "
        "`C_l = J_{>l} (L f_l)` of each layer's own Lie derivative, carried to the logits "
        "(exact, one backward pass per logit); the contributions add up to the total as "
        "vectors, so a share above 1 means layers cancel each other, and 'unattributed' is "
        "what no module accounts for.", "",
        *_decomposition(trained), "",
        f"_({time.time() - t0:.1f} s; Jacobian-vector products by {trained.meta['mode']}.)_", ""])
