"""Cost of SER: training-step time and FLOPs with SER over without (paper: 1.008x FLOPs).

Both methods (MoCo-v3 by default) start from the same encoder weights and train on the
same images; the SER run partitions each batch with ratio r (``round(r * B)`` images get
equivariant views and the patch-wise NT-Xent term). One timed step = forward of both views
(student and momentum encoder), backward, AdamW step and the momentum update; the views are
drawn before the clock starts (view sampling is reported separately). Baseline and SER steps
alternate so that both see the same machine load; medians over ``--repeats``, with the
median of the per-round ratios and the ratio of the minima; on the CPU also the process's
CPU time per step (``time.process_time``), which other processes on a shared machine disturb
far less than the wall clock.

The verdict (<= 1.05x, the issue's target) reads the median of the per-round ratios: of
the CPU time on a CPU (the wall clock of a loaded machine is noise), of the wall clock on
a GPU. T_eq uses its default resized canvases (patch-aligned sizes from 24 to 40 px at
32 px), so the SER images run one extra forward per canvas size; the canvases of the
timed batch are printed.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
backward pass (matmuls, convolutions, attention; element-wise work is not counted).

Usage::

    python benchmarks/bench_ser.py          # default: 32 px, patch 4, dim 96, depth 4,
                                            # heads 3, [CLS] after block 2, batch 256
    python benchmarks/bench_ser.py --dim 192 --depth 6 --cls-layer 4   # ViT-Tiny-ish
                                            # (about 40 s a step on 2 busy CPU cores)
    python benchmarks/bench_ser.py --device cuda --json runs/bench_ser.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from equivision.ssl import SERConfig, SSLViT, build_method
from equivision.ssl.pretrain import default_views
from equivision.utils import resolve_device

PAPER_FLOPS_RATIO = 1.008
TARGET = 1.05


def build(args: argparse.Namespace, ser: bool, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = SSLViT(image_size=args.image_size, patch_size=args.patch, dim=args.dim,
                 depth=args.depth, heads=args.heads, cls_layer=args.cls_layer)
    cfg = SERConfig(weight=0.5, tau=0.3) if ser else None
    return build_method(args.method, enc, cfg).to(device)


def step_fn(method: torch.nn.Module, batch, opt: torch.optim.Optimizer,
            sync) -> tuple[float, float]:
    """One training step; returns (wall-clock seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = method(batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    method.on_step_end(0, 100)
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def flops(method: torch.nn.Module, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        out = method(batch)
        out["loss"].backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def report(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    """Print the results and add the verdict against :data:`TARGET` to ``result``."""
    med = {n: v["median"] for n, v in result["step_time_s"].items()}
    med_cpu = {n: v["median"] for n, v in result["cpu_time_s"].items()}
    counts, view_time = result["flops_per_step"], result["view_sampling_s"]
    m_eq, canvases = result["equivariant_images"], result["canvases"]
    print(f"{args.method} ViT(img {args.image_size}, patch {args.patch}, dim {args.dim}, "
          f"depth {args.depth}, heads {args.heads}, cls_layer {args.cls_layer}), batch "
          f"{args.batch}, r={args.ratio} -> M={m_eq} equivariant images, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"step time  baseline {med['baseline']:.3f} s   SER {med['ser']:.3f} s   "
          f"ratio {result['time_ratio']:.3f}x  (target <= 1.05x; median of {args.repeats})")
    print(f"           median of paired ratios {result['time_ratio_paired_median']:.3f}x, "
          f"ratio of minima {result['time_ratio_of_minima']:.3f}x")
    if device.type == "cpu":
        print(f"CPU time   baseline {med_cpu['baseline']:.3f} s   SER {med_cpu['ser']:.3f} s   "
              f"ratio {result['cpu_time_ratio']:.3f}x  (process CPU seconds: less sensitive "
              "to other processes on a shared machine)")
    print(f"FLOPs/img  baseline {counts['baseline'] / args.batch / 1e9:.3f} G   SER "
          f"{counts['ser'] / args.batch / 1e9:.3f} G   ratio {result['flops_ratio']:.4f}x  "
          f"(paper, ViT-S/16 on ImageNet: {PAPER_FLOPS_RATIO}x)")
    print(f"view sampling  baseline {view_time['baseline']:.3f} s   SER {view_time['ser']:.3f} s"
          " (not in the step time)")
    key = "cpu_time_ratio_paired_median" if device.type == "cpu" else \
        "time_ratio_paired_median"
    result["verdict"] = {"measure": key, "ratio": result[key], "target": TARGET,
                         "pass": result[key] <= TARGET}
    print(f"canvases of the SER images: {canvases}")
    print(f"verdict: {key} {result[key]:.3f}x "
          f"{'<=' if result[key] <= TARGET else '>'} {TARGET}x -> "
          f"{'PASS' if result[key] <= TARGET else 'FAIL'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="mocov3", choices=["mocov3", "dino", "barlow"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--cls-layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    images = torch.rand(args.batch, 3, args.image_size, args.image_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
    methods = {"baseline": build(args, False, device), "ser": build(args, True, device)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samplers = {"baseline": default_views(methods["baseline"].backbone, 0.0),
                    "ser": default_views(methods["ser"].backbone, args.ratio)}
    batches, view_time = {}, {}
    for name, sampler in samplers.items():
        t0 = time.perf_counter()
        batches[name] = sampler(images, torch.Generator().manual_seed(1))
        sync()
        view_time[name] = time.perf_counter() - t0
    m_eq = int(batches["ser"].eq_index.numel())
    eq_views = batches["ser"].eq_views or [[]]
    canvases = sorted({tuple(v.shape[-2:]) for views in eq_views for v in views})
    opts = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            for n, m in methods.items()}
    times: dict[str, list[float]] = {"baseline": [], "ser": []}
    cpu: dict[str, list[float]] = {"baseline": [], "ser": []}
    for r in range(args.repeats + 1):  # the first round warms up
        order = ("baseline", "ser") if r % 2 == 0 else ("ser", "baseline")
        for name in order:
            t, c = step_fn(methods[name], batches[name], opts[name], sync)
            if r > 0:
                times[name].append(t)
                cpu[name].append(c)
    counts = {n: flops(methods[n], batches[n]) for n in methods}
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "equivariant_images": m_eq,
        "step_time_s": {n: {"median": med[n], "all": times[n]} for n in times},
        "time_ratio": med["ser"] / med["baseline"],
        "time_ratio_paired_median": statistics.median(
            s / b for b, s in zip(times["baseline"], times["ser"])),
        "time_ratio_of_minima": min(times["ser"]) / min(times["baseline"]),
        "cpu_time_s": {n: {"median": med_cpu[n], "all": cpu[n]} for n in cpu},
        "cpu_time_ratio": med_cpu["ser"] / med_cpu["baseline"],
        "cpu_time_ratio_paired_median": statistics.median(
            s / b for b, s in zip(cpu["baseline"], cpu["ser"])),
        "canvases": canvases,
        "flops_per_step": counts,
        "flops_per_image": {n: c / args.batch for n, c in counts.items()},
        "flops_ratio": counts["ser"] / counts["baseline"],
        "paper_flops_ratio": PAPER_FLOPS_RATIO,
        "view_sampling_s": view_time,
    }
    report(args, device, result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
