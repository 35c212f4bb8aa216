"""Is a p4 group CNN exactly rotation-equivariant at an input size? Ask the analyzer,
then check its verdict numerically.

    python examples/group_cnn_exactness.py [--size 29] [--tiny]
"""

from __future__ import annotations

import argparse

from equivision.gcnn import analyze_exactness, empirical_equivariance_error, nearest_exact_size
from equivision.models import create_model


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the example; returns the verdicts and errors at the two sizes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=29, help="input size to analyze")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (for the smoke test)")
    args = p.parse_args(argv)
    model = create_model("p4cnn", width=2 if args.tiny else 10).eval()
    report = analyze_exactness(model, (args.size, args.size), group="p4")
    print(report.table())
    below, above = nearest_exact_size(model, args.size, group="p4")
    exact = above if above is not None else below
    print(f"verdict at {args.size}: {report.verdict}; nearest exact sizes {below}, {above}")
    out: dict[str, object] = {"verdict": report.verdict, "exact_size": exact}
    for n in (args.size, exact):
        out[f"error@{n}"] = empirical_equivariance_error(model, n, group="p4")
        print(f"measured equivariance error at {n} px: {out[f'error@{n}']:.2e}")
    return out


if __name__ == "__main__":
    main()
