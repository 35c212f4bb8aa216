"""Cost of measuring: time against the bare forward passes, and memory against the
number of images.

Targets (issue 2):
* measuring all layers of the 7-layer CNN under 3 rotations costs at most 1.5x (issue
  10: 1.3x, medians and minima, at 1 and 2 threads; also for ResNet-44's points with
  ``--resnet44-rot90 N``) the bare forward passes it needs ((1 + 3) x images, same
  batches, eval mode, no grad);
  "layers" are the model's measurement points (each conv block's output, the global
  pooling, the logits), which is what `measure` captures by default; the ratio for
  every leaf module (conv, batch norm and ReLU separately) is printed too;
* peak memory measuring 4,000 images is at most 1.2x that of 500 images;
* (issue 3) measuring a CIFAR-style ResNet-44 on 2,000 images (the learned-equivariance
  paper's count) under 3 rotations and 8 diagonal shifts finishes on two cores: the time
  and the ratio to the bare forward passes ((1 + 11) x images) are printed
  (``--resnet44``; ``--only-resnet44`` skips the rest);
* (issue 11) the baselines cost at most one more pass: ``--baselines`` times, side by
  side and interleaved in one run, the bare forward passes, ``measure`` without any
  baseline (redundancy statistics patched out, ``ci_groups=0``), with the
  channel-redundancy baseline, with it and the bootstrap intervals (the default), and
  with the random-init baseline too (``random_init=True``), and prints each ratio to
  the measurement without baselines (target for everything together: <= 2x, i.e. one
  more pass) and to the bare passes (``--only-baselines`` skips the rest).

Run: ``.venv/bin/python benchmarks/bench_measure.py [--repeats 7] [--images 1000] [--threads 1]
[--clock cpu] [--resnet44-rot90 512] [--resnet44] [--baselines] [--only-baselines]
[--no-memory]``.
Times are medians and minima of interleaved repeats (``--clock cpu``: process CPU time,
which a busy machine inflates less than wall time at one thread); each memory figure
comes from a fresh subprocess (peak RSS, and peak RSS growth during the measure call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader

from equivision.data.synthetic import SyntheticImages
from equivision.measure import measure
from equivision.measure.engine import _Session
from equivision.models import create_model
from equivision.transforms import parse_transforms


def _bare_passes(model, batches, ts):
    """The floor: the bare forward passes on X and on every gX, without measuring."""
    def bare() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)
                for t in ts:
                    model(t(x))
    return bare


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


#: Clocks: wall time, or the CPU time of the process (all threads; with one thread it
#: is not inflated by other processes on a shared machine).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_ratio(images: int, repeats: int, batch: int, layers: str | None = None,
               model_name: str = "cnn7", shape: tuple[int, int, int] = (1, 28, 28),
               spec: str = "rot90", clock: str = "wall") -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=shape[0]).eval()
    data = SyntheticImages(images, shape=shape, seed=1)
    batches = [x for x, _ in DataLoader(data, batch_size=batch)]
    ts = parse_transforms(spec)

    bare = _bare_passes(model, batches, ts)

    def measured() -> None:
        measure(model, batches, ts, layers=layers, progress=False)

    now = CLOCKS[clock]
    bare()
    measured()  # warm-up
    tb, tm = [], []
    for _ in range(repeats):
        t0 = now()
        bare()
        tb.append(now() - t0)
        t0 = now()
        measured()
        tm.append(now() - t0)
    ratios = [m / b for m, b in zip(tm, tb)]
    return {"images": images, "bare_s": statistics.median(tb), "measure_s": statistics.median(tm),
            "bare_min_s": min(tb), "measure_min_s": min(tm),
            "ratio_median": statistics.median(ratios), "ratio_min": min(tm) / min(tb),
            "ratios": ratios}


def print_ratio(r: dict, label: str, target: str) -> None:
    """Medians and minima of one :func:`time_ratio` result."""
    print(f"time: {label}, {r['images']} images, {torch.get_num_threads()} threads")
    print(f"  bare forward passes  median {r['bare_s']:.3f} s, min {r['bare_min_s']:.3f} s")
    print(f"  measure              median {r['measure_s']:.3f} s, min {r['measure_min_s']:.3f} s")
    print(f"  ratio measure/bare   median {r['ratio_median']:.2f}x, min/min "
          f"{r['ratio_min']:.2f}x{target}; runs: {', '.join(f'{x:.2f}' for x in r['ratios'])}")


@contextlib.contextmanager
def no_redundancy():
    """``measure`` without the channel-redundancy statistics (for the comparison only)."""
    saved = _Session._redundancy
    _Session._redundancy = lambda self, name, fx, ids: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Session._redundancy = saved  # type: ignore[method-assign]


#: The variants timed by :func:`baseline_ratios`: label -> (keyword arguments of
#: ``measure``, whether the redundancy statistics run).
VARIANTS = {
    "no baseline (ci_groups=0, no redundancy)": ({"ci_groups": 0}, False),
    "+ channel redundancy": ({"ci_groups": 0}, True),
    "+ redundancy + 95% intervals (default)": ({}, True),
    "+ random init too (random_init=True)": ({"random_init": True}, True),
}


def baseline_ratios(images: int, repeats: int, batch: int, spec: str = "rot90",
                    clock: str = "wall", layers: str | None = None) -> dict:
    """Median and minimum time of the bare passes and of each :data:`VARIANTS` entry,
    interleaved repeat by repeat (cnn7, synthetic 1x28x28 images)."""
    torch.manual_seed(0)
    model = create_model("cnn7").eval()
    batches = [x for x, _ in DataLoader(SyntheticImages(images, shape=(1, 28, 28), seed=1),
                                        batch_size=batch)]
    ts = parse_transforms(spec)

    bare = _bare_passes(model, batches, ts)

    def run(kw: dict, redundancy: bool) -> None:
        with contextlib.nullcontext() if redundancy else no_redundancy():
            measure(model, batches, ts, layers=layers, progress=False, **kw)

    now = CLOCKS[clock]
    jobs = {"bare forward passes": bare,
            **{k: (lambda kw=kw, r=r: run(kw, r)) for k, (kw, r) in VARIANTS.items()}}
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, job in jobs.items():
            t0 = now()
            job()
            times[k].append(now() - t0)
    return times


def print_baselines(times: dict[str, list[float]], label: str) -> None:
    """Each variant's median and minimum, and its ratios (per repeat, then the median)
    to the measurement without baselines and to the bare passes."""
    base_key = next(iter(VARIANTS))
    print(f"baselines: {label}, {torch.get_num_threads()} threads")
    print(f"  {'variant':<44} {'median s':>9} {'min s':>7} {'/ no baseline':>14} {'/ bare':>7}")
    for k, ts in times.items():
        to_base = statistics.median(a / b for a, b in zip(ts, times[base_key]))
        to_bare = statistics.median(a / b for a, b in zip(ts, times["bare forward passes"]))
        print(f"  {k:<44} {statistics.median(ts):>9.3f} {min(ts):>7.3f} {to_base:>13.2f}x "
              f"{to_bare:>6.2f}x")


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
    p.add_argument("--resnet44-rot90", type=int, default=0, metavar="N",
                   help="also time ResNet-44's points under 3 rotations on N images (issue 10)")
    p.add_argument("--baselines", action="store_true",
                   help="also time the random-init and redundancy baselines and the intervals")
    p.add_argument("--only-baselines", action="store_true", help="only the baseline timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (for one thread on a busy machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"clock: {args.clock}, batch {args.batch}, medians and minima of interleaved repeats; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.baselines or args.only_baselines:
        times = baseline_ratios(args.images, args.repeats, args.batch, "rot90", args.clock)
        print_baselines(times, f"cnn7, its 9 measurement points, {args.images} images, "
                        "3 rotations")
        print(f"  load average at end {os.getloadavg()[0]:.1f} (a loaded machine inflates "
              "wall times; --clock cpu at --threads 1 is steadier)")
        if args.only_baselines:
            return
    if args.resnet44_rot90:
        r = time_ratio(args.resnet44_rot90, args.repeats, args.batch, None, "resnet44",
                       (3, 32, 32), "rot90", args.clock)
        print_ratio(r, "resnet44 (3x32x32), default measurement points, 3 rotations",
                    " (target <= 1.3x)")
    if args.resnet44 or args.only_resnet44:
        reps = min(args.repeats, 3)
        r = time_ratio(2000, reps, args.batch, None, "resnet44", (3, 32, 32), "rot90,shift:1-8",
                       args.clock)
        print_ratio(r, "resnet44 (3x32x32), default measurement points, 3 rotations + 8 "
                    "diagonal shifts (12 x 2000 images)", "")
        if args.only_resnet44:
            return
    for layers, label in ((None, "its 9 measurement points (7 conv blocks, pool, fc)"),
                          ("all", "all 24 leaf modules (conv, bn, relu, pools, fc)")):
        r = time_ratio(args.images, args.repeats, args.batch, layers, clock=args.clock)
        target = " (target <= 1.3x)" if layers is None else " (no target)"
        print_ratio(r, f"cnn7, {label}, 3 rotations", target)
    if args.no_memory:
        return
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
