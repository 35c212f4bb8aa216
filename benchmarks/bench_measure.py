"""Cost of measuring: time against the bare forward passes, and memory against the
number of images.

Targets (issue 2):
* measuring all layers of the 7-layer CNN under 3 rotations costs at most 1.5x the
  bare forward passes it needs ((1 + 3) x images, same batches, eval mode, no grad);
  "layers" are the model's measurement points (each conv block's output, the global
  pooling, the logits), which is what `measure` captures by default; the ratio for
  every leaf module (conv, batch norm and ReLU separately) is printed too;
* peak memory measuring 4,000 images is at most 1.2x that of 500 images;
* (issue 3) measuring a CIFAR-style ResNet-44 on 2,000 images (the learned-equivariance
  paper's count) under 3 rotations and 8 diagonal shifts finishes on two cores: the time
  and the ratio to the bare forward passes ((1 + 11) x images) are printed
  (``--resnet44``; ``--only-resnet44`` skips the rest).

Run: ``.venv/bin/python benchmarks/bench_measure.py [--repeats 5] [--images 1000] [--resnet44]``.
Times are medians of interleaved repeats; each memory figure comes from a fresh
subprocess (peak RSS, and peak RSS growth during the measure call).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader

from equivision.data.synthetic import SyntheticImages
from equivision.measure import measure
from equivision.models import create_model
from equivision.transforms import parse_transforms


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def time_ratio(images: int, repeats: int, batch: int, layers: str | None = None,
               model_name: str = "cnn7", shape: tuple[int, int, int] = (1, 28, 28),
               spec: str = "rot90") -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=shape[0]).eval()
    data = SyntheticImages(images, shape=shape, seed=1)
    batches = [x for x, _ in DataLoader(data, batch_size=batch)]
    ts = parse_transforms(spec)

    def bare() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)
                for t in ts:
                    model(t(x))

    def measured() -> None:
        measure(model, batches, ts, layers=layers, progress=False)

    bare()
    measured()  # warm-up
    tb, tm = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bare()
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measured()
        tm.append(time.perf_counter() - t0)
    ratios = [m / b for m, b in zip(tm, tb)]
    return {"images": images, "bare_s": statistics.median(tb), "measure_s": statistics.median(tm),
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def memory_child(images: int) -> None:
    """Run in a subprocess: print peak RSS numbers for one measurement as JSON."""
    torch.manual_seed(0)
    model = create_model("cnn7").eval()
    measure(model, SyntheticImages(64, shape=(1, 28, 28), seed=2), "rot90", batch_size=64,
            progress=False)  # warm-up: allocator pools, lazy imports
    before = _rss_kib()
    measure(model, SyntheticImages(images, shape=(1, 28, 28), seed=1), "rot90", batch_size=64,
            progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": images, "peak_kib": peak, "growth_kib": max(0, peak - before)}))


def memory(images: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(images)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resnet44", action="store_true",
                   help="also time ResNet-44 on 2,000 images under rot90 + 8 shifts")
    p.add_argument("--only-resnet44", action="store_true", help="only the ResNet-44 timing")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.resnet44 or args.only_resnet44:
        reps = min(args.repeats, 3)
        r = time_ratio(2000, reps, args.batch, None, "resnet44", (3, 32, 32), "rot90,shift:1-8")
        print(f"time: resnet44 (depth 44, 3x32x32), default measurement points, 3 rotations + 8 "
              f"diagonal shifts, 2000 images, batch {args.batch}, {torch.get_num_threads()} "
              "threads")
        print(f"  bare forward passes  {r['bare_s']:.1f} s (12 x 2000 images; median of {reps})")
        print(f"  measure              {r['measure_s']:.1f} s")
        print(f"  ratio measure/bare   {r['ratio_median']:.2f}x; "
              f"runs: {', '.join(f'{x:.2f}' for x in r['ratios'])}")
        if args.only_resnet44:
            return
    for layers, label in ((None, "its 9 measurement points (7 conv blocks, pool, fc)"),
                          ("all", "all 24 leaf modules (conv, bn, relu, pools, fc)")):
        r = time_ratio(args.images, args.repeats, args.batch, layers)
        print(f"time: cnn7, {label}, 3 rotations, {r['images']} images, batch {args.batch}, "
              f"{torch.get_num_threads()} threads")
        print(f"  bare forward passes  {r['bare_s']:.3f} s (median of {args.repeats})")
        print(f"  measure              {r['measure_s']:.3f} s")
        target = " (target <= 1.5x)" if layers is None else " (no target)"
        print(f"  ratio measure/bare   {r['ratio_median']:.2f}x{target}; "
              f"runs: {', '.join(f'{x:.2f}' for x in r['ratios'])}")
    small = [memory(500) for _ in range(3)]
    large = [memory(4000) for _ in range(3)]
    ps = statistics.median(m["peak_kib"] for m in small)
    pl = statistics.median(m["peak_kib"] for m in large)
    gs = statistics.median(m["growth_kib"] for m in small)
    gl = statistics.median(m["growth_kib"] for m in large)
    print("memory: peak RSS of a process measuring N images (median of 3 subprocesses)")
    print(f"  500 images   peak {ps / 1024:.1f} MiB, growth during measure {gs / 1024:.1f} MiB")
    print(f"  4000 images  peak {pl / 1024:.1f} MiB, growth during measure {gl / 1024:.1f} MiB")
    print(f"  ratio 4000/500 peak {pl / ps:.3f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
