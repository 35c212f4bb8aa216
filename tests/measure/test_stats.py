"""The fast statistics path: shifted float32 sums, strided inputs, threads, bad batches."""

import numpy as np
import pytest
import torch

from equivision.measure.stats import PairStats, threads_for


def reference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """float64 one-shot metrics of (B, C, h, w) tensors over all positions."""
    c = a.shape[1]
    ra = a.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    rb = b.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    corr = np.corrcoef(np.concatenate([ra, rb], 1).T)[:c, c:]
    fa, fb = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    return {"invariance": np.diag(corr).mean(), "equivariance": corr.max(1).mean(),
            "mse": ((ra - rb) ** 2).mean(), "l1": np.abs(ra - rb).mean(),
            "cosine": cos.mean(), "activation": np.abs(rb.mean(0)).mean()}


@pytest.mark.parametrize("chunk", [1 << 19, 50])
def test_rotated_views_with_drifting_means_match_float64(monkeypatch, chunk):
    monkeypatch.setattr("equivision.measure.stats.CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(3)
    st = PairStats(5)
    parts = []
    for i in range(3):  # the mean drifts away from the first batch's (the shift)
        a = torch.randn(7, 5, 6, 6, generator=g) * 2 + 50 + 20 * i
        b = 0.6 * a + torch.randn(7, 5, 6, 6, generator=g)
        ra, rb = torch.rot90(a, 1, (-2, -1)), torch.rot90(b, 1, (-2, -1))  # strided views
        assert not rb.is_contiguous()
        assert st.update(ra, rb)
        parts.append((ra, rb))
    ref = reference(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    m = st.metrics()
    for k in ("invariance", "equivariance", "cosine"):
        assert m[k] == pytest.approx(ref[k], abs=1e-6), k
    for k in ("mse", "l1", "activation"):
        assert m[k] == pytest.approx(ref[k], rel=1e-6), k


def test_nan_first_batch_is_rejected_and_the_next_one_counts():
    st = PairStats(2)
    bad = torch.rand(3, 2, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    assert not st.update(bad, bad)
    assert st.n == 0
    a = torch.rand(3, 2, 4, 4) + 10
    assert st.update(a, a)
    assert st.metrics()["invariance"] == pytest.approx(1.0)
    inf = a.clone()
    inf[1, 1, 2, 2] = float("inf")
    assert not st.update(a, inf)
    assert st.n == 3 * 16


def test_statistics_run_on_one_thread_and_restore_the_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with threads_for(torch.device("cpu")):
            inside = torch.get_num_threads()
        assert inside == 1 and torch.get_num_threads() == 2
        PairStats(2).update(torch.rand(2, 2, 3, 3), torch.rand(2, 2, 3, 3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("chunk", [1 << 19, 40])
def test_a_map_with_itself_takes_the_short_path_with_the_same_sums(monkeypatch, chunk):
    """``update(a, a)`` (the redundancy baseline) skips b's and a - b's passes; every sum,
    per group too, and the NaN check match the general path on a copy."""
    monkeypatch.setattr("equivision.measure.stats.CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[0] = False
    same, general = PairStats(4, groups=3), PairStats(4, groups=3)
    for i in range(3):
        a = torch.randn(5, 4, 6, 6, generator=g) * 3 + 40 + 10 * i
        ids = torch.tensor([0, 1, 2, 1, 0])
        assert same.update(a, a, mask, ids)
        assert general.update(a, a.clone(), mask, ids)
    torch.testing.assert_close(same.flat(), general.flat(), rtol=1e-9, atol=1e-6)
    assert same.redundancy()["redundancy"] == pytest.approx(
        general.redundancy()["redundancy"], abs=1e-9)
    bad = torch.randn(2, 4, 6, 6)
    bad[1, 2, 3, 3] = float("nan")
    assert not same.update(bad, bad)
    assert not general.update(bad, bad.clone())  # (chunks before the bad one count in both)
    torch.testing.assert_close(same.flat(), general.flat(), rtol=1e-9, atol=1e-6)
