"""Using-and-abusing-equivariance experiments at CPU scale, on the built-in digits.

    table1  Table 1 / figure 5: Z2CNN vs P4CNN at an exact (28) and an approximate (29)
            input size, trained on upright digits; accuracy upright, under the exact
            rotations (90/180/270) and averaged over 0-360° (bilinear, CircleCrop)
    errors  figure 4: equivariance error (MSE, L1) per stage during training of an
            approximate (29 px) P4CNN, logged by EquivarianceErrorCallback
    biased  figure 6: training on rotations drawn from N(45°, sigma), sigma 20 and 40;
            accuracy against angle for Z2CNN and P4CNN
    table2  Table 2 style: plain ResNet vs P4ResNet at an exact (33) and an approximate
            (32) size (CIFAR-style, depth 8 quick / 20 full), seen (upright) vs unseen
            (90/180/270 and 0-360°) rotations

``--quick`` = fewer epochs and seeds. Results go to --out as JSON, Markdown and PNG.
Example: ``.venv/bin/python experiments/gcnn_rotations.py table1 --quick``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from support.rotations import RandomRotation, plot_accuracy_vs_rotation
from support.studies import mean_std

from equivision.data import get_dataset
from equivision.evaluation import accuracy_vs_rotation
from equivision.measure import write_atomic
from equivision.measure.callback import EquivarianceErrorCallback
from equivision.models import create_model
from equivision.training import TrainConfig, train
from equivision.utils import seed_everything

ANGLES = tuple(range(0, 361, 15))


def fit(model_name: str, size: int, seed: int, epochs: int, augment=None, callbacks=(),
        **kwargs):
    seed_everything(seed)
    tr = get_dataset("digits", split="train", size=size)
    te = get_dataset("digits", split="test", size=size)
    model = create_model(model_name, in_channels=1, num_classes=10, **kwargs)
    train(model, tr, None, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed,
                                        device="cpu"), augment=augment, callbacks=callbacks,
          progress=False)
    return model.eval(), te


def cmd_table1(args) -> None:
    configs = (("z2cnn", 28, "Z2CNN (28)", {}), ("p4cnn", 28, "P4CNN exact (28)", {}),
               ("p4cnn", 29, "P4CNN approximate (29)", {}))
    rotation_table(args, "table1", configs)


def cmd_table2(args) -> None:
    kw = {"depth": 8 if args.quick else 20}
    configs = (("resnet44", 33, "ResNet (33)", kw), ("p4resnet44", 33, "P4ResNet exact (33)", kw),
               ("p4resnet44", 32, "P4ResNet approximate (32)", kw))
    rotation_table(args, "table2", configs)


def rotation_table(args, name: str, configs) -> None:
    rows, payload = [], {}
    for model_name, size, label, kwargs in configs:
        accs = {"upright": [], "rot90/180/270": [], "0-360°": []}
        for seed in range(args.seeds):
            model, te = fit(model_name, size, seed, args.epochs, **kwargs)
            curve = accuracy_vs_rotation(model, te, ANGLES)
            accs["upright"].append(curve[0.0])
            accs["rot90/180/270"].append(sum(curve[a] for a in (90.0, 180.0, 270.0)) / 3)
            accs["0-360°"].append(sum(curve.values()) / len(curve))
            payload.setdefault(label, []).append(curve)
        cells = []
        for v in accs.values():
            m, sd = mean_std(v)
            cells.append(f"{m:.3f} ± {sd:.3f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(["| model | upright | rot 90/180/270 | mean over 0-360° |",
                       "|---|---|---|---|", *rows])
    curves = {k: {a: sum(c[a] for c in v) / len(v) for a in v[0]} for k, v in payload.items()}
    plot_accuracy_vs_rotation(curves, args.out / f"{name}.png",
                              "trained upright, CircleCrop, mean over seeds")
    write_atomic(args.out / f"{name}.json", json.dumps(payload, indent=1))
    write_atomic(args.out / f"{name}.md", table + "\n")
    print(table)


def cmd_errors(args) -> None:
    te = get_dataset("digits", split="test", size=29)
    cb = EquivarianceErrorCallback(te, "rot90", max_images=128, path=args.out / "errors.json")
    fit("p4cnn", 29, 0, args.epochs, callbacks=[cb])
    parts = ["Early", "Middle", "Late", "Pool", "Final"]
    rows = ["| epoch | " + " | ".join(f"{p} MSE" for p in parts) + " |", "|---" * 6 + "|"]
    for h in cb.history:
        rows.append(f"| {h['epoch']} | " + " | ".join(
            f"{h['parts'][p]['mse']:.2e}" if h["parts"].get(p, {}).get("mse") is not None
            else "-" for p in parts) + " |")
    table = "\n".join(rows)
    write_atomic(args.out / "errors.md", table + "\n")
    print(table)


def cmd_biased(args) -> None:
    curves, rows = {}, []
    for sigma in (20, 40):
        for model_name, size in (("z2cnn", 28), ("p4cnn", 28)):
            model, te = fit(model_name, size, 0, args.epochs,
                            augment=RandomRotation(45.0, sigma))
            curve = accuracy_vs_rotation(model, te, ANGLES)
            curves[f"{model_name} sigma {sigma}"] = curve
            seen = [curve[a] for a in ANGLES if abs(a - 45) <= sigma]
            unseen = [curve[a] for a in ANGLES if abs(a - 45) > 2 * sigma and
                      abs(a - 405) > 2 * sigma]
            rows.append(f"| {model_name} | {sigma} | {sum(seen) / len(seen):.3f} | "
                        f"{sum(unseen) / len(unseen):.3f} |")
    table = "\n".join(["| model | sigma | accuracy within 45±sigma | beyond 45±2 sigma |",
                       "|---|---|---|---|", *rows])
    plot_accuracy_vs_rotation(curves, args.out / "biased.png",
                              "trained on rotations ~ N(45°, sigma), CircleCrop")
    write_atomic(args.out / "biased.json", json.dumps(curves, indent=1))
    write_atomic(args.out / "biased.md", table + "\n")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["table1", "table2", "errors", "biased"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.epochs = 5 if args.quick else 15
    args.seeds = 2 if args.quick else 3
    args.out = args.out or Path("runs/gcnn-quick" if args.quick else "runs/gcnn")
    torch.set_num_threads(2)
    globals()[f"cmd_{args.study}"](args)


if __name__ == "__main__":
    main()
