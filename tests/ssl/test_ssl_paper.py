"""SER as the paper defines it (issue 15): the lambda = 0 baseline, the padding-free
validity mask, T_eq without cropping and the centred equivariance score."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from equivision.ssl import SERConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _ser_experiment():
    spec = importlib.util.spec_from_file_location("ser_experiment", ROOT / "experiments/ser.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# ------------------------------------------------------------------ fix 5: the baseline
def test_control_is_paper_config_with_lambda_zero_and_same_ratio():
    for method in ("mocov3", "dino", "barlow"):
        ctl, ser = SERConfig.control(method), SERConfig.paper(method)
        assert ctl.weight == 0.0 and ser.weight == 0.5
        assert ctl.tau == ser.tau and ctl.layer == ser.layer and ctl.variant == ser.variant
        # the same partition ratio r: baseline and SER see the same views
        assert SERConfig.default_ratio(ctl) == SERConfig.default_ratio(ser) == SERConfig.RATIO
    assert SERConfig.control("mocov3", weight=3.0, proj_dim=8).weight == 0.0
    assert SERConfig.control("mocov3", proj_dim=8).proj_dim == 8
    arms = SERConfig.arms("dino")
    assert list(arms) == ["baseline", "ser", "plain"]
    assert arms["baseline"] == SERConfig.control("dino") and arms["plain"] is None


def test_experiment_baselines_are_the_lambda_zero_control():
    mod = _ser_experiment()
    for study in ("table2", "layers", "everylayer"):
        args = argparse.Namespace(study=study)
        runs = mod.study_runs(args, mod.QUICK)
        baselines = [kw for label, kw in runs if "SER" not in label]
        assert baselines, study
        for kw in baselines:  # never the plain method: the baseline keeps T_eq and r
            assert kw["ser"] is not None and kw["ser"]["weight"] == 0.0
