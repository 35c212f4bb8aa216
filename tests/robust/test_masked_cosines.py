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


def _views(seed, zero=None):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    if zero is not None:
        views[zero] = torch.zeros_like(views[zero])  # a clamped norm
    return [v.requires_grad_(True) for v in views], g


@pytest.mark.parametrize("case", ["masked reference", "zero view", "zero reference"])
def test_identity_cosines_equal_the_loop_in_every_case(case):
    views, g = _views(1, zero={"zero view": 2, "zero reference": 0}.get(case))
    masks = [torch.rand(4, 5, generator=g) > 0.2 if case == "masked reference" else None,
             None, torch.rand(4, 5, generator=g) > 0.4, None]
    got, ref = masked_pairwise_cosines(views, masks), _loop(views, masks, "identity")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), views),
                    torch.autograd.grad((ref * w).sum(), views)):
        # (a zero reference's gradient is ~1e8: its denominator is clamped at 1e-8)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_identity_cosines_second_derivatives():
    """The purifier's unrolled l2 update differentiates the gradient again."""
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
             for _ in range(3)]
    masks = [None, torch.rand(3, 3, generator=g) > 0.3, None]
    torch.autograd.gradgradcheck(lambda *v: masked_pairwise_cosines(list(v), masks), views)
