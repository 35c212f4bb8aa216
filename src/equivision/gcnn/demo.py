"""Demo section: the exactness analyzer's two-part verdict, the measured error, and export.

:func:`section_exactness` is a ``(ctx: equivision.demo.DemoContext) -> str`` section. It
analyses P4CNN (p4 group convolutions) and the plain 7-layer CNN ``cnn7`` (the same
layout with ``nn.Conv2d``), both randomly initialised, at an aligned and a misaligned
input size: the sampling geometry (aligned or not), the weights (constrained or not), the
verdict, and next to each the equivariance error measured in float64. Then it exports
P4CNN to plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` layers (:func:`~equivision.gcnn.export`)
and shows the largest output difference on random images and the inference time of both.
About 8 s at one thread on the heavily loaded two-core machine (2026-11-30) with the
default :class:`ExactnessDemoSizes`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..models import create_model
from ..utils import preserve_rng_state
from .exactness import (
    aligned_sizes,
    analyze_exactness,
    empirical_equivariance_error,
    exact_sizes,
)
from .export import export

__all__ = ["ExactnessDemoSizes", "section_exactness"]


@dataclass(frozen=True)
class ExactnessDemoSizes:
    """Sizes of the section's run.

    Attributes:
        width: channels of P4CNN's layers (``None``: the model's default, 10) and of
            cnn7's (``None``: 20, the same parameter count).
        sizes: input sides analysed: the first aligned for both models, the second not.
        search: ``(start, stop)`` of the size search shown for both models.
        images: random images in ``[0, 1]`` the export is checked on (and the batch of its
            timing).
        repeats: interleaved timing repeats (the median is shown).
    """

    width: int | None = None
    sizes: tuple[int, int] = (28, 29)
    search: tuple[int, int] = (26, 34)
    images: int = 64
    repeats: int = 5


def _models(s: ExactnessDemoSizes) -> dict[str, nn.Module]:
    """P4CNN and cnn7, seed 0, eval mode."""
    extra = {} if s.width is None else {"width": s.width}
    with preserve_rng_state():
        torch.manual_seed(0)
        p4 = create_model("p4cnn", in_channels=1, num_classes=10, **extra)
        torch.manual_seed(0)
        plain = create_model("cnn7", in_channels=1, num_classes=10,
                             **({} if s.width is None else {"width": 2 * s.width}))
    return {"P4CNN": p4.eval(), "cnn7": plain.eval()}


def _verdict_table(models: dict[str, nn.Module], s: ExactnessDemoSizes) -> list[str]:
    """One row per model and size: geometry, weights, verdict, decisive layers, error."""
    rows = ["| model | input | sampling geometry | weights | verdict | decided by | "
            "measured error (float64) |", "|---|---|---|---|---|---|---|"]
    for name, model in models.items():
        for size in s.sizes:
            rep = analyze_exactness(model, size)
            err = empirical_equivariance_error(model, size)
            misaligned = [r.name for r in rep.layers if r.exact is False]
            loose = [r.name for r in rep.layers if r.weights is False]
            why = "; ".join(part for part in (
                f"grid: {', '.join(misaligned)}" if misaligned else "",
                f"weights: {len(loose)} plain conv kernels" if loose else "") if part)
            rows.append(f"| {name} | {size}x{size} | {rep.geometry} | {rep.weights} | "
                        f"**{rep.verdict}** | {why or '-'} | {err:.1e} |")
    return rows


def _search_lines(models: dict[str, nn.Module], s: ExactnessDemoSizes) -> list[str]:
    """The exact and aligned sizes of both models in ``s.search``."""
    lo, hi = s.search
    lines = []
    for name, model in models.items():
        exact = exact_sizes(model, lo, hi, in_channels=1)
        aligned = aligned_sizes(model, lo, hi, in_channels=1)
        lines.append(f"- {name}, sizes {lo}..{hi}: exact {_listed(exact)}; aligned "
                     f"{_listed(aligned)}")
    return lines


def _listed(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if sizes else "none"


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int, iters: int) -> dict[str, float]:
    """Median milliseconds per call of each function over ``repeats`` interleaved repeats of
    ``iters`` calls (after one warm-up call each), without gradients."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[name].append(1e3 * (time.perf_counter() - t0) / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _export_rows(model: nn.Module, s: ExactnessDemoSizes) -> tuple[list[str], float]:
    """Export P4CNN, compare outputs on random images, time both at batch 1 and the batch;
    returns the table rows and the largest absolute output difference."""
    size = s.sizes[0]
    gen = torch.Generator().manual_seed(0)
    x: Tensor = torch.rand(s.images, 1, size, size, generator=gen)
    plain = export(model, x)
    with torch.no_grad():
        diff = float((model(x) - plain(x)).abs().max())
        scale = float(model(x).abs().max())
    rows = ["| model | batch | inference ms (median) | vs original |", "|---|---|---|---|"]
    for batch in (1, x.shape[0]):
        xb = x[:batch]
        t = _median_ms({"original": partial(model, xb), "exported": partial(plain, xb)},
                       s.repeats, max(1, 16 // batch))
        for name in ("original", "exported"):
            rows.append(f"| P4CNN {name} | {batch} | {t[name]:.2f} | "
                        f"{t[name] / t['original']:.2f}x |")
    return rows + ["", f"Medians of {s.repeats} interleaved repeats on this machine (noisy "
                   "when it is busy; `benchmarks/bench_gconv.py` compares both with the "
                   "plain-conv floor). Largest output difference on "
                   f"{x.shape[0]} random images in [0, 1]: "
                   f"**{diff:.1e}** (outputs up to {scale:.1f})."], diff


def section_exactness(ctx: Any, sizes: ExactnessDemoSizes | None = None) -> str:
    """The two-part verdict for P4CNN and cnn7 with the measured error, and the exported
    P4CNN's outputs and speed next to the original. ``ctx.artifacts["exactness"]`` gets the
    export's largest output difference."""
    s = sizes or ExactnessDemoSizes()
    t0 = time.time()
    models = _models(s)
    a, b = s.sizes
    lines = [
        "## Exact and approximate rotation equivariance: P4CNN and a plain CNN",
        "",
        f"`equivision exactness --model p4cnn --input-size {b}` traces the model and answers "
        "two questions. *Sampling geometry*: is every strided layer's grid symmetric about "
        "its input's centre, `(i + 2p - k_eff) mod s == 0` with the layer's own input size? "
        "*Weights*: are they constrained to the group (group convolutions, or plain kernels "
        "that are D4-symmetric)? The verdict is \"exact\" only when both hold. P4CNN (p4 "
        "group convolutions) and cnn7 (the same seven layers with plain `nn.Conv2d`), both "
        "randomly initialised (seed 0), eval mode; the measured error is the largest "
        "||f(gx) - g·f(x)|| / ||f(x)|| over the 90° rotations on random inputs, in float64:",
        "",
        *_verdict_table(models, s),
        "",
        "The size search (`--range`): the exact sizes need both answers; the aligned sizes "
        "look at the geometry alone, so for cnn7 they are where constrained kernels *would* "
        "be exact, not exact sizes:",
        "",
        *_search_lines(models, s),
        "",
        f"At {a} px both grids are aligned: P4CNN is exact to float64 rounding, cnn7 is not "
        f"(its kernels are free). At {b} px the 2x2 max pool's grid is misaligned and "
        "neither is exact.",
        "",
        "### Exported P4CNN",
        "",
        "`equivision.gcnn.export(model, example)` turns the group layers into plain "
        f"`nn.Conv2d` / `nn.BatchNorm2d` layers for inference ({a} px, eval mode, no "
        "gradients):",
        "",
    ]
    rows, diff = _export_rows(models["P4CNN"], s)
    ctx.artifacts["exactness"] = {"export_max_diff": diff}
    lines += rows + ["", f"_Section time {time.time() - t0:.1f} s._"]
    return "\n".join(lines)
