"""The ``equivision attack`` and ``equivision defend`` commands.

``attack`` reports clean and adversarial metrics of a model; ``defend`` adds an
inference-time defense and reports undefended / defended metrics and equivariance scores
per attack (:func:`equivision.robust.evaluate.evaluate_robustness`). Both shard the images
across processes under ``torchrun`` (rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..io import check_writable_file
from ..models import model_from_checkpoint
from ..robust.evaluate import RobustnessConfig, evaluate_robustness
from ..robust.view_fit import parse_views
from ..robust.wrappers import select_output
from ..utils import resolve_device, seed_everything
from .common import (
    CLIError,
    add_data_options,
    add_output_key,
    distributed_session,
    image_size,
    load_model,
    names,
    number,
    positive_int,
    resolve_dataset,
    show_progress,
    unit_interval,
    warn_other_input,
    write_json,
)

__all__ = ["add_parsers", "cmd_attack", "cmd_defend"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="an equivision checkpoint (the model is rebuilt from "
                   "it) or a state dict with --model")
    p.add_argument("--model", help="registry name or module:attr (default: the checkpoint's)")
    p.add_argument("--model-args",
                   help="constructor arguments, e.g. width=8,num_classes=10")
    add_output_key(p)
    add_data_options(p, dest="dataset", aliases=("--dataset",))
    p.add_argument("--split", default="test", help="train, test or all (default test)")
    p.add_argument("--size", type=image_size, default=None,
                   help="image size of the dataset (default: its own)")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="evaluate at most N images (default: all)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per batch; also the unit of the random draws (default 32)")
    p.add_argument("--eps", type=unit_interval, default=8 / 255,
                   help="attack radius in [0, 1] (default 8/255)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=10, help="attack steps (default 10)")
    p.add_argument("--alpha", type=number, default=None,
                   help="attack step size (default 2.5 eps / steps)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--targeted", action="store_true",
                   help="targeted attacks towards (label + 1) mod K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--ensemble", choices=["standard", "rand", "seg", "auto"], default=None,
                   help="add the AutoAttack-style ensemble row (APGD-CE, APGD-T, Square; "
                   "'rand' for randomized defenses, 'seg' for segmenters, 'auto' picks)")
    p.add_argument("--queries", type=positive_int, default=1000,
                   help="Square's query budget in the ensemble (default 1000)")
    p.add_argument("--checks", choices=["all", "basic", "none"], default="all",
                   help="automatic checks printed with the result: all (with the eps and "
                   "steps curves), basic, none (default all)")
    p.add_argument("--check-images", type=positive_int, default=8,
                   help="images the checks run on (default 8)")
    p.add_argument("--per-image", help="write the per-image results to this path (.json, "
                   "else CSV; atomic)")
    p.add_argument("--json", help="write the result as JSON to this path (atomic)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``attack`` and ``defend`` subcommands to ``equivision``'s subparsers."""
    a = sub.add_parser("attack", help="clean vs adversarial metrics of a model",
                       description="Attack a classifier or segmenter and report the clean and "
                       "adversarial accuracy (mIoU and pixel accuracy for segmenters).")
    _add_common(a)
    a.add_argument("--attack", default="pgd",
                   help="comma-separated: fgsm, ifgsm, pgd, mim, cw, houdini, apgd-ce, "
                   "apgd-dlr, apgd-t, square, autoattack (default pgd)")
    a.set_defaults(func=cmd_attack)

    d = sub.add_parser("defend", help="evaluate an inference-time defense under attacks",
                       description="Rows: clean + attacks; columns: undefended and defended "
                       "metric, equivariance score of clean / attacked / restored images.")
    _add_common(d)
    d.add_argument("--defense", default="equivariance",
                   help="none, random, equivariance, invariance, rotation, contrastive, "
                   "equivariance-reference (default equivariance)")
    d.add_argument("--attack", default="pgd,bpda-eot,adaptive",
                   help="comma-separated attacks (default pgd,bpda-eot,adaptive)")
    d.add_argument("--eps-v", type=unit_interval, default=8 / 255,
                   help="purification bound in [0, 1] (default 8/255)")
    d.add_argument("--defense-steps", type=int, default=20, help="purification steps T")
    d.add_argument("--eta", type=number, default=None,
                   help="purification step size (default 2.5 eps_v / T)")
    d.add_argument("--noise", type=number, default=1.0, help="purification noise (default 1)")
    d.add_argument("--feature-layer", default="auto",
                   help="layer whose equivariance is restored: auto (the model's last spatial "
                   "map, default), logits, output or a layer name")
    d.add_argument("--defense-transforms", default=None,
                   help="the defense's views, a transformation spec such as "
                   "'resize:1.4,resize:2,hflip,rotate:-15,rotate:15' (default: the paper's "
                   "eight views that the model can take); also the views of the scores")
    d.add_argument("--pairing", default="identity", choices=["identity", "pairs"])
    d.add_argument("--head", help="rotation/contrastive: a head file (robust.registry.save_head)"
                   "; without it a head is trained on the train split")
    d.add_argument("--head-epochs", type=int, default=3)
    d.add_argument("--eot-samples", type=int, default=4, help="EOT draws (bpda-eot, full)")
    d.add_argument("--lambda-e", default="0,1,10",
                   help="adaptive attack's lambda_e sweep, comma-separated (default 0,1,10)")
    d.add_argument("--repeats", type=int, default=1,
                   help="defended predictions per image; the worst is reported")
    d.set_defaults(func=cmd_defend)


def _load_model(args: argparse.Namespace, dataset: Any) -> tuple[nn.Module, str]:
    """The model of ``--checkpoint`` (rebuilt from it) or of ``--model``, made to return
    its logits (:func:`~equivision.robust.select_output` with ``--output-key``)."""
    model, name = _build_model(args, dataset)
    select_output(model, args.output_key)
    return model, name


def _build_model(args: argparse.Namespace, dataset: Any) -> tuple[nn.Module, str]:
    if not args.model and not args.checkpoint:
        raise CLIError("give --checkpoint PATH (an equivision checkpoint) or --model NAME")
    if not args.model:
        if args.model_args:
            raise CLIError("--model-args needs --model")
        return model_from_checkpoint(args.checkpoint), str(args.checkpoint)
    if args.checkpoint and ":" not in args.model:
        try:
            stored = load_checkpoint(args.checkpoint).get("model_name")
        except CheckpointError:
            stored = None  # a bare state dict: load_model_weights reports mismatches
        if stored and stored != args.model:
            raise CLIError(f"checkpoint {args.checkpoint!r} holds a {stored!r} model, not "
                           f"{args.model!r}; drop --model or pass --model {stored}")
    return load_model(args.model, args.model_args, args.checkpoint, dataset)


def _run(args: argparse.Namespace, defense: str | None, attacks: list[str],
         extra: dict[str, Any]) -> None:
    if not attacks:
        raise CLIError("--attack needs at least one attack name")
    if args.json:
        check_writable_file(args.json, "--json")  # before minutes of attacking
    if args.per_image:
        check_writable_file(args.per_image, "--per-image")
    device = resolve_device(args.device)
    with distributed_session(device) as rank:
        _evaluate(args, defense, attacks, extra, device, rank)


def _evaluate(args: argparse.Namespace, defense: str | None, attacks: list[str],
              extra: dict[str, Any], device: torch.device, rank: int) -> None:
    dataset = resolve_dataset(args.dataset, args.split, root=args.data_root, size=args.size)
    seed_everything(args.seed)  # same weights in every process without a checkpoint
    model, name = _load_model(args, dataset)
    if rank == 0:
        warn_other_input(args.checkpoint, dataset, args.command)
    config = RobustnessConfig(
        eps=args.eps, steps=args.steps, alpha=args.alpha, norm=args.norm,
        restarts=args.restarts, targeted=args.targeted, max_images=args.max_images,
        batch_size=args.batch_size, seed=args.seed, device=device,
        progress=show_progress(args) and rank == 0, ensemble=args.ensemble,
        ensemble_queries=args.queries, checks=args.checks, check_images=args.check_images,
        **extra)
    result = evaluate_robustness(model, dataset, attacks, defense, config)
    result.meta.update({"model": name, "dataset": args.dataset, "split": args.split,
                        "checkpoint": args.checkpoint})
    if rank != 0:
        return
    print(f"{name} on {args.dataset}/{args.split}: {result.n_images} images, eps {args.eps:g} "
          f"({args.norm}), {args.steps} steps, {result.seconds:.1f} s")
    print(result.report())
    if args.json:
        write_json(args.json, result.to_dict())
        print(f"wrote {args.json}")
    if args.per_image:
        result.save_per_image(args.per_image)
        print(f"wrote {args.per_image}")


def cmd_attack(args: argparse.Namespace) -> None:
    """``equivision attack``: clean and adversarial metrics, no defense."""
    _run(args, None, names(args.attack), {})


def cmd_defend(args: argparse.Namespace) -> None:
    """``equivision defend``: undefended vs defended metrics and equivariance scores."""
    try:
        lambdas = [float(v) for v in names(args.lambda_e)]
    except ValueError:
        raise CLIError(f"--lambda-e takes comma-separated numbers, got {args.lambda_e!r}"
                       ) from None
    defense_kwargs: dict[str, Any] = dict(
        eps_v=args.eps_v, eta=args.eta, steps=args.defense_steps, noise=args.noise,
        feature_layer=args.feature_layer, pairing=args.pairing, seed=args.seed,
        head_epochs=args.head_epochs)
    views = None
    if args.defense_transforms is not None:
        try:
            views = parse_views(args.defense_transforms)
        except (TypeError, ValueError) as err:
            raise CLIError(f"--defense-transforms: {err}") from None
        defense_kwargs["transforms"] = views
    if args.defense in ("rotation", "contrastive"):
        if args.head:
            defense_kwargs["head"] = args.head
        else:
            defense_kwargs["head_dataset"] = resolve_dataset(
                args.dataset, "train", root=args.data_root, size=args.size)
    _run(args, args.defense, names(args.attack),
         dict(eot_samples=args.eot_samples, lambdas=lambdas, repeats=args.repeats,
              defense_kwargs=defense_kwargs, score_transforms=views,
              feature_layer=args.feature_layer))
