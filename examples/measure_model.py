"""Train a small CNN briefly, then measure how invariant and equivariant each layer is.

    python examples/measure_model.py --out runs/example-measure [--tiny]

Writes OUT/train/last.pt and OUT/report.json, report.csv, report.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from equivision.data import get_dataset
from equivision.measure import measure
from equivision.models import create_model
from equivision.training import TrainConfig, train
from equivision.utils import seed_everything


def main(argv: list[str] | None = None) -> Path:
    """Run the example; returns the report folder."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example-measure")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (for the smoke test)")
    args = p.parse_args(argv)
    size, epochs, images = (12, 1, 16) if args.tiny else (28, 4, 256)
    train_set = get_dataset("digits", split="train", size=size)
    test_set = get_dataset("digits", split="test", size=size)
    seed_everything(0)  # before the model is built: the same initial weights every run
    model = create_model("cnn-small", num_classes=train_set.num_classes, in_channels=1)
    train(model, train_set, test_set, TrainConfig(epochs=epochs, lr=0.05),
          out_dir=Path(args.out) / "train", resume=(Path(args.out) / "train/last.pt").exists(),
          progress=False)
    report = measure(model, test_set, "rot90,hflip,shift:1-2", max_images=images,
                     progress=False)
    print(report.table(["invariance", "equivariance"]))
    report.save(args.out)  # the JSON/CSV/PNG set, swapped in all together
    return Path(args.out)


if __name__ == "__main__":
    main()
