"""APGD, APGD-T and Square are registered attacks that the evaluation runs by name."""

import pytest
from torch.utils.data import TensorDataset

from equivision.robust import ATTACKS
from equivision.robust.apgd import APGD, APGDT
from equivision.robust.evaluate import evaluate_robustness
from equivision.robust.registry import build_attack, parse_attack
from equivision.robust.square import Square


def test_new_attacks_are_registered():
    for name in ("apgd-ce", "apgd-dlr", "apgd-t", "square", "apgd-bpda"):
        assert name in ATTACKS
    with pytest.raises(ValueError, match="Did you mean 'apgd-ce'"):
        ATTACKS.get("apgd-cee")


def test_build_keeps_only_the_constructor_arguments(trained):
    model, _, _ = trained
    settings = dict(eps=0.1, steps=7, alpha=0.01, random_start=True, restarts=1, seed=3,
                    kappa=0.0, decay=1.0, through="bpda", eot_samples=4, lambda_e=0.0)
    atk, target = build_attack(parse_attack("apgd-t"), model, None, **settings)
    assert isinstance(atk, APGDT) and target == "model"
    sq, _ = build_attack(parse_attack({"name": "square", "queries": 20}), model, None,
                         **settings)
    assert isinstance(sq, Square)
    # without a defense the in-loop APGD attacks the model itself
    bp, target = build_attack(parse_attack("apgd-bpda"), model, None, **settings)
    assert isinstance(bp, APGD) and target == "model"


def test_evaluation_runs_them_and_apgd_is_at_least_as_strong_as_pgd(trained):
    model, x, y = trained
    data = TensorDataset(x, y)
    attacks = ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", {"name": "square", "queries": 40}]
    res = evaluate_robustness(model, data, attacks, None, eps=0.15, steps=10, batch_size=64,
                              equivariance=False)
    acc = {row.name: row.undefended["accuracy"] for row in res.rows}
    assert acc["clean"] > 0.8
    for name in ("apgd-ce", "apgd-dlr", "apgd-t", "square"):
        assert acc[name] < acc["clean"], name
    assert acc["apgd-ce"] <= acc["pgd"] + 1 / 64
