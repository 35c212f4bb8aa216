"""Spearman rank correlation and its per-part use on measurement reports."""

import math

import pytest
from support.stats import pearson, rankdata, spearman, spearman_by_part

from equivision.measure.report import LayerResult, Report


def test_rankdata_average_ties():
    assert rankdata([10, 20, 30]) == [1, 2, 3]
    assert rankdata([3, 1, 2]) == [3, 1, 2]
    assert rankdata([1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert rankdata([5, 5, 5]) == [2, 2, 2]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 1000]) == pytest.approx(1.0)  # monotone
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 0, -1, 1, 0): rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    # ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): Pearson of the ranks
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
        pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 12)
        x = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        y = [rng.randint(0, 4) for _ in range(n)]
        ref = stats.spearmanr(x, y).statistic
        got = spearman(x, y)
        assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref, abs=1e-12)


def test_spearman_errors():
    with pytest.raises(ValueError, match="length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, float("nan")], [1, 2])


def report(values, name="m"):
    """A report with one layer per part; ``values[part]`` is its equivariance (None:
    inexact) under the transformation ``shift``; ``rot90`` has the negated values."""
    parts = ["Early", "Middle", "Late", "Pool", "Final"]
    results = []
    for t, sign in (("shift", 1), ("rot90", -1)):
        for i, part in enumerate(parts):
            v = values.get(part)
            results.append(LayerResult(
                transform=t, layer=f"l{i}", index=i, part=part, module="Conv2d", shape=[1],
                stride=[1.0, 1.0], exact=v is not None,
                metrics={} if v is None else {"equivariance": sign * v, "invariance": v}))
    return Report(model=name, transforms=["shift", "rot90"], layers=[f"l{i}" for i in range(5)],
                  results=results, n_images=1)


def test_spearman_by_part():
    reps = [
        report({"Early": 0.1, "Middle": 0.9, "Late": 0.5, "Pool": 0.2, "Final": 0.3}),
        report({"Early": 0.2, "Middle": 0.8, "Late": 0.5, "Pool": None, "Final": 0.1}),
        report({"Early": 0.3, "Middle": 0.7, "Late": 0.5, "Pool": 0.4, "Final": 0.2}),
    ]
    acc = [0.5, 0.6, 0.7]
    rho = spearman_by_part(reps, acc, transforms=["shift"])
    assert list(rho) == ["Early", "Middle", "Late", "Pool", "Final"]
    assert rho["Early"] == pytest.approx(1.0)
    assert rho["Middle"] == pytest.approx(-1.0)
    assert math.isnan(rho["Late"])  # constant
    assert rho["Pool"] == pytest.approx(1.0)  # model 2 left out (inexact)
    assert rho["Final"] == pytest.approx(-0.5)
    # averaged over shift and rot90 (= -shift) every part is 0: constant -> NaN
    both = spearman_by_part(reps, acc)
    assert all(math.isnan(v) for v in both.values())
    assert spearman_by_part(reps, acc, metric="invariance", transforms=["rot90"])["Early"] == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match="accuracies"):
        spearman_by_part(reps, [0.1, 0.2])
    with pytest.raises(ValueError, match="unknown metric"):
        spearman_by_part(reps, acc, metric="accuracy")
    with pytest.raises(ValueError, match="no transformation"):
        spearman_by_part(reps, acc, transforms=["hflip"])
