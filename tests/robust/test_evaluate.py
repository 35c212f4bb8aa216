"""Robustness evaluation (robust/evaluate.py) and the attack/defense registries."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from equivision.data import get_dataset
from equivision.models import create_model
from equivision.robust import (
    ATTACKS,
    BPDA,
    DEFENSES,
    PGD,
    EquivarianceDefense,
    RandomNoiseDefense,
    RobustnessConfig,
    build_attack,
    build_defense,
    evaluate_robustness,
    load_head,
    parse_attack,
    save_head,
)
from equivision.robust.heads import RotationHead
from equivision.training import TrainConfig, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(epochs=3, batch_size=32, lr=0.02, optimizer="adam", weight_decay=0.0, seed=0,
           device="cpu")


@pytest.fixture(scope="module")
def digits(one_thread):
    """A cnn-small (width 4) trained briefly on 12 px digits, and 16 test images."""
    torch.manual_seed(0)
    model = create_model("cnn-small", width=4)
    train(model, Subset(get_dataset("digits", split="train", size=12), range(400)),
          config=TrainConfig(**CFG), progress=False)
    return model.eval(), Subset(get_dataset("digits", split="test", size=12), range(16))


@pytest.fixture(scope="module")
def scenes(one_thread):
    """A segmenter (width 4) trained briefly on 16 px scenes, and 8 test scenes."""
    torch.manual_seed(0)
    model = create_model("segmenter", width=4)
    train(model, get_dataset("scenes", split="train", size=16, n=64),
          config=TrainConfig(**{**CFG, "batch_size": 16}), progress=False)
    return model.eval(), get_dataset("scenes", split="test", size=16, n=8)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert set(ATTACKS) == {"fgsm", "ifgsm", "pgd", "mim", "cw", "houdini", "bpda", "bpda-eot",
                            "full", "adaptive", "apgd-ce", "apgd-dlr", "apgd-t", "square",
                            "apgd-bpda", "autoattack"}
    assert "equivariance-reference" in DEFENSES and "rotation" in DEFENSES
    with pytest.raises(ValueError,
                       match="unknown attack 'pgdd'. Did you mean 'pgd'.*Valid names: .*fgsm"):
        parse_attack("pgdd")
    with pytest.raises(ValueError, match="only 'adaptive' takes a value"):
        parse_attack("pgd:3")
    assert parse_attack("adaptive:0/1/10").options == {"lambdas": [0.0, 1.0, 10.0]}
    spec = parse_attack({"name": "pgd", "steps": 5, "label": "pgd-5"})
    assert (spec.name, spec.label, spec.options) == ("pgd", "pgd-5", {"steps": 5})
    with pytest.raises(ValueError, match="unknown option"):
        parse_attack({"name": "pgd", "stepz": 5})
    model = create_model("cnn-small", width=4)
    with pytest.raises(ValueError, match="unknown defense 'equi'.*equivariance-reference"):
        build_defense("equi", model)
    with pytest.raises(ValueError, match="needs a trained head"):
        build_defense("rotation", model)
    assert build_defense("none", model) is None
    ref = build_defense("equivariance-reference", model, steps=2)
    assert isinstance(ref, EquivarianceDefense) and ref.eta == 1.0 and ref.pairing == "pairs"


def test_build_attack_targets():
    model = create_model("cnn-small", width=4)
    defense = RandomNoiseDefense(model)
    kw = dict(eps=0.1, steps=2)
    atk, target = build_attack(parse_attack("pgd"), model, defense, **kw)
    assert isinstance(atk, PGD) and atk.model is model and target == "model"
    atk, target = build_attack(parse_attack("bpda-eot"), model, defense, eot_samples=3, **kw)
    assert isinstance(atk, BPDA) and atk.eot_samples == 3 and target == "defense"
    atk, target = build_attack(parse_attack("bpda"), model, defense, eot_samples=3, **kw)
    assert atk.eot_samples == 1
    atk, target = build_attack(parse_attack("adaptive"), model, None, lambda_e=1.0, **kw)
    assert type(atk) is PGD and atk.lambda_e == 0 and target == "model"


def test_head_file_round_trip(tmp_path):
    head = RotationHead(4, hidden=8, grid=2)
    path = save_head(tmp_path / "head.pt", head, "features.relu3")
    loaded, layer = load_head(path)
    assert layer == "features.relu3" and isinstance(loaded, RotationHead)
    for a, b in zip(head.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    defense = build_defense("rotation", create_model("cnn-small", width=4), head=path, steps=1)
    assert defense.feature_layer == "features.relu3"


# ----------------------------------------------------------------------------- evaluation


def test_classification_numbers(digits):
    model, data = digits
    res = evaluate_robustness(model, data, ["pgd", "fgsm"], eps=0.3, steps=3, batch_size=6)
    ref = evaluate(model, data)
    clean, pgd = res.row("clean"), res.row("pgd")
    assert res.task == "classification" and res.n_images == 16
    assert clean.undefended["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert clean.undefended["accuracy"] > 0.2
    assert pgd.undefended["accuracy"] < clean.undefended["accuracy"]
    assert pgd.attack_target == "model" and clean.attack_target is None
    assert pgd.defended is None and pgd.equivariance["restored"] is None
    for row in res.rows:
        assert -1 <= row.equivariance["clean"] <= 1 and -1 <= row.equivariance["attacked"] <= 1
    assert clean.equivariance["attacked"] == clean.equivariance["clean"]
    text = json.dumps(res.to_dict())
    assert json.loads(text)["rows"][1]["name"] == "pgd"
    assert res.table().count("\n") == 4 and "| pgd | model |" in res.table()
    # the same seed gives the same numbers, whether the settings come as a config object
    # or as keyword overrides of one
    config = RobustnessConfig(eps=0.3, steps=3, batch_size=6)
    again = evaluate_robustness(model, data, ["pgd", "fgsm"], None, config)
    assert [r.undefended for r in again.rows] == [r.undefended for r in res.rows]
    # the default score layer is the last spatial map (issue 14, bug 5; it was "logits")
    assert again.meta["feature_layer"] == "features" and again.meta["steps"] == 3
    fewer = evaluate_robustness(model, data, ["pgd"], None, config, max_images=4)
    assert fewer.n_images == 4 and fewer.meta["eps"] == 0.3 and config.max_images is None


def test_config_errors(digits):
    model, data = digits
    with pytest.raises(TypeError, match="unknown setting.*'score_layr'.*feature_layer"):
        evaluate_robustness(model, data, ["pgd"], score_layr="logits")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        RobustnessConfig(steps=0).checked()
    with pytest.raises(ValueError, match="lambdas must hold at least one value"):
        RobustnessConfig(lambdas=()).checked()
    assert RobustnessConfig(lambdas=(1, 2)).checked().lambdas == [1.0, 2.0]


def test_defended_rows_worst_case_and_scores(digits):
    model, data = digits
    # on the logits (invariance loss), as before the default layer became the last map
    defense = EquivarianceDefense(model, eps_v=0.1, steps=2, noise=1.0, feature_layer="logits",
                                  allow_invariance=True)
    kw = dict(eps=0.1, steps=2, batch_size=8, eot_samples=2, lambdas=(0.0, 1.0))
    single = evaluate_robustness(model, data, ["pgd", "bpda-eot", "adaptive"], defense, **kw)
    worst = evaluate_robustness(model, data, ["pgd", "bpda-eot", "adaptive"], defense,
                                repeats=3, **kw)
    assert worst.meta["repeats_used"] == 3
    for a, b in zip(single.rows, worst.rows):
        # the first draw is the single run; the worst of 3 draws is never better
        assert b.defended_single == a.defended
        assert b.defended["accuracy"] <= a.defended["accuracy"]
        assert b.equivariance["restored"] is not None
    assert any(b.defended["accuracy"] < b.defended_single["accuracy"] for b in worst.rows)
    targets = {r.name: r.attack_target for r in worst.rows}
    assert targets == {"clean": None, "pgd": "model", "bpda-eot": "defense",
                       "adaptive": "defense"}
    assert "sweep_lambda([0.0, 1.0])" in worst.row("adaptive").attack
    # a deterministic defense is run once whatever `repeats` says
    det = EquivarianceDefense(model, eps_v=0.1, steps=2, noise=0.0)
    res = evaluate_robustness(model, data, [], det, repeats=3, batch_size=8)
    assert res.meta["repeats_used"] == 1 and len(res.rows) == 1


def test_equivariance_scores_are_per_image_with_paired_intervals(digits, tmp_path):
    model, data = digits
    defense = EquivarianceDefense(model, eps_v=0.1, steps=2, noise=0.0)
    res = evaluate_robustness(model, data, ["pgd"], defense, eps=0.2, steps=3, batch_size=6)
    records = json.loads(res.save_per_image(tmp_path / "p.json").read_text())["records"]
    pgd = [r for r in records if r["row"] == "pgd"]
    assert len(pgd) == 16 and all("equivariance_restored" in r for r in pgd)
    row = res.row("pgd")
    for kind in ("clean", "attacked", "restored"):
        per_image = [r[f"equivariance_{kind}"] for r in pgd]
        assert row.equivariance[kind] == pytest.approx(sum(per_image) / 16, abs=1e-9)
    # the paired change is the mean of per-image differences, with its own interval
    diffs = [r["equivariance_restored"] - r["equivariance_attacked"] for r in pgd]
    assert row.equivariance["restored - attacked"] == pytest.approx(sum(diffs) / 16, abs=1e-9)
    assert row.equivariance["attacked - clean"] == pytest.approx(
        row.equivariance["attacked"] - row.equivariance["clean"], abs=1e-9)
    ci = row.intervals["equivariance"]
    for name in ("clean", "attacked", "restored", "attacked - clean", "restored - attacked"):
        lo, hi = ci[name]
        assert lo <= row.equivariance[name] <= hi and lo < hi, name
    # the attack moved the scores, so the checks above are not between constants
    assert max(abs(d) for d in diffs) > 0
    # no scores asked for: no figures, no intervals, nothing guessed
    bare = evaluate_robustness(model, data, ["pgd"], defense, eps=0.2, steps=3,
                               batch_size=6, equivariance=False)
    assert set(bare.row("pgd").equivariance.values()) == {None}
    assert "equivariance" not in bare.row("pgd").intervals


def test_segmentation_numbers(scenes):
    model, data = scenes
    defense = RandomNoiseDefense(model, eps_v=0.2)
    res = evaluate_robustness(model, data, ["pgd"], defense, eps=0.3, steps=2, batch_size=4,
                              repeats=3)
    ref = evaluate(model, data)
    clean, pgd = res.row("clean"), res.row("pgd")
    assert res.task == "segmentation" and res.metric == "miou"
    assert clean.undefended["miou"] == pytest.approx(ref["miou"], abs=1e-9)
    assert clean.undefended["pixel_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert pgd.undefended["pixel_accuracy"] < clean.undefended["pixel_accuracy"]
    assert pgd.undefended["mean_image_miou"] <= clean.undefended["mean_image_miou"]
    for row in res.rows:
        assert row.defended["mean_image_miou"] <= row.defended_single["mean_image_miou"]
        assert 0 <= row.defended["miou"] <= 1
    assert "mIoU / pixel acc." in res.table()


class _NaNModel(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan"))


def test_bad_inputs(digits, scenes):
    model, data = digits
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        evaluate_robustness(model, data, ["pgd"], eps=0.0)
    bad = [(img * 2 + 0.5, label) for img, label in (data[i] for i in range(4))]
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        evaluate_robustness(model, bad, ["pgd"], eps=0.1)
    with pytest.raises(ValueError, match="unknown feature layer 'conv9'.*features.relu3"):
        evaluate_robustness(model, data, ["pgd"], "equivariance", eps=0.1,
                            defense_kwargs={"feature_layer": "conv9"})
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_robustness(model, data, ["nope"], eps=0.1)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_robustness(_NaNModel(), data, ["pgd"], eps=0.1)
    with pytest.raises(ValueError, match=r"parameters are torch.float64.*model.float\(\)"):
        evaluate_robustness(copy.deepcopy(model).double(), data, ["pgd"], eps=0.1)
    assert next(model.parameters()).dtype == torch.float32  # the model as it was
    seg_model, _ = scenes
    gray_seg = create_model("segmenter", in_channels=1, width=4)
    with pytest.raises(ValueError, match="do not match the model output"):
        evaluate_robustness(gray_seg, data, ["pgd"], eps=0.1)
    with pytest.raises(ValueError, match="defense must wrap the evaluated model"):
        evaluate_robustness(model, data, [], RandomNoiseDefense(seg_model), eps=0.1)


def test_result_handles_empty_restored_and_nan(digits):
    model, data = digits
    res = evaluate_robustness(model, data, [], eps=0.1, equivariance=False, max_images=4)
    row = res.to_dict()["rows"][0]
    assert res.n_images == 4 and row["equivariance"] == {
        "clean": None, "attacked": None, "restored": None, "attacked - clean": None,
        "restored - attacked": None}
    assert not math.isnan(row["undefended"]["accuracy"])


def test_demo_section_trains_once_then_reuses(tmp_path, monkeypatch):
    from equivision.demo import DemoContext
    from equivision.robust import demo

    tiny = dict(size=12, width=4, epochs=1, images=8, steps=1, defense_steps=1, eot_samples=1,
                batch_size=8)
    for key, value in tiny.items():
        monkeypatch.setitem(demo.DEMO_SETTINGS, key, value)
    ctx = DemoContext(out=tmp_path, device="cpu", progress=False)
    first = demo.section_defense(ctx)
    assert "trained for 1 epochs" in first and (tmp_path / "defense-cnn-small/last.pt").exists()
    assert "| bpda-eot | defense |" in first and "eps_v = 0.0625, T = 1" in first
    assert "Under BPDA+EOT" in first and "from this run" in first
    second = demo.section_defense(ctx)
    assert "reused the cached checkpoint" in second
    assert ctx.artifacts["defense_result"].n_images == 8


def test_adaptive_lambda_options(digits):
    model, data = digits
    defense = EquivarianceDefense(model, eps_v=0.1, steps=1, noise=0.0)
    res = evaluate_robustness(
        model, Subset(data, range(4)),
        ["adaptive:3", {"name": "adaptive", "lambda_e": 2.0, "label": "a2"}, "adaptive:0/5"],
        defense, eps=0.1, steps=1, equivariance=False)
    assert "lambda_e=3.0" in res.row("adaptive:3").attack
    assert "lambda_e=2.0" in res.row("a2").attack
    assert res.row("adaptive:0/5").attack.startswith("sweep_lambda([0.0, 5.0])")
