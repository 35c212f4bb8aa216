"""evaluate_robustness's ensemble row, automatic checks, per-image worst case, intervals
and per-image files (robust/evaluate.py, per_image.py, intervals.py,
evaluation_checks.py)."""

import csv
import json
import math

import pytest
import torch
from conftest import segmenter
from torch import nn
from torch.utils.data import TensorDataset

from equivision.robust import RobustnessConfig, evaluate_robustness
from equivision.robust.checks import checks_summary
from equivision.robust.evaluation_checks import eps_values
from equivision.robust.intervals import bootstrap_interval, wilson_interval
from equivision.robust.per_image import WORST_CASE, PerImageResults

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blob_data(trained):
    """The trained blob MLP and its first 16 test images as a dataset."""
    model, x, y = trained
    return model, TensorDataset(x[:16], y[:16])


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    torch.manual_seed(0)
    wide = bootstrap_interval(20, lambda w: w @ torch.rand(20, dtype=torch.float64) / 20)
    scores = torch.rand(2000, dtype=torch.float64)
    lo, hi = bootstrap_interval(2000, lambda w: w @ scores / 2000)
    assert lo < float(scores.mean()) < hi
    assert hi - lo < wide[1] - wide[0]


# ----------------------------------------------------------------------------- per image


def test_worst_case_is_per_image_not_the_minimum_of_row_totals():
    # attack a fools images 0 and 1, attack b fools image 2: each row keeps 2 of 4
    # images, but only image 3 survives both
    pi = PerImageResults(["clean", "a", "b"], 4, 3, False, torch.device("cpu"))
    y = torch.zeros(4, dtype=torch.long)
    for row, score in (("clean", [1, 1, 1, 1]), ("a", [0, 0, 1, 1]), ("b", [1, 1, 0, 1])):
        s = torch.tensor(score, dtype=torch.float64)
        pi.record(row, "undefended", 0, s, (1 - s).long(), y)
    assert pi.metrics("a", "undefended")["accuracy"] == 0.5
    assert pi.metrics(WORST_CASE, "undefended")["accuracy"] == 0.25
    assert pi.worst_rows("undefended").tolist() == [1, 1, 2, 1]
    worst = [r for r in pi.records() if r["row"] == WORST_CASE]
    assert [r["undefended"] for r in worst] == [0, 0, 0, 1]
    assert [r["undefended_from"] for r in worst] == ["a", "a", "b", "a"]
    lo, hi = pi.intervals(WORST_CASE, "undefended")["accuracy"]
    assert 0 <= lo < 0.25 < hi <= 1


def test_segmentation_worst_case_uses_each_images_worst_confusion():
    pi = PerImageResults(["clean", "a", "b"], 2, 2, True, torch.device("cpu"))
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    right, wrong = torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    one = torch.ones(2, dtype=torch.float64)
    pi.record("clean", "undefended", 0, one, torch.stack([right, right]), labels)
    pi.record("a", "undefended", 0, torch.tensor([0.0, 1.0]), torch.stack([wrong, right]),
              labels)
    pi.record("b", "undefended", 0, torch.tensor([1.0, 0.0]), torch.stack([right, wrong]),
              labels)
    assert pi.metrics("a", "undefended")["pixel_accuracy"] == 0.5
    worst = pi.metrics(WORST_CASE, "undefended")
    assert worst["pixel_accuracy"] == 0.0 and worst["mean_image_miou"] == 0.0
    ci = pi.intervals("a", "undefended")
    assert set(ci) == {"miou", "pixel_accuracy", "mean_image_miou"}


def test_result_has_worst_case_intervals_and_per_image_files(blob_data, tmp_path):
    model, data = blob_data
    res = evaluate_robustness(model, data, ["fgsm", "pgd"], eps=0.15, steps=3,
                              batch_size=5, checks="none", equivariance=False)
    rows = {r.name: r for r in res.rows}
    assert res.worst_case is not None and res.worst_case.name == WORST_CASE
    worst = res.worst_case.undefended["accuracy"]
    assert worst <= min(rows["fgsm"].undefended["accuracy"], rows["pgd"].undefended["accuracy"])
    lo, hi = rows["pgd"].intervals["undefended"]["accuracy"]
    assert lo <= rows["pgd"].undefended["accuracy"] <= hi
    assert "[" in res.table() and WORST_CASE in res.report()
    assert WORST_CASE not in res.table()  # the plain table keeps its rows
    d = json.loads(json.dumps(res.to_dict()))
    assert d["worst_case"]["name"] == WORST_CASE and d["checks"] == []
    res.save_per_image(tmp_path / "pi.json")
    records = json.loads((tmp_path / "pi.json").read_text())["records"]
    assert len(records) == 16 * 4  # clean, fgsm, pgd, worst case per image
    per_image_worst = [r["undefended"] for r in records if r["row"] == WORST_CASE]
    assert sum(per_image_worst) / 16 == pytest.approx(worst)
    res.save_per_image(tmp_path / "pi.csv")
    with open(tmp_path / "pi.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 64 and {"index", "row", "undefended", "undefended_from"} <= set(lines[0])


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_row_and_black_box_check(blob_data):
    model, data = blob_data
    res = evaluate_robustness(model, data, ["fgsm"], eps=0.2, steps=5, batch_size=8,
                              ensemble="auto", ensemble_queries=30, checks="basic",
                              equivariance=False)
    row = res.row("autoattack-standard")
    assert row.attack_target == "model" and "AutoAttackEnsemble" in row.attack
    assert row.undefended["accuracy"] <= res.row("clean").undefended["accuracy"]
    names = [c.name for c in res.checks]
    assert names[:2] == ["randomness", "gradients"] and "black-box" in names
    assert not res.check("randomness").flagged
    assert res.meta["ensemble"] == "auto"


def test_ensemble_auto_picks_rand_for_a_randomized_defense(blob_data):
    model, data = blob_data
    res = evaluate_robustness(model, data, [], "random", eps=0.1, steps=2, batch_size=8,
                              max_images=8, ensemble="auto", ensemble_queries=10,
                              equivariance=False, defense_kwargs={"eps_v": 0.05})
    row = res.row("autoattack-rand")
    assert row.attack_target == "defense" and "rand" in row.attack
    assert res.check("randomness").flagged
    text = res.checks_summary()
    assert "meaning of randomness" in text and "EOT" in text


def test_ensemble_seg_version_on_a_segmenter():
    model = segmenter(0, k=4)
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = evaluate_robustness(model, TensorDataset(x, y), ["pgd"], eps=0.1, steps=2,
                              ensemble="auto", ensemble_queries=10, equivariance=False,
                              check_images=2)
    row = res.row("autoattack-seg")
    assert set(row.intervals["undefended"]) == {"miou", "pixel_accuracy", "mean_image_miou"}
    assert {c.name for c in res.checks} >= {"eps-growth", "convergence", "gradients"}


# ----------------------------------------------------------------------------- checks


def test_curve_checks_flag_a_too_weak_attack(blob_data):
    model, data = blob_data
    # one FGSM-like step of a tiny size cannot bring accuracy to 0 at 16 eps
    res = evaluate_robustness(model, data, [{"name": "pgd", "alpha": 1e-4, "label": "weak"}],
                              eps=0.01, steps=1, checks="all", check_images=8,
                              equivariance=False)
    assert res.check("eps-growth").flagged
    assert "meaning of eps-growth" in res.checks_summary()


def test_gradient_check_flags_a_flat_model(blob_data):
    _, data = blob_data

    class Flat(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 5) + 0.0 * x.flatten(1)[:, :5]

    res = evaluate_robustness(Flat(), data, ["fgsm"], eps=0.1, checks="basic",
                              equivariance=False)
    assert res.check("gradients").flagged


def test_eps_values_are_capped():
    assert eps_values(0.01, "linf", 64) == [0.01, 0.04, 0.16]
    assert eps_values(0.2, "linf", 64) == [0.2, 0.5]
    assert max(eps_values(1.0, "l2", 64)) == 4.0


def test_checks_summary_without_flags():
    assert checks_summary([]) == "automatic checks: none run"


def test_config_errors_of_the_new_settings(blob_data):
    model, data = blob_data
    with pytest.raises(ValueError, match="ensemble must be"):
        evaluate_robustness(model, data, ["fgsm"], ensemble="fast")
    with pytest.raises(ValueError, match="checks must be"):
        evaluate_robustness(model, data, ["fgsm"], checks="some")
    with pytest.raises(ValueError, match="check_images"):
        RobustnessConfig(check_images=0).checked()



def test_demo_section_runs_the_ensemble_and_prints_the_checks(tmp_path, monkeypatch):
    from equivision.demo import DemoContext
    from equivision.robust import demo

    tiny = dict(size=12, width=4, epochs=1, images=6, steps=1, defense_steps=2, eot_samples=1,
                batch_size=6, check_images=2)
    for key, value in tiny.items():
        monkeypatch.setitem(demo.DEMO_SETTINGS, key, value)
    text = demo.section_defense(DemoContext(out=tmp_path, device="cpu", progress=False))
    assert "| autoattack-rand | defense |" in text and "| worst-case |" in text
    assert "automatic checks:" in text and "`randomness`" in text and "[95% CI]" in text
    assert "per-image worst case over every attack and repeat" in text
