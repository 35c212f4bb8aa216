"""Section 4.1 of the learned-equivariance paper: the measure on two hand-crafted CNNs.

One CNN has isotropic Gaussian filters (every channel rotation invariant); the other
has oriented filters whose channels are rotated copies of each other (equivariant,
not invariant). Writes JSON, a Markdown table and the per-layer plot.

Run: ``.venv/bin/python experiments/validation_toy_cnns.py --out runs/validation``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from equivision.data import get_dataset
from equivision.measure import measure, write_atomic
from equivision.measure.validation import gaussian_cnn, rotated_filter_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/validation")
    p.add_argument("--images", type=int, default=500)
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    data = {
        "digits": get_dataset("digits", split="test", size=28),
        "noise": TensorDataset(torch.rand(args.images, 1, 28, 28)),
    }
    models = {"gaussian (invariant)": gaussian_cnn, "rotated filters (equivariant)":
              rotated_filter_cnn}
    rows, results = [], {}
    for dname, ds in data.items():
        for mname, build in models.items():
            rep = measure(build(), ds, "rot90", max_images=args.images, progress=False,
                          model_name=mname)
            key = f"{mname} / {dname}"
            results[key] = rep.to_dict()
            for layer in rep.layers:
                inv = [rep.get(t, layer).metrics["invariance"] for t in rep.transforms]
                eq = [rep.get(t, layer).metrics["equivariance"] for t in rep.transforms]
                rows.append(f"| {mname} | {dname} | {layer} | {min(inv):.5f} | {min(eq):.5f} |")
            if dname == "digits":
                rep.plot(out / f"{build.__name__}.png")
    table = "\n".join(["| model | data | layer | min invariance | min equivariance |",
                       "|---|---|---|---|---|", *rows])
    write_atomic(out / "validation.json", json.dumps(results, indent=1))
    write_atomic(out / "validation.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
