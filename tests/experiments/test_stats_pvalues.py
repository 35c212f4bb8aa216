"""p-values of the correlation statistics (support.stats on scipy.stats)."""

import math

import pytest
from scipy import stats
from support.stats import Correlation, pearson_test, spearman_test


def test_spearman_test_gives_scipys_p_value():
    x = [0.1, 0.4, 0.2, 0.9, 0.7, 0.3, 0.8]
    y = [1, 3, 2, 7, 5, 4, 6]
    got = spearman_test(x, y)
    ref = stats.spearmanr(x, y)
    assert isinstance(got, Correlation) and got.n == 7
    assert got.rho == pytest.approx(ref.statistic) and got.p_value == pytest.approx(ref.pvalue)
    assert got.p_value < 0.05
    noise = spearman_test([1, 2, 3, 4, 5, 6], [3, 1, 4, 1, 5, 2])
    assert noise.p_value > 0.3


def test_pearson_test_and_undefined_cases():
    got = pearson_test([1, 2, 3, 4], [2, 4, 5, 9])
    assert got.p_value == pytest.approx(stats.pearsonr([1, 2, 3, 4], [2, 4, 5, 9]).pvalue)
    const = spearman_test([1, 1, 1], [1, 2, 3])
    assert math.isnan(const.rho) and math.isnan(const.p_value) and const.n == 3
    with pytest.raises(ValueError, match="NaN"):
        spearman_test([1, float("nan")], [1, 2])
