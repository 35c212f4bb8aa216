"""measure/compare.py: the one comparison core, against brute-force references, and the
four callers (measurement, defense, SER probe, group-CNN check) going through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import equivision.gcnn.exactness as exactness
import equivision.robust.views as views
from equivision.data import ImageDataset
from equivision.measure import PairStats, measure
from equivision.measure.compare import (
    AlignmentError,
    Comparator,
    align,
    align_back,
    erode,
    pairwise_cosines,
    per_image_cosine,
    per_image_error,
)
from equivision.robust.defenses import equivariance_score
from equivision.ssl import SSLViT
from equivision.ssl.probe import equivariance_scores
from equivision.transforms import Layout, Resize, Rotation, Translation, hflip, rot90


def brute_force(fgx, fx, g, stride):
    """Per image: error norm and cosine over the positions whose value comes from inside
    the map, with g acting position by position (a shift by (dx, dy) / stride)."""
    b, c, h, w = fx.shape
    dy, dx = int(g.dy // stride), int(g.dx // stride)
    errs, coss = [], []
    for i in range(b):
        pa, pb = [], []
        for y in range(h):
            for x in range(w):
                sy, sx = y - dy, x - dx
                if 0 <= sy < h and 0 <= sx < w:
                    pa.append(fgx[i, :, y, x])
                    pb.append(fx[i, :, sy, sx])
        a, bb = torch.stack(pa), torch.stack(pb)
        errs.append(torch.linalg.vector_norm(a - bb))
        coss.append((a * bb).sum() / (a.norm() * bb.norm()))
    return torch.stack(errs), torch.stack(coss)


def test_core_matches_brute_force_on_a_shift():
    gen = torch.Generator().manual_seed(0)
    fx, fgx = torch.rand(3, 4, 6, 5, generator=gen), torch.rand(3, 4, 6, 5, generator=gen)
    g = Translation(4, -2)  # (2, -1) positions at stride 2
    lay = Layout("map", (2.0, 2.0))
    pair = Comparator().compare(fgx, fx, g, lay)
    expected_mask = torch.zeros(6, 5, dtype=torch.bool)
    expected_mask[:5, 2:] = True  # rows 0..4 (dy=-1), columns 2..4 (dx=2)
    assert torch.equal(pair.mask, expected_mask)
    err, cos = brute_force(fgx, fx, g, 2)
    torch.testing.assert_close(per_image_error(pair.a, pair.b, pair.mask), err)
    torch.testing.assert_close(Comparator().error(fgx, fx, g, lay), err)
    torch.testing.assert_close(Comparator().cosine(fgx, fx, g, lay), cos)
    # the statistics see the same per-image cosine
    st = PairStats(4)
    assert Comparator().accumulate(st, fgx, fx, g, lay)
    assert st.cos_sum / st.images == pytest.approx(float(cos.mean()), abs=1e-6)
    assert st.n == 3 * int(expected_mask.sum())


def test_margin_erodes_the_mask_and_masks_are_cached():
    comp = Comparator(margin=2)
    lay = Layout("map", (1.0, 1.0))
    m = comp.mask(Translation(1, 0), lay, (6, 6))
    assert torch.equal(m, erode(Translation(1, 0).valid_mask((6, 6)), 2, (1.0, 1.0)))
    assert int(m.sum()) == (6 - 4) * (6 - 4 - 1)
    assert comp.mask(Translation(1, 0), lay, (6, 6)) is m
    assert bool(comp.mask(rot90(), lay, (6, 6)).all())  # no invalid position: no erosion


def test_align_actions_per_layout_and_errors():
    fx = torch.rand(2, 3, 4, 5, 5)
    a, b = align(rot90().apply_group_map(fx, "p4"), fx, rot90(), Layout("group", group="p4"))
    torch.testing.assert_close(a, b)
    v = torch.rand(2, 7)
    assert align(v, v, hflip(), Layout("vector"))[1] is v
    with pytest.raises(AlignmentError, match="shape"):
        align(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 5, 5), hflip(), Layout())
    back = align_back(Resize(2.0), torch.rand(1, 2, 13, 11), Layout("map", size=(6, 5)))
    assert back.shape == (1, 2, 6, 5)
    with pytest.raises(AlignmentError, match="reference map"):
        align_back(Rotation(10.0), torch.rand(1, 2, 6, 6), Layout("map", size=(5, 5)))
    assert align_back(None, v, Layout()) is v


def test_pairwise_cosines_reference():
    gen = torch.Generator().manual_seed(1)
    views_ = [torch.rand(3, 2, 4, 4, generator=gen) for _ in range(3)]
    ident = pairwise_cosines(views_, "identity")
    assert ident.shape == (3, 2)
    torch.testing.assert_close(ident[:, 1], per_image_cosine(views_[2], views_[0]))
    pairs = pairwise_cosines(views_, "pairs")
    torch.testing.assert_close(pairs[:, 2], per_image_cosine(views_[1], views_[2]))
    with pytest.raises(ValueError, match="pairing"):
        pairwise_cosines(views_, "all")


def test_pairwise_cosines_gradients_match_normalized_views_and_stay_finite_at_zero():
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(3, 2, 4, 4, generator=g) + 2 for _ in range(4)]
    base[2] = torch.zeros(3, 2, 4, 4)  # a view with zero features
    for pairing in ("identity", "pairs"):
        ours = [t.clone().requires_grad_(True) for t in base]
        ref = [t.clone().requires_grad_(True) for t in base]
        unit = [r.flatten(1) / r.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-8)
                for r in ref]
        pairs = [(k, 0) for k in range(1, 4)] if pairing == "identity" else \
            [(i, j) for i in range(4) for j in range(i + 1, 4)]
        expected = torch.stack([(unit[i] * unit[j]).sum(1) for i, j in pairs], 1)
        got = pairwise_cosines(ours, pairing)
        torch.testing.assert_close(got, expected)
        w = torch.arange(1.0, len(pairs) + 1)
        grads = torch.autograd.grad((got * w).sum(), ours)
        want = torch.autograd.grad((expected * w).sum(), ref)
        for a, b in zip(grads, want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _spy(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()


def test_measurement_goes_through_the_core_and_matches_a_reference(monkeypatch):
    calls = _spy(monkeypatch, Comparator, "compare")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=gen)
    net = _small_cnn()
    rep = measure(net, TensorDataset(x, torch.zeros(5)), [rot90()], ["1"], progress=False)
    assert calls
    with torch.no_grad():
        ref = per_image_cosine(net[:2](rot90()(x)), rot90().apply_map(net[:2](x))).mean()
    assert rep.results[0].metrics["cosine"] == pytest.approx(float(ref), abs=1e-6)


def test_defense_score_goes_through_the_core(monkeypatch):
    calls = _spy(monkeypatch, views, "align_back")
    net = _small_cnn()
    x = torch.rand(2, 1, 8, 8)
    s = equivariance_score(net, x, "hflip", feature_layer="1")
    assert calls == ["align_back"]
    with torch.no_grad():
        f = net[:2]
        ref = per_image_cosine(hflip().apply_map(f(hflip()(x))), f(x))
    torch.testing.assert_close(s, ref)


def test_probe_goes_through_the_core(monkeypatch):
    calls = _spy(monkeypatch, Comparator, "accumulate")
    torch.manual_seed(0)
    enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    x = torch.rand(4, 3, 16, 16)
    out = equivariance_scores(enc, ImageDataset(x, torch.zeros(4).long(), ["a"]), "rot90",
                              max_images=4)
    assert len(calls) == (2 + 1) * len(out["scores"])  # two blocks and the [CLS] each
    with torch.no_grad():
        maps, moved = (enc(v, all_tokens=True).token_maps for v in (x, rot90()(x)))
    for block in range(2):
        ref = per_image_cosine(moved[block], rot90().apply_map(maps[block])).mean()
        assert out["scores"]["rot90"][block] == pytest.approx(float(ref), abs=1e-5)


def test_group_cnn_check_goes_through_the_core(monkeypatch):
    calls = _spy(monkeypatch, exactness, "align")
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False))
    err = exactness.empirical_equivariance_error(net, 7, group="p4", in_channels=1)
    assert len(calls) == 3 and err > 1e-3


def test_numbers_unchanged_by_the_core():
    """Figures of measure() and equivariance_score() from before the comparison core
    (commit 7ed6089) on a fixed seed: maps, pooling, stride 2, margin, inexact pairs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval()
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    rep = measure(net, TensorDataset(x, torch.zeros(6)),
                  [rot90(), Translation(2, 0), Rotation(20.0)], ["0", "2", "4", "5"],
                  progress=False, margin=1, batch_size=4)
    before = [  # (cosine, mse) per (transformation, layer); None: inexact
        (0.8289861, 0.04443268), (0.9377506, 0.01163008), (0.6880624, 0.0026714),
        (0.9985707, 1.759e-05), (1.0, 0.0), (1.0, 0.0), (0.995482, 4.239e-05), "vector",
        (0.9850991, 0.00415575), (0.984831, 0.00454286), (0.9593141, 0.00035374),
        (0.9979195, 1.361e-05)]
    for r, ref in zip(rep.results, before, strict=True):
        if ref == "vector":  # a (B, C, 1, 1) pooled output: inexact before issue 11, a vector now
            assert r.exact and r.shape == [4]
            continue
        assert r.metrics["cosine"] == pytest.approx(ref[0], abs=2e-7)
        assert r.metrics["mse"] == pytest.approx(ref[1], abs=2e-8)
    score = equivariance_score(net, x[:3], [hflip(), Rotation(15.0), Resize(0.6), Resize(2.0)],
                               "3")
    # issue 14 bug 1: the rotation view's cosine now leaves out its zero-filled corners
    # (before the fix: 0.8392909, 0.8625010, 0.8677694)
    torch.testing.assert_close(score, torch.tensor([0.8408535, 0.8657944, 0.8703775]),
                               atol=1e-6, rtol=0)


def test_pair_stats_buffer_rows_follow_merges():
    p, q = PairStats(2), PairStats(2)
    a = torch.rand(3, 2, 4, 4)
    p.update(a, a + 1)
    q.update(a, a * 2)
    sa = p.sa
    p.merge(q)
    assert p.sa is sa  # still a row of the buffer that the next batch adds to
    torch.testing.assert_close(p.sa, a.sum(dim=(0, 2, 3)).double() * 2)
    p.update(a, a)
    torch.testing.assert_close(p.sa, a.sum(dim=(0, 2, 3)).double() * 3)
