"""Cost of the Lie derivative against bare forward and backward passes.

Target (issue 11): the per-layer Lie derivative for G generators costs at most
``1 + G`` backward passes, i.e. at most the budget ``forward + (1 + G) x backward`` on
the same batch (a backward pass timed as ``forward+backward - forward``, gradient with
respect to the input). Printed side by side, as ratios to one bare forward pass:

* ``layers (forward)``: per-layer norms by forward-mode AD (G dual passes, plus the one
  tracing pass on the first batch);
* ``layers (double-backward)``: the same numbers by the transpose trick (one backward
  with ``create_graph``, then one per generator);
* ``+ decomposition``: the per-layer norms and the layer-wise decomposition of the
  output's Lie derivative (one forward with every leaf's own Lie derivative, one
  backward per logit).

Run: ``.venv/bin/python benchmarks/bench_lie.py [--repeats 5] [--images 64] [--threads 1]
[--clock cpu] [--models cnn7,resnet18] [--json out.json]``. Times are medians (and
minima) of interleaved repeats; the load average of the machine is printed with them.

``--checks`` prints the check table instead (3 seeds, mean ± sd): the rotation Lie
derivative of the 5-point-stencil CNN against the same CNN with its random kernels
(:mod:`equivision.measure.lie_validation`), agreement with finite differences of the
bilinear transforms, what the layer-wise decomposition leaves unattributed, and the
shift equivariance that whole and sub-pixel shifts see at a stride-2 layer of cnn7.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from equivision.data import get_dataset
from equivision.measure import measure
from equivision.measure.lie import OUTPUT, lie_derivative
from equivision.measure.lie_decompose import UNATTRIBUTED
from equivision.measure.lie_validation import smooth_blobs, stencil_cnn
from equivision.models import create_model
from equivision.transforms import Rotation, Scale, SubpixelShift

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
GENERATORS = "tx,ty,rotate,scale,brightness"
#: model name -> (constructor arguments, input shape)
MODELS = {
    "cnn7": ({"in_channels": 1, "num_classes": 10}, (1, 28, 28)),
    "resnet18": ({"num_classes": 10}, (3, 32, 32)),
    "vit-small": ({"num_classes": 10}, (3, 32, 32)),
}


def _timed(fn: Callable[[], object], clock: str) -> float:
    t0 = CLOCKS[clock]()
    fn()
    return CLOCKS[clock]() - t0


def bench_model(name: str, images: int, repeats: int, clock: str) -> dict:
    """Medians / minima of each variant on one batch of ``images`` images."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = torch.rand(images, *shape)
    gens = len(GENERATORS.split(","))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xg = x.clone().requires_grad_(True)
        model(xg).sum().backward()

    variants = {
        "forward": forward,
        "forward+backward": forward_backward,
        "layers (forward)": lambda: lie_derivative(model, x, GENERATORS, decompose=False,
                                                   batch_size=images, mode="forward"),
        "layers (double-backward)": lambda: lie_derivative(
            model, x, GENERATORS, decompose=False, batch_size=images, mode="double-backward"),
        "+ decomposition": lambda: lie_derivative(model, x, GENERATORS, batch_size=images),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (lazy imports, kernel selection)
        fn()
    for _ in range(repeats):  # interleaved, so that load changes hit every variant
        for key, fn in variants.items():
            times[key].append(_timed(fn, clock))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    backward = max(med["forward+backward"] - med["forward"], 1e-9)
    budget = med["forward"] + (1 + gens) * backward
    return {"model": name, "images": images, "generators": gens, "median_s": med,
            "min_s": low, "backward_s": backward, "budget_s": budget,
            "ratio_to_forward": {k: v / med["forward"] for k, v in med.items()},
            "ratio_to_budget": {k: med[k] / budget for k in
                                ("layers (forward)", "layers (double-backward)",
                                 "+ decomposition")}}


SEEDS = (0, 1, 2)
#: generator -> the finite transformation g_eps whose symmetric difference it is
FINITE = {
    "rotate": lambda e, x: Rotation(math.degrees(e))(x),
    "scale": lambda e, x: Scale(math.exp(e))(x),
    "tx": lambda e, x: SubpixelShift(e, 0.0)(x),
    "ty": lambda e, x: SubpixelShift(0.0, e)(x),
    "brightness": lambda e, x: x + e,
    "contrast": lambda e, x: x * math.exp(e),
}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2e} ± {sd:.1e}"


def _output_abs(report, gen: str) -> float:
    return next(r.absolute for r in report.layer_rows()
                if r.layer == OUTPUT and r.generator == gen)


def check_isotropic() -> list[str]:
    """Rotation Lie derivative, mean over the conv layers and at the output."""
    lines = ["| model (rotation, margin 4 px) | conv layers: mean rel. | output: rel. |",
             "|---|---|---|"]
    x = smooth_blobs(6)
    for relu in (False, True):
        for iso in (True, False):
            convs, outs = [], []
            for seed in SEEDS:
                rep = lie_derivative(stencil_cnn(iso, relu, seed), x, "rotate", margin=4,
                                     decompose=False)
                vals = {r.layer: r.value for r in rep.layer_rows()}
                convs.append(statistics.fmean(vals[str(2 * i if relu else i)] for i in range(3)))
                outs.append(vals[OUTPUT])
            name = (f"{'5-point stencil' if iso else 'random 3x3'} kernels, "
                    f"{'ReLU' if relu else 'linear'}")
            lines.append(f"| {name} | {_ms(convs)} | {_ms(outs)} |")
    return lines


def check_finite_differences(eps: float = 1e-4) -> list[str]:
    """|jvp - symmetric difference| / |symmetric difference| of the output's norm."""
    lines = ["| generator | relative difference to the finite difference (eps 1e-4) |",
             "|---|---|"]
    x = smooth_blobs(3) + 0.05
    for gen, act in FINITE.items():
        errs = []
        for seed in SEEDS:
            model = stencil_cnn(False, True, seed).eval()
            with torch.no_grad():
                fd = (model(act(eps, x)) - model(act(-eps, x))) / (2 * eps)
            want = fd.norm(dim=1).mean().item()
            got = _output_abs(lie_derivative(model, x, gen, decompose=False), gen)
            errs.append(abs(got - want) / want)
        lines.append(f"| {gen} | {_ms(errs)} |")
    return lines


def check_decomposition() -> list[str]:
    """What the decomposition leaves unattributed, relative to the output's total."""
    lines = ["| model | generator | unattributed / total |", "|---|---|---|"]
    for name in ("stencil CNN (random kernels)", "resnet18 (32 px)"):
        for gen in ("tx", "rotate", "brightness"):
            rest = []
            for seed in SEEDS:
                if name.startswith("stencil"):
                    model, x = stencil_cnn(False, True, seed).float(), torch.rand(4, 1, 16, 16)
                else:
                    torch.manual_seed(seed)
                    model, x = create_model("resnet18", num_classes=10), torch.rand(4, 3, 32, 32)
                rep = lie_derivative(model, x, gen)
                rest.append(rep.value(UNATTRIBUTED, gen, "contribution") / _output_abs(rep, gen))
            lines.append(f"| {name} | {gen} | {_ms(rest)} |")
    return lines


def check_aliasing(images: int = 64) -> list[str]:
    """Equivariance (Eq. 7) of cnn7 at random init under whole and sub-pixel shifts."""
    data = get_dataset("digits", split="test", size=28)
    subset = torch.utils.data.Subset(data, range(images))
    spec = "shift:2,subshift:1,subshift:0.5"
    layers = ["features.relu2", "features.relu3", "features.relu6"]
    got: dict[tuple[str, str], list[float]] = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = create_model("cnn7", in_channels=1, num_classes=10)
        rep = measure(model, subset, spec, layers=layers, margin=2, progress=False)
        for r in rep.results:
            got.setdefault((r.layer, r.transform), []).append(r.metrics["equivariance"])
    names = ["shift(2,2)", "subshift(1,1)", "subshift(0.5,0.5)"]
    lines = ["| cnn7 layer (random init) | " + " | ".join(names) + " |",
             "|---|---|---|---|"]
    for layer in layers:
        cells = [f"{statistics.fmean(got[layer, t]):.3f} ± {statistics.stdev(got[layer, t]):.3f}"
                 for t in names]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def checks() -> None:
    """Print every check table (Markdown)."""
    for title, fn in (("isotropic CNN", check_isotropic),
                      ("finite differences", check_finite_differences),
                      ("decomposition", check_decomposition),
                      ("whole vs sub-pixel shifts", check_aliasing)):
        t0 = time.perf_counter()
        lines = fn()
        print(f"\n### {title} ({time.perf_counter() - t0:.0f} s)\n")
        print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--models", default="cnn7,resnet18")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--checks", action="store_true", help="print the check tables instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.checks:
        load = os.getloadavg()[0]
        print(f"# Lie derivative checks (load average {load:.1f} on {os.cpu_count()} CPUs)")
        checks()
        return
    load0 = os.getloadavg()
    rows = [bench_model(m, args.images, args.repeats, args.clock)
            for m in args.models.split(",")]
    load1 = os.getloadavg()
    loaded = " - LOADED" if max(load0[0], load1[0]) > (os.cpu_count() or 1) else ""
    print(f"# Lie derivative cost, {args.images} images, {GENERATORS} "
          f"({args.threads} thread(s), {args.clock} clock, medians of {args.repeats}; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after on "
          f"{os.cpu_count()} CPUs{loaded})")
    for r in rows:
        print(f"\n## {r['model']}: forward {r['median_s']['forward']:.3f} s, backward "
              f"{r['backward_s']:.3f} s, budget forward + (1 + {r['generators']}) backward "
              f"= {r['budget_s']:.3f} s")
        print(f"{'variant':28s}{'median s':>10s}{'min s':>10s}{'x forward':>11s}"
              f"{'x budget':>10s}")
        for k, v in r["median_s"].items():
            tb = r["ratio_to_budget"].get(k)
            print(f"{k:28s}{v:10.3f}{r['min_s'][k]:10.3f}{r['ratio_to_forward'][k]:11.2f}"
                  f"{'' if tb is None else f'{tb:10.2f}'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"load_before": load0, "load_after": load1, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
