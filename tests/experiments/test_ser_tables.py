"""``support.ser_tables``: the SER arms paired by seed, joined over processes."""

from __future__ import annotations

import json
import math

import pytest
from support.ser_tables import join, main, paired_rows, tables
from support.stats import t_interval


def _run(seed: int, linear: float, centred_rot: list[float]) -> dict:
    return {"seed": seed, "linear": {"top1": linear}, "knn": {"top1": linear - 0.01},
            "corruptions": {"mean_geometric": linear / 2, "mean_appearance": linear / 3},
            "equivariance": {"centred": {"rot90": centred_rot, "hflip": [0.5, 0.5],
                                         "scale": [0.6, 0.6]}},
            "baselines": {"raw_pixels": {"linear": {"top1": 0.8}, "knn": {"top1": 0.77}},
                          "random_init": {"linear": {"top1": 0.58}, "knn": {"top1": 0.53},
                                          "equivariance": {"centred": {
                                              "rot90": [0.63, 0.59], "hflip": [0.64, 0.62],
                                              "scale": [0.68, 0.65]}}}}}


def _payload(seeds: list[int]) -> dict:
    entries = []
    for arm, gain, rot in (("baseline (lambda=0)", 0.0, 0.4), ("SER", 0.02, 0.7),
                           ("plain (no T_eq)", 0.01, 0.4)):
        entries.append({"label": f"mocov3 {arm}", "runs": [
            _run(s, 0.7 + gain + 0.001 * s * (arm == "SER"), [rot + 0.01 * s, rot])
            for s in seeds]})
    return {"entries": entries}


def test_t_interval_matches_the_textbook_value():
    m, sd, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (m, sd) == (2.0, 1.0)
    assert hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert t_interval([5.0])[2:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


def test_differences_are_taken_per_seed_in_points():
    arms = join([_payload([0, 1, 2])])
    rows = {(c, name): (diffs, ci) for c, name, diffs, ci in paired_rows(arms, "mocov3")}
    diffs, (m, sd, lo, hi) = rows[("SER − control", "linear top1")]
    assert diffs == pytest.approx([2.0, 2.1, 2.2])
    assert m == pytest.approx(2.1) and lo < m < hi
    assert rows[("plain − control", "linear top1")][0] == pytest.approx([1.0, 1.0, 1.0])


def test_join_over_processes_and_refuses_a_seed_twice():
    arms = join([_payload([0, 1]), _payload([2])])
    assert sorted(arms["mocov3 SER"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="seed 1 appears twice"):
        join([_payload([0, 1]), _payload([1])])


def test_tables_show_baselines_and_the_sign_of_every_seed(capsys, tmp_path):
    text = tables([_payload([0, 1, 2])])
    assert "raw pixels (baseline) | - | 80.0 | 77.0" in text
    assert "random init (baseline) | - | 58.0 | 53.0" in text
    assert "| random init (baseline) | 0.63 / 0.59 | 0.64 / 0.62 | 0.68 / 0.65 |" in text
    # SER's first-block rot90 is above the control's on all three seeds; the last block ties
    assert "rot90, first block, per seed: +0.300 +0.300 +0.300 (3 positive, 0 negative" in text
    assert "rot90, last block, per seed: +0.300" in text
    assert "hflip, last block, per seed: +0.000 +0.000 +0.000 (0 positive, 0 negative; " \
           "sign test p = 1.000)" in text
    path = tmp_path / "arms.json"
    path.write_text(json.dumps(_payload([0, 1])))
    main([str(path)])
    out = capsys.readouterr().out
    # the row gives the mean ± std, the 95% t-interval and both seeds' differences
    row = next(line for line in out.splitlines() if line.startswith("| SER − control | linear"))
    assert row.endswith("| +2.0 +2.1 |") and "± 0.1 |" in row
    with pytest.raises(SystemExit, match="cannot read"):
        main([str(tmp_path / "missing.json")])
