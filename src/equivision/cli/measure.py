"""``equivision measure``: learned invariance and equivariance of every layer of a model
(:func:`equivision.measure.measure`); shards the images under ``torchrun``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..io import check_report_set
from ..measure import measure
from ..measure.report import REPORT_FILES
from ..measure.stats import CI_GROUPS
from ..transforms import parse_transforms
from ..utils import resolve_device, seed_everything
from .common import (
    add_data_options,
    distributed_session,
    image_size,
    load_model,
    parse_token_grid,
    positive_int,
    resolve_dataset,
    show_progress,
    warn_other_input,
)

__all__ = ["add_parsers", "cmd_measure"]


def cmd_measure(args: argparse.Namespace) -> None:
    """Run ``equivision measure`` (rank 0 prints the table and writes the report)."""
    check_report_set(args.out, REPORT_FILES, "--out")  # before minutes of computing
    device = resolve_device(args.device)
    with distributed_session(device) as rank:
        _measure(args, device, rank)


def _ci_groups(text: str) -> int:
    """``--ci-groups``: 0 or an integer >= 2."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if k < 0 or k == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no intervals) or at least 2, got {k}")
    return k


def _measure(args: argparse.Namespace, device: torch.device, rank: int) -> None:
    transforms = parse_transforms(args.transforms)
    dataset = resolve_dataset(args.data, args.split, root=args.data_root, size=args.size)
    seed_everything(args.seed)  # same initial weights in every process without a checkpoint
    model, name = load_model(args.model, args.model_args, args.checkpoint, dataset)
    if rank == 0:
        warn_other_input(args.checkpoint, dataset, "measure")
    if args.checkpoint is None and rank == 0:
        print(f"note: no --checkpoint: measuring {name} with random weights (seed "
              f"{args.seed}), itself the random-init baseline; pass --checkpoint PATH for "
              "a trained model", flush=True)
    model.to(device)
    report = measure(
        model, dataset, transforms, layers=args.layers or None, batch_size=args.batch_size,
        max_images=args.max_images, device=device, token_grid=parse_token_grid(args.token_grid),
        margin=args.margin, model_name=name, progress=show_progress(args) and rank == 0,
        random_init=args.random_init and args.checkpoint is not None, init_seed=args.seed,
        ci_groups=args.ci_groups,
    )
    report.meta.update({"data": args.data, "split": args.split, "checkpoint": args.checkpoint})
    if rank == 0:  # every process holds the all-reduced numbers; one writes them
        print(report.table(args.metric))
        files = report.save(Path(args.out))
        print("wrote " + ", ".join(str(p) for p in files.values()))


def add_parsers(sub: Any) -> None:
    """Add ``measure`` to the ``equivision`` subcommand parsers ``sub``."""
    m = sub.add_parser("measure", help="measure in/equivariance of every layer of a model",
                       description="Measure learned invariance and equivariance per layer.")
    m.add_argument("--model", required=True, help="registry name or module:attr")
    m.add_argument("--model-args", help="constructor arguments, e.g. width=8,num_classes=10")
    m.add_argument("--checkpoint", help="weights: a state dict or an equivision checkpoint")
    add_data_options(m)
    m.add_argument("--split", default="test", help="train, test or all (default test)")
    m.add_argument("--size", type=image_size, default=None,
                   help="image size of the dataset (default: the dataset's own)")
    m.add_argument("--transforms", default="rot90,flip,shift:1-4",
                   help="e.g. rot90,flip,shift:1-8,rotate:15,scale:1.2 (see `list transforms`)")
    m.add_argument("--layers", nargs="*", help="layer names or patterns (default: all leaves)")
    m.add_argument("--metric", nargs="+", default=["invariance", "equivariance", "mse", "cosine"],
                   help="metrics shown in the table with their intervals and random-init "
                        "values; the channel redundancy is always shown (all are written to "
                        "the files)")
    m.add_argument("--token-grid", help="h,w[,prefix] for layers returning (B, N, C) tokens")
    m.add_argument("--margin", type=int, default=0, help="drop positions near invalid borders")
    m.add_argument("--batch-size", type=positive_int, default=128, help="images per batch")
    m.add_argument("--max-images", type=positive_int, default=None,
                   help="measure at most N images (default: all)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    m.add_argument("--seed", type=int, default=0,
                   help="seed for weights not in a checkpoint and for the random-init baseline")
    m.add_argument("--no-random-init", dest="random_init", action="store_false",
                   help="do not measure the same architecture at random initialisation "
                        "beside a --checkpoint (by default it is measured, in the same pass: "
                        "one more forward per image and transformation)")
    m.add_argument("--ci-groups", type=_ci_groups, default=CI_GROUPS, metavar="K",
                   help=f"random image groups for the 95%% bootstrap intervals (default "
                        f"{CI_GROUPS}; memory K x C^2 per layer and transformation; 0: none)")
    m.add_argument("--out", required=True, help="output directory for report.json/csv/png")
    m.set_defaults(func=cmd_measure)
