"""Attack a small classifier with PGD, then defend it with the equivariance defense
(test-time purification that restores the equivariance of a feature layer).

    python examples/attack_and_defend.py --out runs/example-defend [--tiny]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from equivision.data import get_dataset
from equivision.io import write_atomic
from equivision.models import create_model
from equivision.robust.evaluate import RobustnessConfig, evaluate_robustness
from equivision.training import TrainConfig, train
from equivision.utils import seed_everything


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns clean / attacked / defended accuracies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example-defend")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (for the smoke test)")
    args = p.parse_args(argv)
    size, epochs, images, steps = (12, 1, 8, 1) if args.tiny else (16, 6, 128, 10)
    train_set = get_dataset("digits", split="train", size=size)
    test_set = get_dataset("digits", split="test", size=size)
    seed_everything(0)
    model = create_model("cnn-small", num_classes=10, in_channels=1)
    train(model, train_set, None, TrainConfig(epochs=epochs, optimizer="adam", lr=0.03,
                                              weight_decay=0), progress=False)
    layer = "features.relu3"  # a spatial layer: rotations act on it
    config = RobustnessConfig(eps=0.05, steps=steps, max_images=images, batch_size=8,
                              defense_kwargs={"eps_v": 0.0625, "steps": 2 if args.tiny else 5,
                                              "feature_layer": layer})
    # one pass: the undefended and the defended accuracy, clean and under PGD
    result = evaluate_robustness(model, test_set, ["pgd"], "equivariance", config)
    print(result.table())
    write_atomic(Path(args.out) / "defend.json", json.dumps(result.to_dict(), indent=1,
                                                              default=str))
    clean, pgd = result.row("clean"), result.row("pgd")
    return {"clean": clean.undefended["accuracy"], "pgd": pgd.undefended["accuracy"],
            "pgd_defended": pgd.defended["accuracy"]}


if __name__ == "__main__":
    main()
