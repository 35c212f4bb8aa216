"""Baselines and uncertainty of the measurement: the random-init copy, the
channel-redundancy baseline for Eq. 7, Eq. 7's matching channels and the bootstrap
intervals over images."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from equivision.measure import MeasureError, PairStats, Report, measure
from equivision.measure.baselines import random_init_copy
from tests.others_models import TinyResNet


def corrcoef(x: np.ndarray) -> np.ndarray:
    return np.corrcoef(x.T)


def rows(x: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) -> (B h w, C) float64 rows."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double().numpy()


# ---- PairStats: redundancy, matches, intervals ------------------------------------
def test_redundancy_and_matches_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 4, 4, generator=g)
    x[:, 3] = 0.8 * x[:, 0] + 0.2 * x[:, 3]  # channel 3 mostly repeats channel 0
    st = PairStats(5)
    for i in range(0, 12, 5):
        st.update(x[i : i + 5], x[i : i + 5])
    r = st.redundancy()
    corr = corrcoef(rows(x))
    np.fill_diagonal(corr, -np.inf)
    assert r["redundancy"] == pytest.approx(corr.max(1).mean(), abs=1e-6)
    assert r["per_channel"]["redundant_with"] == corr.argmax(1).tolist()
    assert r["per_channel"]["redundant_with"][0] == 3
    # Eq. 7's matching channel: the argmax over the channels of g·f(X)
    y = torch.roll(x, 2, dims=1) + 0.3 * torch.randn(12, 5, 4, 4, generator=g)
    pair = PairStats(5)
    pair.update(y, x)
    cross = np.corrcoef(np.concatenate([rows(y), rows(x)], 1).T)[:5, 5:]
    m = pair.metrics()
    assert m["per_channel"]["match"] == cross.argmax(1).tolist()
    assert m["per_channel"]["match"] == [3, 4, 0, 1, 2]


def test_redundancy_skips_constant_channels_and_needs_two_live_ones():
    x = torch.randn(20, 3)
    x[:, 1] = 4.0
    st = PairStats(3)
    st.update(x, x)
    r = st.redundancy()
    assert r["per_channel"]["redundancy"][1] is None
    assert r["per_channel"]["redundant_with"][0] == 2  # never the constant channel
    one = PairStats(1)
    one.update(x[:, :1], x[:, :1])
    assert one.redundancy()["redundancy"] is None


def test_bootstrap_interval_covers_the_true_correlation():
    rho, hits, widths = 0.6, 0, []
    for e in range(40):
        g = torch.Generator().manual_seed(100 + e)
        a = torch.randn(400, 3, generator=g)
        b = rho * a + (1 - rho**2) ** 0.5 * torch.randn(400, 3, generator=g)
        st = PairStats(3, groups=20)
        st.update(a, b)
        lo, hi = st.bootstrap()["invariance"]
        hits += lo <= rho <= hi
        widths.append(hi - lo)
    assert hits >= 34  # nominal 95%: 38 of 40
    # the sd of a correlation is (1 - rho^2) / sqrt(n); a mean of 3 channels
    expected = 2 * 1.96 * (1 - rho**2) / np.sqrt(400) / np.sqrt(3)
    assert np.mean(widths) == pytest.approx(expected, rel=0.3)


def test_interval_memory_is_flat_in_the_number_of_images_and_merges_add_up():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 4, 3, 3, generator=g)
    b = a + torch.randn(300, 4, 3, 3, generator=g)
    small, large = PairStats(4, groups=8), PairStats(4, groups=8)
    small.update(a[:10], b[:10])
    for i in range(0, 300, 50):
        large.update(a[i : i + 50], b[i : i + 50])
    assert small.flat().numel() == large.flat().numel()
    assert float(large._g_head[:, 1].sum()) == 300
    # two "processes" with the same groups add up to the one-process sums
    ids = torch.arange(300) % 8
    one, p, q = PairStats(4, groups=8), PairStats(4, groups=8), PairStats(4, groups=8)
    one.update(a, b, groups=ids)
    p.update(a[:120], b[:120], groups=ids[:120])
    q.update(a[120:], b[120:], groups=ids[120:])
    p.merge(q)
    # float32 sums on differently shifted data: equal to float32 accuracy
    torch.testing.assert_close(p.flat(), one.flat(), rtol=1e-5, atol=1e-4)
    for k, (lo, hi) in one.bootstrap().items():
        assert p.bootstrap()[k] == pytest.approx([lo, hi], rel=1e-4, abs=1e-6), k
    lo, hi = one.bootstrap()["equivariance"]
    assert lo <= one.metrics()["equivariance"] <= hi


def test_bootstrap_needs_groups_and_bad_groups_are_refused():
    st = PairStats(2)
    st.update(torch.randn(8, 2), torch.randn(8, 2))
    assert st.bootstrap() == {}
    with pytest.raises(ValueError, match="at least 2"):
        PairStats(2, groups=1)
    grouped = PairStats(2, groups=4)
    with pytest.raises(ValueError, match=r"groups must be 8 integers in \[0, 4\)"):
        grouped.update(torch.randn(8, 2), torch.randn(8, 2), groups=torch.full((8,), 4))
    with pytest.raises(ValueError, match="kind"):
        grouped.bootstrap("other")


# ---- the random-init copy ---------------------------------------------------------
class WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        self.scale = nn.Parameter(torch.full((3,), 2.0))  # no reset method anywhere

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale[:, None, None]


def test_random_init_copy_resets_every_module_seeded_and_leaves_the_model_alone():
    model = WithBareParameter()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(5.0)
    model.bn.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    clone, kept = random_init_copy(model, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert kept == ["(model)"]
    assert torch.equal(clone.scale, model.scale)  # kept as trained, and said so
    assert float(clone.conv.weight.detach().abs().max()) < 1.0  # kaiming-uniform again
    assert float(clone.attn.in_proj_weight.detach().abs().max()) < 2.0  # _reset_parameters
    assert torch.equal(clone.bn.running_mean, torch.zeros(3))
    assert torch.equal(clone.bn.weight, torch.ones(3))
    again, _ = random_init_copy(model, seed=7)
    other, _ = random_init_copy(model, seed=8)
    assert torch.equal(again.conv.weight, clone.conv.weight)
    assert not torch.equal(other.conv.weight, clone.conv.weight)


def test_random_init_copy_runs_the_models_own_init():
    from equivision.models import create_model

    class OwnInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.pos = nn.Parameter(torch.zeros(4))
            self._init_weights()

        def _init_weights(self):
            nn.init.normal_(self.pos, std=0.02)

    m = OwnInit()
    with torch.no_grad():
        m.pos.fill_(9.0)
    clone, kept = random_init_copy(m)
    assert kept == [] and float(clone.pos.detach().abs().max()) < 0.2
    # a built-in model comes back exactly as a fresh model of the same seed
    torch.manual_seed(0)
    model = create_model("cnn7", in_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0).add_(1.0)
    clone, kept = random_init_copy(model, seed=0)
    torch.manual_seed(0)
    fresh = create_model("cnn7", in_channels=1)
    assert kept == []
    for (k, v), w in zip(clone.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k


def test_undeepcopyable_model_gets_a_clear_error():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.gen = (i for i in range(3))  # generators cannot be deep-copied

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(MeasureError, match="deep copy of Holder.*--no-random-init"):
        random_init_copy(Holder())


# ---- measure() with baselines ------------------------------------------------------
def trained_like(seed: int = 0) -> nn.Module:
    """A TinyResNet whose weights are far from any initialisation."""
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p).sign())
    return model.eval()


#: measurement points of TinyResNet: stem, both stages, pooling, logits
POINTS = ["relu", "layer1", "layer2", "avgpool", "fc"]


def images(n: int, size: int = 12, seed: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n))


def test_random_init_is_off_by_default_and_equals_measuring_the_copy():
    model, data = trained_like(), images(16)
    kw = dict(layers=POINTS, batch_size=8, progress=False)
    plain = measure(model, data, "rot90:1,hflip", **kw)
    assert not plain.has_random_init and "random_init" not in plain.meta
    rep = measure(model, data, "rot90:1,hflip", random_init=True, init_seed=5, **kw)
    clone, kept = random_init_copy(model, 5)
    direct = measure(clone, data, "rot90:1,hflip", **kw)
    assert rep.meta["random_init"] == {"seed": 5, "kept_trained": kept}
    for r in rep.results:
        assert r.metrics == pytest.approx(plain.get(r.transform, r.layer).metrics)
        d = direct.get(r.transform, r.layer)
        assert r.exact == d.exact
        if r.exact:
            assert r.random_init == pytest.approx(d.metrics, rel=1e-9, abs=1e-12)
            for k, b in d.ci.items():  # same image groups in both runs
                assert r.random_init_ci[k] == (None if b is None else pytest.approx(b)), k
    assert any(r.random_init["equivariance"] != pytest.approx(r.metrics["equivariance"])
               for r in rep.results if r.exact)


def test_measured_redundancy_equals_brute_force_on_the_captured_maps():
    model, data = trained_like(1), images(10)
    rep = measure(model, data, "rot90:1", layers=["conv1", "fc"], batch_size=4,
                  progress=False)
    x = data.tensors[0]
    with torch.no_grad():
        maps = model.conv1(x)
        logits = model(x)
    for layer, rows_ in (("conv1", rows(maps)), ("fc", logits.double().numpy())):
        corr = corrcoef(rows_)
        np.fill_diagonal(corr, -np.inf)
        got = rep.get("rot90", layer).metrics["redundancy"]
        assert got == pytest.approx(corr.max(1).mean(), abs=1e-5), layer


def test_every_number_has_an_interval_that_holds_it():
    rep = measure(trained_like(2), images(40), "rot90:1,shift:2", layers=POINTS,
                  batch_size=20, progress=False)
    assert rep.meta["ci"]["groups"] == 20 and rep.meta["ci"]["level"] == 0.95
    for r in rep.results:
        if not r.exact:
            continue
        assert set(r.ci) == set(r.metrics)
        assert len(r.per_channel["match"]) == r.n_channels
        for k, v in r.metrics.items():
            if v is None or r.ci[k] is None:
                continue
            lo, hi = r.ci[k]
            assert lo - 1e-9 <= hi
            # a percentile interval of a biased statistic may miss its point estimate,
            # but never by much at 40 images
            assert lo - 0.05 * (1 + abs(v)) <= v <= hi + 0.05 * (1 + abs(v)), (r.layer, k)
    off = measure(trained_like(2), images(8), "rot90:1", layers=POINTS, progress=False,
                  ci_groups=0)
    assert off.meta["ci"] is None
    assert all(v is None for r in off.results for v in r.ci.values())
    with pytest.raises(MeasureError, match="ci_groups"):
        measure(trained_like(2), images(4), "rot90:1", progress=False, ci_groups=1)


def test_report_files_carry_baselines_intervals_and_matches(tmp_path):
    rep = measure(trained_like(3), images(16), "rot90:1", layers=POINTS, batch_size=8,
                  progress=False, random_init=True)
    files = rep.save(tmp_path / "out")
    d = json.loads(files["json"].read_text())
    res = next(r for r in d["results"] if r["exact"])
    assert {"redundancy", "equivariance"} <= set(res["random_init"])
    assert len(res["ci"]["equivariance"]) == 2
    assert "match" in res["per_channel"]
    back = Report.load_json(files["json"])
    assert back.results[0].random_init == rep.results[0].random_init
    header = files["csv"].read_text().splitlines()[0].split(",")
    for col in ("redundancy", "equivariance_ci_low", "random_init_equivariance",
                "random_init_redundancy_ci_high"):
        assert col in header
    row = files["csv"].read_text().splitlines()[1].split(",")
    assert row[header.index("random_init_equivariance")] != ""
    text = rep.table()
    assert "rand:equiv" in text and "±" in text and "redundancy" in text
    assert rep.part_summary(("equivariance",), source="random_init")
    with pytest.raises(ValueError, match="source"):
        rep.values("equivariance", "rot90", source="other")
    assert files["png"].read_bytes()[:4] == b"\x89PNG"


def test_demo_measurement_section_shows_the_baselines(tmp_path, monkeypatch):
    from torch.utils.data import Subset

    from equivision import demo
    from equivision.data import get_dataset
    from equivision.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn7", in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    test_set = Subset(get_dataset("digits", split="test", size=28), list(range(12)))
    monkeypatch.setattr(demo, "_digits_model",
                        lambda ctx: (model, test_set, {"accuracy": 0.5}, True, 0.0))
    ctx = demo.DemoContext(out=tmp_path, progress=False)
    text = demo.section_measurement(ctx)
    assert ctx.artifacts["digits_model"] == (model, test_set)
    assert "random initialisation" in text and "redundancy" in text
    assert "| rot90 / 180 / 270 | Early |" in text and "| rand |" in text
    assert "Early equivariance is" in text
    assert (tmp_path / "measure" / "report.png").exists()
