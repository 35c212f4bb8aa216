"""The batched masked cosines of the defense (views.masked_pairwise_cosines) equal the
per-pair reference (measure.compare.per_image_cosine over each pair's valid positions)."""

import itertools

import pytest
import torch

from equivision.measure.compare import per_image_cosine
from equivision.robust.views import masked_pairwise_cosines


def _loop(aligned, masks, pairing):
    n = len(aligned)
    pairs = [(0, k) for k in range(1, n)] if pairing == "identity" \
        else list(itertools.combinations(range(n), 2))
    cols = []
    for i, j in pairs:
        mi, mj = masks[i], masks[j]
        mask = mi if mj is None else mj if mi is None else mi & mj
        cols.append(per_image_cosine(aligned[i], aligned[j], mask))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("pairing", ["identity", "pairs"])
def test_batched_masked_cosines_equal_the_loop(pairing):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(4)]
    masks = [None, torch.rand(6, 5, generator=g) > 0.3, None,
             torch.rand(6, 5, generator=g) > 0.5]
    got, ref = masked_pairwise_cosines(views, masks, pairing), _loop(views, masks, pairing)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), views), torch.autograd.grad(ref.sum(), views)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_unmasked_views_take_the_plain_path():
    v = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    out = masked_pairwise_cosines(v, [None, None, None], "pairs")
    assert out.shape == (2, 3) and bool((out.abs() <= 1 + 1e-6).all())
