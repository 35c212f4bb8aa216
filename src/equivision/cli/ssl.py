"""The ``equivision pretrain`` and ``equivision probe`` commands (self-supervised ViTs + SER).

``pretrain`` builds an :class:`~equivision.ssl.vit.SSLViT`, wraps it in MoCo-v3, DINO or
Barlow Twins (optionally with Soft Equivariance Regularization) and runs
:func:`equivision.ssl.pretrain.pretrain` (atomic ``OUT/last.pt``, exact ``--resume``, sharded
batches and SyncBatchNorm projectors under ``torchrun``; multi-crop with ``--local-crops``;
an online 20-NN monitor on held-out images with ``--knn-every``, written to
``OUT/knn.csv``). ``probe`` loads the encoder of such a checkpoint and runs
:func:`equivision.ssl.probe.run_probes` on any dataset (``--data``), printing a summary
table with the baselines beside the trained numbers (linear and 20-NN on raw pixels and
on a random-init encoder, the random-init encoder's centred equivariance) and optionally
writing every number as JSON.
"""

from __future__ import annotations

import argparse
import csv
import os
import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..io import check_writable_file, write_csv
from ..ssl import SERConfig, SSLViT, build_method
from ..ssl.data import load_images
from ..ssl.gather import rank_and_world
from ..ssl.methods import SSL_METHODS
from ..ssl.pretrain import PretrainConfig, default_views, load_pretrained, pretrain
from ..ssl.probe import PROBES, KNNMonitor, run_probes
from ..ssl.views import patch_aligned_scales
from ..utils import seed_everything
from .common import (
    CLIError,
    add_data_options,
    check_new_run,
    finite,
    names,
    parse_kwargs,
    positive_int,
    show_progress,
    write_json,
)

__all__ = ["add_parsers", "cmd_pretrain", "cmd_probe", "probe_table"]



def _ser_layer(text: str) -> int | str | None:
    """``--ser-layer``: ``cls`` (the [CLS]-insertion layer), ``all`` or a block 1..depth."""
    if text in ("cls", "default", ""):
        return None
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ser-layer takes a block number, 'all' or 'cls', got {text!r}") from None


# ----------------------------------------------------------------------------- pretrain


def _ser_config(args: argparse.Namespace) -> SERConfig | None:
    """``--ser*`` -> the SER settings (the paper's defaults, :meth:`SERConfig.paper`).

    Without ``--ser`` the run is the lambda = 0 control (:meth:`SERConfig.control`: the
    same views and ratio r as SER, no SER term), the baseline that isolates SER;
    ``--plain`` is the base method without equivariant views (r = 0)."""
    options = {"weight": args.ser_weight, "layer": args.ser_layer,
               "variant": args.ser_variant, "tau": args.ser_tau}
    if args.ser and args.plain:
        raise CLIError("--ser and --plain exclude each other: --plain trains without T_eq")
    if not args.ser:
        if any(v is not None for v in options.values()):
            raise CLIError("--ser-weight/--ser-layer/--ser-variant/--ser-tau need --ser")
        return None if args.plain else SERConfig.control(args.method)
    return SERConfig.paper(args.method, **options)


def _check_sizes(args: argparse.Namespace) -> None:
    if args.image_size % args.patch_size:
        raise CLIError(
            f"--image-size {args.image_size} is not a multiple of --patch-size "
            f"{args.patch_size}; use e.g. --image-size "
            f"{max(1, args.image_size // args.patch_size) * args.patch_size}")
    local = getattr(args, "local_size", None)
    if local is not None and local % args.patch_size:
        raise CLIError(
            f"--local-size {local} is not a multiple of --patch-size {args.patch_size}; use "
            f"e.g. --local-size {max(1, local // args.patch_size) * args.patch_size}")


def _knn_monitor(args: argparse.Namespace) -> KNNMonitor | None:
    """``--knn-every N``: an online k-NN monitor every N steps; memory bank: the first
    ``--knn-images`` pretraining images with their labels, queries: as many held-out
    images (the ``val`` split, carved from the training data and never pretrained on;
    ``photos`` has none and uses patches of its ``test`` split)."""
    if args.knn_every is None:
        return None
    held = "test" if args.data == "photos" else "val"
    bank = load_images(args.data, "train", args.image_size, args.knn_images,
                       seed=args.data_seed, root=args.data_root)
    queries = load_images(args.data, held, args.image_size, args.knn_images,
                          seed=args.data_seed, root=args.data_root)
    return KNNMonitor(bank, queries, every_steps=args.knn_every)


def _write_knn(path: Path, monitor: KNNMonitor) -> None:
    """``OUT/knn.csv`` (``step, knn_top1``): the rows of an earlier invocation (before
    ``--resume``) up to this one's first step, then this one's."""
    new = list(zip(monitor.history["step"], monitor.history["knn_top1"]))
    first = new[0][0] if new else float("inf")
    old: list[tuple[int, float]] = []
    if path.exists():
        with open(path, newline="") as f:
            old = [(int(r["step"]), float(r["knn_top1"])) for r in csv.DictReader(f)
                   if int(r["step"]) < first]
    write_csv(path, ("step", "knn_top1"), old + new)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Run ``equivision pretrain`` (see :func:`add_parsers` for the options)."""
    _check_sizes(args)
    ser = _ser_config(args)
    ratio = args.ratio if args.ratio is not None else SERConfig.default_ratio(ser)
    if args.ser and ratio == 0:
        raise CLIError("--ser with --ratio 0 gives SER no images; use --ratio > 0")
    if int(os.environ.get("RANK", "0")) == 0:
        check_new_run(args.out, args.resume)  # before any work; never over an old run
    seed_everything(args.seed)  # the same initial weights in every process
    encoder = SSLViT(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim,
                     depth=args.depth, heads=args.heads,
                     cls_layer=args.cls_layer if args.cls_layer is not None
                     else max(0, args.depth // 2))
    method = build_method(args.method, encoder, ser, **parse_kwargs(args.method_args))
    config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            warmup_epochs=min(args.warmup_epochs, args.epochs),
                            weight_decay=args.weight_decay, ratio=ratio, seed=args.seed,
                            device=args.device, amp=args.amp, local_crops=args.local_crops,
                            local_size=args.local_size)
    data = load_images(args.data, "train", args.image_size, args.images, seed=args.data_seed,
                       root=args.data_root)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # before torchrun's group exists
    if rank0 and ratio > 0 and patch_aligned_scales(args.image_size, args.patch_size) == [1.0]:
        print(f"note: {args.image_size} px images with {args.patch_size} px patches have no "
              "patch-aligned scale; T_eq uses rot90 and flips only")
    out = Path(args.out)
    try:
        with warnings.catch_warnings():  # the note above says it once
            warnings.filterwarnings("ignore", message="no patch-aligned scale")
            views = default_views(encoder, ratio, args.local_crops,
                                  args.local_size) if ratio > 0 else None
            monitor = _knn_monitor(args)
            history = pretrain(method, data, config, out_dir=out, resume=args.resume,
                               views=views, progress=show_progress(args),
                               callbacks=[monitor] if monitor else [])
    except FileExistsError as err:
        raise CLIError(f"{err} (add --resume)") from None
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    if rank_and_world()[0] != 0:
        return
    n = len(history["epoch"])
    loss = history["loss"][-1] if n else float("nan")
    equiv = history["loss_equiv"][-1] if n else float("nan")
    print(f"done: {args.method}{' + SER' if ser else ''}, {n} epochs "
          f"({len(data)} images), loss {loss:.4f}, equivariance loss {equiv:.4f}; "
          f"checkpoint {out / 'last.pt'}")
    if monitor is not None and monitor.history["step"]:
        _write_knn(out / "knn.csv", monitor)
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in zip(monitor.history["step"],
                                                         monitor.history["knn_top1"]))
        print(f"online 20-NN top-1 on {len(monitor.test)} held-out images (step: top-1): "
              f"{curve}; {out / 'knn.csv'}")


# ----------------------------------------------------------------------------- probe


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _top(r: dict[str, Any] | None) -> str:
    return "-" if not r else f"{_fmt(r.get('top1'))} / {_fmt(r.get('top5'))}"


def _baseline_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the baselines (raw pixels, random-init encoder) of ``results``."""
    base = results.get("baselines")
    if not base:
        return []
    rows: list[tuple[str, str]] = []
    for name, label in (("linear", "linear"), ("knn", "k-NN")):
        rows.append((f"{label} top1 / top5, random-init encoder",
                     _top(base["random_init"].get(name))))
        rows.append((f"{label} top1 / top5, raw pixels", _top(base["raw_pixels"].get(name))))
    return rows


def probe_table(results: dict[str, Any]) -> str:
    """A plain-text summary of :func:`~equivision.ssl.probe.run_probes`'s result: one line
    per headline number (classification top-1/top-5, per-block equivariance scores,
    transformation-prediction accuracy per block, corruption accuracies), then the
    baselines when present (linear and k-NN on a random-init encoder and on raw pixels;
    the random-init encoder's centred equivariance per block beside the trained one's,
    when the equivariance probe ran)."""
    rows: list[tuple[str, str]] = []
    for name in ("linear", "knn", "mlp"):
        r = results.get(name)
        if r:
            rows.append((f"{name} top1 / top5", _top(r)))
    eq = results.get("equivariance")
    base = (results.get("baselines") or {}).get("random_init", {}).get("equivariance")
    if eq:  # the random-init encoder's scores beside the trained ones, not without them
        for g, scores in eq["centred"].items():
            cells = " ".join(f"{s:.3f}" for s in scores)
            rows.append((f"equivariance (centred) {g} (blocks 1..{len(scores)})", cells))
            if base and g in base["centred"]:
                rows.append((f"equivariance (centred) {g}, random-init encoder",
                             " ".join(f"{s:.3f}" for s in base["centred"][g])))
            rows.append((f"[CLS] invariance {g}", _fmt(eq["cls"].get(g))))
    tp = results.get("transform_prediction")
    if tp:
        for task in ("rotation", "flip"):
            if task in tp:
                cells = " ".join(f"{a:.3f}" for a in tp[task]["per_layer"])
                rows.append((f"predict {task} (blocks; [CLS])",
                             f"{cells}; {tp[task]['cls']:.3f} (chance {tp[task]['chance']:.2f})"))
    cr = results.get("corruptions")
    if cr:
        rows.append(("corruptions clean", _fmt(cr.get("clean"))))
        for key in ("mean_appearance", "mean_geometric", "mean_all"):
            rows.append((f"corruptions {key.replace('_', ' ')}", _fmt(cr.get(key))))
    rows += _baseline_rows(results)
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_probe(args: argparse.Namespace) -> None:
    """Run ``equivision probe`` (see :func:`add_parsers` for the options)."""
    which = names(args.probes)
    bad = [w for w in which if w not in PROBES]
    if bad or not which:
        raise CLIError(f"unknown probe(s) {bad or which}; choose from {','.join(PROBES)}")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise CLIError(f"no checkpoint {str(path)!r}; pass the last.pt written by "
                       "`equivision pretrain`")
    if args.json:
        check_writable_file(args.json, "--json")  # before the probes run
    encoder, info = load_pretrained(path)
    size = encoder.image_size
    tr = load_images(args.data, "train", size, args.images, seed=1, root=args.data_root)
    te = load_images(args.data, "test", size, args.test_images, seed=1, root=args.data_root)
    steps = {"steps": args.steps}
    options: dict[str, dict[str, Any]] = {
        "linear": steps, "mlp": steps, "transform_prediction": steps,
        "corruptions": {**steps, **({"severities": args.severities} if args.severities
                                    else {})}}
    results = run_probes(encoder, tr, te, which=which, device=args.device,
                         options={k: v for k, v in options.items() if k in which},
                         baselines=not args.no_baselines)
    ser = info.get("ser_config")
    head = (f"{info.get('method_name')}{' + SER' if ser else ''}, epoch {info.get('epoch')}, "
            f"encoder {info.get('encoder_config')}; probed on {args.data} "
            f"({len(tr)} train / {len(te)} test images)")
    print(head)
    print(probe_table(results))
    if args.json:
        payload = {"checkpoint": str(path), "data": args.data, "n_train": len(tr),
                   "n_test": len(te), "method": info.get("method_name"),
                   "method_kwargs": info.get("method_kwargs"), "ser": ser,
                   "encoder": info.get("encoder_config"), "epoch": info.get("epoch"),
                   "probes": results}
        write_json(args.json, payload)
        print(f"wrote {args.json}")


# ----------------------------------------------------------------------------- parsers


def add_parsers(sub: Any) -> None:
    """Add ``pretrain`` and ``probe`` to the ``equivision`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining of a small ViT (MoCo-v3/DINO/Barlow "
        "Twins, +/- SER)",
        description="Pretrain an SSLViT with a self-supervised method, optionally with Soft "
        "Equivariance Regularization; writes OUT/last.pt, log.csv, steps.csv. Runs under "
        "torchrun (the batch is sharded).")
    p.add_argument("--method", required=True, choices=SSL_METHODS.list())
    p.add_argument("--method-args", help="method constructor arguments, e.g. "
                   "proj_dim=64,hidden=256")
    p.add_argument("--ser", action="store_true", help="add the SER term (without it: the "
                   "lambda = 0 control with the same views, the baseline that isolates SER)")
    p.add_argument("--plain", action="store_true",
                   help="the base method without equivariant views (r = 0)")
    p.add_argument("--ser-weight", type=finite, default=None,
                   help=f"lambda (default {SERConfig.paper('mocov3').weight})")
    p.add_argument("--ser-layer", type=_ser_layer, default=None,
                   help="block 1..depth, 'all', or 'cls' (default: the [CLS] layer)")
    p.add_argument("--ser-variant", choices=["ser", "augself", "equimod"], default=None)
    p.add_argument("--ser-tau", type=finite, default=None,
                   help="SER temperature (default 0.5 for dino, else 0.3)")
    p.add_argument("--ratio", type=finite, default=None,
                   help="fraction r of each batch with equivariant views (default "
                   f"{SERConfig.RATIO} with --ser and for its lambda = 0 control, 0 with "
                   "--plain)")
    p.add_argument("--local-crops", type=int, choices=range(0, 17), default=0,
                   metavar="N", help="multi-crop: N small local views per image besides the "
                   "two global ones (0-16; DINO's student sees all, its teacher and "
                   "MoCo-v3's momentum encoder only the globals; Barlow Twins pairs each "
                   "local with each global; SER uses the globals)")
    p.add_argument("--local-size", type=positive_int, default=None, metavar="PX",
                   help="side of the local views, a multiple of --patch-size (default half "
                   "--image-size)")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=finite, default=5e-4)
    p.add_argument("--warmup-epochs", type=finite, default=2.0)
    p.add_argument("--weight-decay", type=finite, default=0.1)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--patch-size", type=positive_int, default=4)
    p.add_argument("--dim", type=positive_int, default=192)
    p.add_argument("--depth", type=positive_int, default=6)
    p.add_argument("--heads", type=positive_int, default=3)
    p.add_argument("--cls-layer", type=int, default=None,
                   help="insert [CLS] after this block (default depth // 2)")
    add_data_options(p, required=False, default="photos")
    p.add_argument("--images", "--max-images", dest="images", type=positive_int,
                   default=None, help="use at most N pretraining images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the photo patches")
    p.add_argument("--knn-every", type=positive_int, default=None, metavar="N",
                   help="online 20-NN monitor every N steps on held-out images (the val "
                   "split; test patches for photos); writes OUT/knn.csv")
    p.add_argument("--knn-images", type=positive_int, default=512,
                   help="images in the monitor's memory bank and in its held-out queries")
    p.add_argument("--out", required=True, help="directory for last.pt, log.csv, steps.csv")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bars")
    p.set_defaults(func=cmd_pretrain)

    q = sub.add_parser(
        "probe", help="probe a pretrained SSL encoder (k-NN, linear, equivariance, ...)",
        description="Load the encoder of an `equivision pretrain` checkpoint and run probes; "
        "prints a summary and optionally writes all numbers as JSON.")
    q.add_argument("--checkpoint", required=True, help="OUT/last.pt of `equivision pretrain`")
    add_data_options(q, required=False, default="digits")
    q.add_argument("--probes", default="linear,knn",
                   help="comma list of linear,knn,mlp,equivariance,transform_prediction,"
                   "corruptions (default linear,knn)")
    q.add_argument("--images", "--max-images", dest="images", type=positive_int,
                   default=None, help="at most N training images for the probes")
    q.add_argument("--test-images", type=positive_int, default=None,
                   help="at most N test images")
    q.add_argument("--steps", type=positive_int, default=300,
                   help="optimizer steps of the trained probes (default 300)")
    q.add_argument("--severities", type=lambda s: [int(v) for v in s.split(",")],
                   default=None, help="corruption severities, e.g. 1,3,5 (default 1..5)")
    q.add_argument("--no-baselines", action="store_true",
                   help="skip the baselines printed beside the trained numbers (linear and "
                   "20-NN on raw pixels and on a random-init encoder, the random-init "
                   "encoder's centred equivariance)")
    q.add_argument("--json", help="write all results to this JSON file (atomically)")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=cmd_probe)
