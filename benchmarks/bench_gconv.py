"""Cost of the p4 group convolution against its floor, of an exported P4CNN, and of
building a P4ResNet-18.

Targets (gcnn issues):
* forward + backward of a p4 group convolution (training mode, CPU) costs at most 1.10x a
  plain ``conv2d`` with the same effective channels (C_in * 4 -> C_out * 4, with bias) at
  batch 1 and at most 1.03x at batches 8 and 64: the floor, since the p4 layer adds only
  the filter-bank gather and the shared bias;
* the same floor on the layer's 5-D layout (``5-D/floor``: the input flattened and the
  output viewed back, as the layer's API needs) shows how much of the gap no filter-bank
  change can remove, and ``5-D+clone/floor`` the same with a freshly built weight (a
  ``clone`` of it, one autograd node that passes the gradient through): the part of the
  gap any filter bank built on every training forward costs before the gather itself;
* inference (eval mode, no grad) of the p4 layer, whose filter bank is then cached, is
  printed against the same floor;
* the exported P4CNN (``equivision.gcnn.export``: plain ``nn.Conv2d`` / ``nn.BatchNorm2d``)
  runs at the plain-conv floor: the 7-layer CNN with the same conv shapes
  (``z2cnn`` with ``width = 4 * 10``); the original P4CNN is printed next to both;
* building a full-size P4ResNet-18 takes under 1 s.

Rows for escnn's ``R2Conv`` on C4 regular fields (the same layer in the best-known library)
are printed when ``import escnn`` works, and a line saying they are skipped otherwise.

Run: ``.venv/bin/python benchmarks/bench_gconv.py [--repeats 15] [--size 28] [--channels 10]
[--threads 1] [--clock cpu]``. Times are medians of interleaved repeats, each repeat timing
several iterations. ``--clock cpu`` times the calling thread's CPU time instead of wall
time, which other processes on a busy machine disturb much less (use it with
``--threads 1``).
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

from equivision.gcnn import GroupConv2d, export
from equivision.models import create_model

Clock = Callable[[], float]


class Floor(nn.Module):
    """Plain conv2d with the p4 layer's effective channels: (B, 4C, H, W) -> (B, 4C', H', W')."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class Floor5D(Floor):
    """The floor on the p4 layer's 5-D layout: (B, C, 4, H, W) flattened, one conv2d, the
    output viewed as (B, C', 4, H', W'); what the layer costs without its filter-bank
    gather, as the layer's API needs these two views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        out = F.conv2d(x.reshape(b, -1, h, w), self.weight, self.bias)
        return out.view(b, -1, x.shape[2], out.shape[-2], out.shape[-1])


class Floor5DFresh(Floor5D):
    """:class:`Floor5D` convolving with ``weight.clone()``: a fresh filter tensor and one
    more autograd node on every forward, as a built filter bank has, without a gather."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        out = F.conv2d(x.reshape(b, -1, h, w), self.weight.clone(), self.bias)
        return out.view(b, -1, x.shape[2], out.shape[-2], out.shape[-1])


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


def step_fn(module: nn.Module, forward: Callable, x: torch.Tensor, iters: int,
            clock: Clock) -> Callable[[], float]:
    """One timed unit: ``iters`` x (zero grads, forward, backward of a fixed dense gradient
    of the output's shape, as the next layer would send); seconds per iteration."""
    with torch.no_grad():
        grad = torch.randn_like(forward(x))

    def run() -> float:
        t0 = clock()
        for _ in range(iters):
            module.zero_grad(set_to_none=True)
            forward(x).backward(grad)
        return (clock() - t0) / iters

    return run


def infer_fn(forward: Callable, x: torch.Tensor, iters: int,
             clock: Clock) -> Callable[[], float]:
    """One timed unit: ``iters`` forward passes without gradients; seconds per iteration."""

    def run() -> float:
        with torch.no_grad():
            t0 = clock()
            for _ in range(iters):
                forward(x)
            return (clock() - t0) / iters

    return run


def medians(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each unit over ``repeats`` interleaved repeats (after a warm-up),
    so that machine load hits all of them alike; every other repeat runs the units in
    reverse order, so that none always follows the same one (warm caches)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(fns[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_conv(batch: int, size: int, channels: int, repeats: int,
               clock: Clock) -> dict[str, float]:
    """The p4 layer and its floor, training (fwd + bwd) and inference; escnn if present."""
    torch.manual_seed(0)
    c, k = channels, 3
    gconv = GroupConv2d(c, c, k, group="p4").train()
    floor = Floor(4 * c, 4 * c, k).train()
    floor5 = Floor5D(4 * c, 4 * c, k).train()
    fresh = Floor5DFresh(4 * c, 4 * c, k).train()
    xg = torch.randn(batch, c, 4, size, size)
    xf = xg.reshape(batch, 4 * c, size, size)
    iters = max(2, 128 // batch)
    fns = {"p4conv": step_fn(gconv, gconv, xg, iters, clock),
           "floor conv2d": step_fn(floor, floor, xf, iters, clock),
           "floor 5-D": step_fn(floor5, floor5, xg, iters, clock),
           "floor 5-D clone": step_fn(fresh, fresh, xg, iters, clock),
           "p4conv eval": infer_fn(gconv, xg, iters, clock),
           "floor eval": infer_fn(floor, xf, iters, clock)}
    esc = _escnn_layer(c, c, k)
    if esc is not None:
        layer, fwd = esc
        layer.train()
        fns["escnn R2Conv"] = step_fn(layer, fwd, xf, iters, clock)
    return medians(fns, repeats)


def bench_export(batch: int, repeats: int, clock: Clock) -> dict[str, float]:
    """P4CNN (28x28, eval, no grad): the original, the exported model and the plain CNN7
    with the same conv shapes."""
    torch.manual_seed(0)
    model = create_model("p4cnn").eval()
    x = torch.randn(batch, 1, 28, 28)
    plain = export(model, x)
    floor = create_model("z2cnn", width=4 * model.width).eval()
    iters = max(2, 64 // batch)
    return medians({"original": infer_fn(model, x, iters, clock),
                    "exported": infer_fn(plain, x, iters, clock),
                    "floor": infer_fn(floor, x, iters, clock)}, repeats)


def build_time(repeats: int = 3) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        create_model("p4resnet18", num_classes=1000, in_channels=3)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def conv_rows(batches: list[int], args: argparse.Namespace, clock: Clock) -> None:
    """Print the p4 layer's rows and the verdict on the training targets."""
    try:
        import escnn  # noqa: F401

        have_escnn = True
    except ImportError:
        have_escnn = False
        print("escnn rows skipped: escnn is not installed (import escnn failed)")
    print(f"{'batch':>5} {'p4conv ms':>10} {'floor ms':>9} {'ratio':>6} {'target':>6} "
          f"{'5-D/floor':>9} {'5-D+clone/floor':>15} {'eval ms':>8} {'floor ms':>9} {'ratio':>6}"
          + (f" {'escnn ms':>9} {'escnn/floor':>11}" if have_escnn else ""))
    missed = []
    for b in batches:
        t = bench_conv(b, args.size, args.channels, args.repeats, clock)
        ratio = t["p4conv"] / t["floor conv2d"]
        target = 1.10 if b == 1 else 1.03
        if ratio > target:
            missed.append(b)
        row = (f"{b:>5} {1e3 * t['p4conv']:>10.3f} {1e3 * t['floor conv2d']:>9.3f} "
               f"{ratio:>6.3f} {target:>6.2f} {t['floor 5-D'] / t['floor conv2d']:>9.3f} "
               f"{t['floor 5-D clone'] / t['floor conv2d']:>15.3f} "
               f"{1e3 * t['p4conv eval']:>8.3f} "
               f"{1e3 * t['floor eval']:>9.3f} {t['p4conv eval'] / t['floor eval']:>6.3f}")
        if "escnn R2Conv" in t:
            e = t["escnn R2Conv"]
            row += f" {1e3 * e:>9.3f} {e / t['floor conv2d']:>11.2f}"
        print(row)
    print(f"training p4conv/floor targets (<= 1.10 at batch 1, <= 1.03 above): "
          f"{_verdict(not missed)}" + (f" (missed at batch {missed})" if missed else ""))


def export_rows(batches: list[int], repeats: int, clock: Clock) -> None:
    """Print the exported P4CNN against the original and the plain-conv floor."""
    print("P4CNN inference (28x28, eval, no grad): exported = plain nn.Conv2d/BatchNorm2d; "
          "floor = z2cnn(width=40), the same conv shapes")
    print(f"{'batch':>5} {'original ms':>12} {'exported ms':>12} {'floor ms':>9} "
          f"{'orig/floor':>10} {'exp/floor':>9}")
    for b in batches:
        t = bench_export(b, repeats, clock)
        print(f"{b:>5} {1e3 * t['original']:>12.3f} {1e3 * t['exported']:>12.3f} "
              f"{1e3 * t['floor']:>9.3f} {t['original'] / t['floor']:>10.3f} "
              f"{t['exported'] / t['floor']:>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--batches", type=str, default="1,8,64")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this thread's CPU time (with --threads 1)")
    ap.add_argument("--skip-export", action="store_true", help="no exported-P4CNN rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock: Clock = time.perf_counter if args.clock == "wall" else time.thread_time
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other processes "
              "share the cores and the timings below are noisy (try --threads 1 --clock cpu)")
    c = args.channels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; "
          f"{args.size}x{args.size} input, p4 {c}->{c} channels 3x3 vs floor conv2d "
          f"{4 * c}->{4 * c}; training = forward+backward in training mode, eval = forward "
          f"without gradients; median of {args.repeats} interleaved repeats")
    batches = [int(v) for v in args.batches.split(",")]
    conv_rows(batches, args, clock)
    if not args.skip_export:
        export_rows(batches, args.repeats, clock)
    bt = build_time()
    print(f"build full-size P4ResNet-18 (3 -> 1000 classes): {bt:.3f} s (target < 1 s): "
          f"{_verdict(bt < 1.0)}")


if __name__ == "__main__":
    main()
