"""Cost of the equivariance defense (Algorithm 1) against its floor, and batched views
against the reference loop.

Printed for the digits classifier (``cnn-small``, 1x28x28, random weights, features: its
last conv map ``features.relu3``) and the
``segmenter`` (3x32x32, random weights; features: its ``logits`` layer before
upsampling), at batch 1 and 32, with the paper's K = 8 transformations
(:func:`~equivision.robust.defenses.default_transforms`; resizes rounded to multiples
of 4 for the segmenter):

* ``defense / floor`` (target <= 1.2x): the floor is ``T`` x (forward + backward of the
  same ``K + 1`` view tensors, grouped by size as the defense groups them), timed as
  plain passes through the same feature layer with the views made beforehand;
* ``batched / loop`` (target <= 1.0x): views of one size in one forward pass (at most
  ``--max-batch`` images per pass; the default ``auto`` caps at 16 on the CPU) vs one
  pass per view;
* ``max |batched - loop|`` of the purified images (same seed).

Times are medians of ``--repeats`` interleaved repeats, in one process (and the ratio of
the minima); ``--clock cpu`` times with the process's CPU time.
Run: ``.venv/bin/python benchmarks/bench_defense.py [--steps 5] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from equivision.models import create_model
from equivision.robust.defenses import EquivarianceDefense, default_transforms
from equivision.robust.views import FeatureExtractor, resolve_max_batch
from equivision.transforms import Transform


def _floor(model: nn.Module, layer: str, x: torch.Tensor, transforms: list[Transform],
           steps: int, max_batch: int | str | None) -> Callable[[], None]:
    """T x (forward + backward w.r.t. the input) of the views, grouped by size and
    chunked as the defense groups them."""
    extractor = FeatureExtractor(model, layer)
    views = [x] + [g.apply_image(x) for g in transforms]
    cap = resolve_max_batch(max_batch, x.device)
    per_pass = len(views) if cap is None else max(1, cap // x.shape[0])
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for v in views:
        groups.setdefault(tuple(v.shape[1:]), []).append(v)
    batches = [torch.cat(vs[k:k + per_pass]).detach()
               for vs in groups.values() for k in range(0, len(vs), per_pass)]

    def run() -> None:
        for _ in range(steps):
            inputs = [b.clone().requires_grad_(True) for b in batches]
            total = sum(extractor(b).sum() for b in inputs)
            torch.autograd.grad(total, inputs)

    return run


#: Clocks: wall time, or the process's CPU time (with one thread, less inflated by
#: other processes on a shared machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _times(fns: dict[str, Callable[[], object]], repeats: int,
           clock: str = "wall") -> dict[str, list[float]]:
    """Interleaved repeats of every function, after one warm-up call each."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return times


def bench(name: str, model: nn.Module, layer: str, shape: tuple[int, int, int],
          transforms: list[Transform], batch: int, steps: int, repeats: int,
          max_batch: int | str | None, clock: str = "wall") -> None:
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    common = dict(eps_v=8 / 255, steps=steps, noise=1.0, transforms=transforms,
                  feature_layer=layer, seed=0)
    batched = EquivarianceDefense(model, batched=True, max_batch=max_batch, **common)
    loop = EquivarianceDefense(model, batched=False, **common)
    runs = _times({
        "floor": _floor(model, layer, x, transforms, steps, max_batch),
        "batched": lambda: batched.purify(x),
        "loop": lambda: loop.purify(x),
    }, repeats, clock)
    t = {k: statistics.median(v) for k, v in runs.items()}
    low = min(runs["batched"]) / min(runs["floor"])
    diff = (batched.purify(x) - loop.purify(x)).abs().max().item()
    print(f"{name:<11} batch {batch:>2}  floor {t['floor'] * 1e3:8.1f} ms  "
          f"defense {t['batched'] * 1e3:8.1f} ms  defense/floor {t['batched'] / t['floor']:5.2f}x"
          f" (min/min {low:4.2f}x)"
          f"  loop {t['loop'] * 1e3:8.1f} ms  batched/loop {t['batched'] / t['loop']:5.2f}x  "
          f"max|batched-loop| {diff:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="purification steps T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time or the process's CPU time")
    parser.add_argument("--max-batch", default="auto",
                        help="images per batched forward pass: auto, none or an integer")
    args = parser.parse_args()
    max_batch: int | str | None = {"auto": "auto", "none": None}.get(args.max_batch.lower())
    if max_batch is None and args.max_batch.lower() != "none":
        max_batch = int(args.max_batch)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cnn = create_model("cnn-small", in_channels=1, num_classes=10).eval()
    seg = create_model("segmenter", in_channels=3, num_classes=5).eval()
    print(f"T = {args.steps} steps, K = 8 transformations, {args.threads} thread(s), "
          f"max_batch={max_batch!r}, median of {args.repeats}, {args.clock} clock")
    for batch in (int(b) for b in args.batches.split(",")):
        bench("cnn-small", cnn, "features.relu3", (1, 28, 28), default_transforms(1), batch,
              args.steps, args.repeats, max_batch, args.clock)
        bench("segmenter", seg, "logits", (3, 32, 32), default_transforms(3, multiple=4),
              batch, args.steps, args.repeats, max_batch, args.clock)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
