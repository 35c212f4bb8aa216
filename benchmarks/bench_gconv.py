"""Cost of the p4 group convolution against its floor, and of building a P4ResNet-18.

Targets (gcnn issue):
* forward + backward of a p4 group convolution (training mode, CPU) costs at most 1.15x a
  plain ``conv2d`` with the same effective channels (C_in * 4 -> C_out * 4), which is the
  floor: the p4 layer adds only the filter-bank gather and the shared bias;
* building a full-size P4ResNet-18 takes under 1 s.

Rows for escnn's ``R2Conv`` on C4 regular fields (the same layer in the best-known library)
are printed when ``import escnn`` works, and a line saying they are skipped otherwise.

Run: ``.venv/bin/python benchmarks/bench_gconv.py [--repeats 15] [--size 28] [--channels 10]``.
Times are medians of interleaved repeats, each repeat timing several iterations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from equivision.gcnn import GroupConv2d
from equivision.models import create_model


class Floor(nn.Module):
    """Plain conv2d with the p4 layer's effective channels: (B, 4C, H, W) -> (B, 4C', H', W')."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


def _escnn_layer(c_in: int, c_out: int, k: int) -> tuple[nn.Module, Callable] | None:
    try:
        from escnn import gspaces
        from escnn import nn as enn
    except ImportError:
        return None
    space = gspaces.rot2dOnR2(N=4)
    t_in = enn.FieldType(space, c_in * [space.regular_repr])
    t_out = enn.FieldType(space, c_out * [space.regular_repr])
    layer = enn.R2Conv(t_in, t_out, kernel_size=k)
    return layer, lambda x: layer(enn.GeometricTensor(x, t_in)).tensor


def step_fn(module: nn.Module, forward: Callable, x: torch.Tensor, iters: int) -> Callable:
    """One timed unit: ``iters`` x (zero grads, forward, backward of a fixed dense gradient
    of the output's shape, as the next layer would send)."""
    with torch.no_grad():
        grad = torch.randn_like(forward(x))

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(iters):
            module.zero_grad(set_to_none=True)
            forward(x).backward(grad)
        return (time.perf_counter() - t0) / iters

    return run


def bench_batch(batch: int, size: int, channels: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    c, k = channels, 3
    gconv = GroupConv2d(c, c, k, group="p4").train()
    floor = Floor(4 * c, 4 * c, k).train()
    xg = torch.randn(batch, c, 4, size, size)
    xf = xg.reshape(batch, 4 * c, size, size)
    iters = max(2, 128 // batch)
    fns = {"p4conv": step_fn(gconv, gconv, xg, iters), "floor conv2d": step_fn(floor, floor, xf,
                                                                              iters)}
    esc = _escnn_layer(c, c, k)
    if esc is not None:
        layer, fwd = esc
        layer.train()
        fns["escnn R2Conv"] = step_fn(layer, fwd, xf, iters)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_time(repeats: int = 3) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        create_model("p4resnet18", num_classes=1000, in_channels=3)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--batches", type=str, default="1,8,64")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other processes "
              "share the cores and the timings below are noisy (try --threads 1)")
    c = args.channels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, "
          f"training mode, {args.size}x{args.size} input, p4 {c}->{c} channels 3x3 vs floor "
          f"conv2d {4 * c}->{4 * c}; median of {args.repeats} interleaved repeats")
    try:
        import escnn  # noqa: F401

        have_escnn = True
    except ImportError:
        have_escnn = False
        print("escnn rows skipped: escnn is not installed (import escnn failed)")
    print(f"{'batch':>5} {'p4conv ms':>10} {'floor ms':>9} {'ratio':>6}"
          + (f" {'escnn ms':>9} {'escnn/floor':>11}" if have_escnn else ""))
    worst = 0.0
    for b in (int(v) for v in args.batches.split(",")):
        t = bench_batch(b, args.size, c, args.repeats)
        ratio = t["p4conv"] / t["floor conv2d"]
        worst = max(worst, ratio)
        row = f"{b:>5} {1e3 * t['p4conv']:>10.3f} {1e3 * t['floor conv2d']:>9.3f} {ratio:>6.3f}"
        if "escnn R2Conv" in t:
            e = t["escnn R2Conv"]
            row += f" {1e3 * e:>9.3f} {e / t['floor conv2d']:>11.2f}"
        print(row)
    print(f"worst p4conv/floor ratio {worst:.3f} (target <= 1.15): "
          f"{'OK' if worst <= 1.15 else 'MISSED'}")
    bt = build_time()
    print(f"build full-size P4ResNet-18 (3 -> 1000 classes): {bt:.3f} s (target < 1 s): "
          f"{'OK' if bt < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
