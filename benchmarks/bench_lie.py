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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from equivision.measure.lie import lie_derivative
from equivision.models import create_model

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--models", default="cnn7,resnet18")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
