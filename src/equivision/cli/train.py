"""``equivision train``: supervised training of a registry model on a dataset
(:func:`equivision.training.train`: atomic checkpoints, exact ``--resume``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..augment import build_augment
from ..robust.wrappers import select_output
from ..training import TrainConfig, train
from ..utils import seed_everything
from .common import (
    add_data_options,
    add_output_key,
    check_new_run,
    image_size,
    load_model,
    positive_int,
    resolve_dataset,
    show_progress,
)

__all__ = ["NORMALIZATION", "add_parsers", "cmd_train"]

#: how the command line feeds images to the model (stored with the checkpoint)
NORMALIZATION = "none: pixel values in [0, 1]"


def cmd_train(args: argparse.Namespace) -> None:
    """Run ``equivision train``; the model's class count, channels and (ViT / Mixer)
    image size default to the dataset's. The seed is set before the model is built, so
    two runs with the same ``--seed`` give the same weights."""
    check_new_run(args.out, args.resume)
    build_augment(args.augment)  # a bad spec fails before the data are built
    train_set = resolve_dataset(args.data, "train", root=args.data_root, size=args.size)
    val_set = resolve_dataset(args.data, "val", root=args.data_root, size=args.size)
    seed_everything(args.seed, deterministic=args.deterministic)  # before the weights exist
    # a registry model takes its class count, channels and size from the data; a
    # module:attr model gets only its --model-args (measure, attack and defend then take
    # it back with --model module:attr --checkpoint last.pt)
    model = load_model(args.model, args.model_args, None, train_set)[0]
    select_output(model, args.output_key)  # a dict or tuple output: train on its logits
    augment = build_augment(args.augment, num_classes=train_set.num_classes)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         optimizer=args.optimizer, weight_decay=args.weight_decay,
                         seed=args.seed, device=args.device)
    run_info = {"augment": args.augment, "data": args.data, "size": args.size,
                "input_shape": list(train_set.image_shape), "normalization": NORMALIZATION}
    history = train(model, train_set, val_set, config, out_dir=args.out, resume=args.resume,
                    augment=augment if augment.augmentations else None,
                    progress=show_progress(args), run_info=run_info)
    last = {k: v[-1] for k, v in history.items() if v}
    acc = last.get("val_acc")
    print(f"done: {len(history['epoch'])} epochs, train loss {last.get('train_loss', 0):.4f}, "
          f"val accuracy {acc if acc is None else round(acc, 4)}; checkpoint {args.out}/last.pt")


def add_parsers(sub: Any) -> None:
    """Add ``train`` to the ``equivision`` subcommand parsers ``sub``."""
    t = sub.add_parser("train", help="train a registry model or your own on a dataset",
                       description="Supervised training with atomic checkpoints and exact resume.")
    t.add_argument("--model", required=True,
                   help="registry name, or module:attr (a class, a factory or an nn.Module "
                   "instance: it gets only --model-args, and takes images (B, C, H, W) in "
                   "[0, 1] of the dataset's channels and size)")
    t.add_argument("--model-args", help="constructor arguments, e.g. width=8")
    add_output_key(t)
    add_data_options(t)
    t.add_argument("--size", type=image_size, default=None,
                   help="image size (default: the dataset's own)")
    t.add_argument("--epochs", type=positive_int, default=5, help="total epochs")
    t.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"],
                   help="optimizer")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the weights, the shuffling and the augmentations")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic torch algorithms where torch has them (slower)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--out", required=True, help="directory for last.pt and log.csv")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--augment", default="none", metavar="SPEC",
                   help="training augmentations in order, e.g. crop,flip or crop:4,cutmix:1.0:0.5 "
                        "or randaugment:2:9 (crop[:PAD], flip[:P], cutmix[:ALPHA[:P]], "
                        "randaugment[:N[:M]], none; default none); pass the same one on --resume")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
