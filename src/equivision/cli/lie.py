"""``equivision lie``: the Lie derivative of every layer of a model for continuous
translations, rotation, scaling and a photometric change, and the layer-wise
decomposition of the output's (:func:`equivision.measure.lie.lie_derivative`), next to
the same architecture at random initialisation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io import check_writable_dir
from ..measure.baselines import random_init_copy
from ..measure.lie import lie_derivative
from ..measure.lie_generators import DEFAULT_GENERATORS, GENERATORS, as_generators
from ..measure.lie_report import LieReport
from ..measure.lie_tangents import MODES
from ..utils import resolve_device, seed_everything
from .common import (
    add_data_options,
    image_size,
    load_model,
    parse_token_grid,
    positive_int,
    resolve_dataset,
    warn_other_input,
)

__all__ = ["add_parsers", "cmd_lie"]


def _run(args: argparse.Namespace, model: Any, name: str, dataset: Any, device: Any
         ) -> LieReport:
    model.to(device)
    return lie_derivative(
        model, dataset, args.generators, layers=args.layers or None,
        batch_size=args.batch_size, max_images=args.max_images, device=device,
        token_grid=parse_token_grid(args.token_grid), margin=args.margin,
        decompose=not args.no_decompose, mode=args.mode, model_name=name)


def cmd_lie(args: argparse.Namespace) -> None:
    """Run ``equivision lie``: print the per-layer table (and the decomposition), write
    ``lie.json`` / ``lie.csv`` into ``--out`` and, for a trained model, the random-init
    baseline into ``--out/random-init``."""
    out = check_writable_dir(args.out, "--out")  # before minutes of computing
    as_generators(args.generators)  # a bad name fails before the data is read
    device = resolve_device(args.device)
    dataset = resolve_dataset(args.data, args.split, root=args.data_root, size=args.size)
    seed_everything(args.seed)
    model, name = load_model(args.model, args.model_args, args.checkpoint, dataset)
    warn_other_input(args.checkpoint, dataset, "lie")
    reports = {"": _run(args, model, name, dataset, device)}
    if args.checkpoint is None:
        print(f"note: no --checkpoint: {name} has random weights (seed {args.seed})")
    elif not args.no_baseline:
        fresh, _ = random_init_copy(model, args.seed)
        reports["random-init"] = _run(args, fresh, f"{name} (random init)", dataset, device)
    for sub, report in reports.items():
        report.meta.update({"data": args.data, "split": args.split,
                            "checkpoint": None if sub else args.checkpoint, "seed": args.seed})
        print(f"== {report.model}: ||L f_l(x)|| / ||f_l(x)|| per layer "
              f"({report.meta['n_images']} images, {report.meta['mode']} mode)")
        print(report.table())
        if not args.no_decompose:
            print("-- contributions to the output's Lie derivative, mean ||C_l||")
            print(report.table("contribution"))
        files = report.save(Path(out) / sub if sub else out)
        print("wrote " + ", ".join(str(p) for p in files.values()))


def add_parsers(sub: Any) -> None:
    """Add ``lie`` to the ``equivision`` subcommand parsers ``sub``."""
    p = sub.add_parser(
        "lie", help="Lie derivative per layer (continuous shifts, rotation, scale, brightness)",
        description="Per-layer Lie derivative norms (Gruver et al., ICLR 2023) and the "
        "layer-wise decomposition of the output's. Generators: "
        + ", ".join(f"{n} ({d})" for n, d in GENERATORS.describe().items()))
    p.add_argument("--model", required=True, help="registry name or module:attr")
    p.add_argument("--model-args", help="constructor arguments, e.g. width=8,num_classes=10")
    p.add_argument("--checkpoint", help="weights: a state dict or an equivision checkpoint")
    add_data_options(p)
    p.add_argument("--split", default="test", help="train, test or all (default test)")
    p.add_argument("--size", type=image_size, default=None, help="image size of the dataset")
    p.add_argument("--generators", default=",".join(DEFAULT_GENERATORS),
                   help="comma-separated: " + ", ".join(GENERATORS.list()))
    p.add_argument("--layers", nargs="*", help="layer names or patterns (default: the model's "
                   "measurement points, else all leaves)")
    p.add_argument("--token-grid", help="h,w[,prefix] of (B, N, C) token outputs (default: "
                   "inferred from the token count)")
    p.add_argument("--margin", type=int, default=0,
                   help="leave out map positions within this many input pixels of the edge")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="Jacobian-vector products by forward-mode AD or double backward")
    p.add_argument("--no-decompose", action="store_true",
                   help="skip the layer-wise decomposition of the output's Lie derivative")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --checkpoint: skip the same architecture at random init")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--max-images", type=positive_int, default=256,
                   help="measure at most N images (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights not in a checkpoint")
    p.add_argument("--out", required=True, help="output folder for lie.json / lie.csv")
    p.set_defaults(func=cmd_lie)
