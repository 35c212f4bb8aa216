"""``equivision train``: supervised training of a registry model on a built-in dataset
(:func:`equivision.training.train`: atomic checkpoints, exact ``--resume``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..augment import build_augment
from ..data import get_dataset
from ..models import create_model, model_defaults
from ..training import TrainConfig, train
from .common import parse_kwargs

__all__ = ["add_parsers", "cmd_train"]


def cmd_train(args: argparse.Namespace) -> None:
    """Run ``equivision train``; the model's class count, channels and (ViT / Mixer)
    image size default to the dataset's."""
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


def add_parsers(sub: Any) -> None:
    """Add ``train`` to the ``equivision`` subcommand parsers ``sub``."""
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
