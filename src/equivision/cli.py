"""The ``equivision`` command: ``measure``, ``train``, ``demo`` and ``list``."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``"width=8,num_classes=6"`` -> ``{"width": 8, "num_classes": 6}`` (Python literals)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"bad model argument {item!r}; write key=value, e.g. width=8")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def build_model(spec: str, kwargs: dict[str, Any], checkpoint: str | None) -> tuple[nn.Module, str]:
    """A model from a registry name or ``module:attr`` (a class, a factory function or
    an ``nn.Module`` instance), with weights from ``checkpoint`` if given."""
    from .checkpoint import load_model_weights
    from .models import create_model

    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as err:
            raise CLIError(f"cannot load model {spec!r}: {err}") from None
        model = obj if isinstance(obj, nn.Module) else obj(**kwargs)
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec!r} gave a {type(model).__name__}, not an nn.Module")
        name = attr
    else:
        if checkpoint:  # an equivision checkpoint of this model knows its arguments
            kwargs = {**_stored_kwargs(spec, checkpoint), **kwargs}
        model = create_model(spec, **kwargs)
        name = spec
    if checkpoint:
        load_model_weights(model, checkpoint)
    return model, name


def _stored_kwargs(spec: str, checkpoint: str) -> dict[str, Any]:
    """Constructor arguments stored in an equivision checkpoint of model ``spec``; none
    for a bare state dict or another model (loading then reports any mismatch)."""
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError:
        return {}  # a bare state dict, or broken: load_model_weights says which
    if state.get("model_name") != spec or not isinstance(state.get("model_kwargs"), dict):
        return {}
    return dict(state["model_kwargs"])


def cmd_measure(args: argparse.Namespace) -> None:
    from .utils import resolve_device

    device = resolve_device(args.device)
    with distributed_session(device) as rank:
        _measure(args, device, rank)


def _measure(args: argparse.Namespace, device, rank: int) -> None:
    from .data import get_dataset
    from .measure import measure
    from .transforms import parse_transforms
    from .utils import seed_everything

    transforms = parse_transforms(args.transforms)
    kwargs = parse_kwargs(args.model_args)
    dataset = get_dataset(args.data, split=args.split, size=args.size)
    seed_everything(args.seed)  # same initial weights in every process without a checkpoint
    model, name = build_model(args.model, kwargs, args.checkpoint)
    model.to(device)
    grid = None
    if args.token_grid:
        grid = tuple(int(v) for v in args.token_grid.split(","))
        if len(grid) not in (2, 3):
            raise CLIError("--token-grid takes h,w or h,w,prefix")
    out = Path(args.out)
    report = measure(
        model, dataset, transforms, layers=args.layers or None, batch_size=args.batch_size,
        max_images=args.max_images, device=device, token_grid=grid, margin=args.margin,
        model_name=name, progress=not args.quiet,
    )
    report.meta.update({"data": args.data, "split": args.split, "checkpoint": args.checkpoint})
    if rank == 0:  # every process holds the all-reduced numbers; one writes them
        print(report.table(args.metric))
        files = report.save(out)
        print("wrote " + ", ".join(str(p) for p in files.values()))


def _init_distributed(device) -> int:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); returns
    this process's rank (0 when not distributed)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.get_rank() if dist.is_initialized() else 0
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank()


@contextlib.contextmanager
def distributed_session(device) -> Iterator[int]:
    """``with distributed_session(device) as rank:`` joins the process group under
    ``torchrun`` and, if it started it, waits for every rank and tears it down at the
    end (a gloo group left open when the process exits aborts it)."""
    import torch.distributed as dist

    started = dist.is_available() and not dist.is_initialized()
    rank = _init_distributed(device)
    started = started and dist.is_initialized()
    try:
        yield rank
        if started:
            dist.barrier()  # rank 0 has written its files
    finally:
        if started:
            dist.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> None:
    from .augment import build_augment
    from .data import get_dataset
    from .models import create_model, model_defaults
    from .train import TrainConfig, train

    kwargs = parse_kwargs(args.model_args)
    build_augment(args.augment)  # a bad spec fails before the data are built
    train_set = get_dataset(args.data, split="train", size=args.size)
    val_set = get_dataset(args.data, split="test", size=args.size)
    kwargs.setdefault("num_classes", train_set.num_classes)
    kwargs.setdefault("in_channels", train_set.image_shape[0])
    if "image_size" in model_defaults(args.model):  # ViT / Mixer: fixed input size
        kwargs.setdefault("image_size", train_set.image_shape[-1])
    model = create_model(args.model, **kwargs)
    augment = build_augment(args.augment, num_classes=train_set.num_classes)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         optimizer=args.optimizer, weight_decay=args.weight_decay,
                         seed=args.seed, device=args.device)
    history = train(model, train_set, val_set, config, out_dir=args.out, resume=args.resume,
                    augment=augment if augment.augmentations else None,
                    progress=not args.quiet)
    last = {k: v[-1] for k, v in history.items() if v}
    acc = last.get("val_acc")
    print(f"done: {len(history['epoch'])} epochs, train loss {last.get('train_loss', 0):.4f}, "
          f"val accuracy {acc if acc is None else round(acc, 4)}; checkpoint {args.out}/last.pt")


def cmd_exactness(args: argparse.Namespace) -> None:
    from .gcnn import analyze_exactness, exact_sizes, nearest_exact_size
    from .measure import write_atomic

    size = _parse_size(args.input_size)
    model, name = build_model(args.model, parse_kwargs(args.model_args), args.checkpoint)
    report = analyze_exactness(model, size, group=args.group)
    print(report.table())
    lines = []
    if size[0] == size[1]:
        below, above = nearest_exact_size(model, size[0], group=args.group)
        lines.append(f"nearest exact sizes to {size[0]}: below {below}, above {above}")
    if args.range:
        lo, _, hi = args.range.partition(":")
        try:
            lo_i, hi_i = int(lo), int(hi)
        except ValueError:
            raise CLIError(f"--range takes A:B, e.g. 20:40, got {args.range!r}") from None
        sizes = exact_sizes(model, lo_i, hi_i, group=args.group)
        lines.append(f"exact sizes in {lo_i}..{hi_i}: {', '.join(map(str, sizes)) or 'none'}")
    for line in lines:
        print(line)
    if args.json:
        import json

        write_atomic(args.json, json.dumps({"model": name, **report.to_dict(), "notes_cli": lines},
                                           indent=1, default=str))
    print(f"verdict: {report.verdict}")


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise CLIError(f"--input-size takes N or HxW, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise CLIError(f"--input-size takes a positive N or HxW, got {text!r}")
    return vals[0], vals[1]


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    path = run_demo(Path(args.out), epochs=args.epochs, device=args.device,
                    progress=not args.quiet)
    print(f"wrote {path}")


def cmd_list(args: argparse.Namespace) -> None:
    from .data import list_datasets
    from .models import list_models
    from .transforms.spec import NAMES

    what = args.what
    if what in ("models", "all"):
        print("models:     " + ", ".join(list_models()))
    if what in ("datasets", "all"):
        print("datasets:   " + ", ".join(list_datasets()))
    if what in ("transforms", "all"):
        print("transforms: " + ", ".join(NAMES))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="equivision", description="Equivariance in vision models: measure, train, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="measure in/equivariance of every layer of a model",
                       description="Measure learned invariance and equivariance per layer.")
    m.add_argument("--model", required=True, help="registry name or module:attr")
    m.add_argument("--model-args", help="constructor arguments, e.g. width=8,num_classes=10")
    m.add_argument("--checkpoint", help="weights: a state dict or an equivision checkpoint")
    m.add_argument("--data", required=True, help="built-in dataset name (see `list`)")
    m.add_argument("--split", default="test", help="train, test or all (default test)")
    m.add_argument("--size", type=int, default=None, help="image size of the dataset")
    m.add_argument("--transforms", default="rot90,flip,shift:1-4",
                   help="e.g. rot90,flip,shift:1-8,rotate:15,scale:1.2 (see `list transforms`)")
    m.add_argument("--layers", nargs="*", help="layer names or patterns (default: all leaves)")
    m.add_argument("--metric", nargs="+", default=["invariance", "equivariance", "mse", "cosine"],
                   help="metrics shown in the table (all are written to the files)")
    m.add_argument("--token-grid", help="h,w[,prefix] for layers returning (B, N, C) tokens")
    m.add_argument("--margin", type=int, default=0, help="drop positions near invalid borders")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--max-images", type=int, default=None)
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    m.add_argument("--seed", type=int, default=0, help="seed for weights not in a checkpoint")
    m.add_argument("--out", required=True, help="output directory for report.json/csv/png")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_measure)

    t = sub.add_parser("train", help="train a registry model on a built-in dataset",
                       description="Supervised training with atomic checkpoints and exact resume.")
    t.add_argument("--model", required=True)
    t.add_argument("--model-args")
    t.add_argument("--data", required=True)
    t.add_argument("--size", type=int, default=None)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", required=True, help="directory for last.pt and log.csv")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--augment", default="none", metavar="SPEC",
                   help="training augmentations in order, e.g. crop,flip or crop:4,cutmix:1.0:0.5 "
                        "or randaugment:2:9 (crop[:PAD], flip[:P], cutmix[:ALPHA[:P]], "
                        "randaugment[:N[:M]], none; default none); pass the same one on --resume")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train (or reuse) a small CNN on digits and report on it",
                       description="The main job: writes OUT/report.md with plots.")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("exactness", help="does subsampling keep a model exactly equivariant?",
                       description="Trace every conv and pooling layer at an input size and "
                       "check (i + 2p - k_eff) mod s == 0; last line: the verdict.")
    e.add_argument("--model", required=True, help="registry name or module:attr")
    e.add_argument("--model-args", help="constructor arguments, e.g. width=0.5")
    e.add_argument("--checkpoint", help="weights (not needed for the analysis)")
    e.add_argument("--input-size", required=True, help="N or HxW")
    e.add_argument("--group", default="p4", choices=["p4", "p4m", "flip"])
    e.add_argument("--range", help="A:B, list the exact square sizes in this range")
    e.add_argument("--json", help="write the report as JSON to this path")
    e.set_defaults(func=cmd_exactness)

    s = sub.add_parser("list", help="list models, datasets and transformations")
    s.add_argument("what", nargs="?", default="all",
                   choices=["all", "models", "datasets", "transforms"])
    s.set_defaults(func=cmd_list)

    from .cli_robust import add_parsers as add_robust_parsers

    add_robust_parsers(sub)  # attack, defend

    from .cli_ssl import add_parsers as add_ssl_parsers

    add_ssl_parsers(sub)  # pretrain, probe
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        import os

        if os.environ.get("EQUIVISION_DEBUG"):
            raise
        print(f"equivision {args.command}: error: {err} (set EQUIVISION_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
