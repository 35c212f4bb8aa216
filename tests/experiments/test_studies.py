"""The study helpers: train or reuse a run, measure, summarise over seeds."""

import math

from support.studies import (
    RunSpec,
    markdown_table,
    mean_std,
    plot_parts,
    summarise,
    train_and_measure,
)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([None, 2.0]) == (2.0, 0.0)
    assert mean_std([None]) == (None, None)


def test_train_measure_reuse_and_summary(tmp_path):
    specs = [RunSpec("cnn-small", "digits", seed=s, size=12, epochs=1,
                     model_kwargs={"width": 4}) for s in (0, 1)]
    runs = [train_and_measure(s, tmp_path, "rot90:1,shift:2", max_images=32) for s in specs]
    assert specs[0].name != specs[1].name
    ckpt = tmp_path / specs[0].name / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    again = train_and_measure(specs[0], tmp_path, "rot90:1,shift:2", max_images=32)
    assert ckpt.stat().st_mtime_ns == stamp  # a finished run is reused, not retrained
    assert again["accuracy"] == runs[0]["accuracy"]
    assert again["parts"] == runs[0]["parts"]
    summ = summarise(runs)
    mean, sd = summ["Early"]["equivariance"]
    assert 0 < mean <= 1 and sd >= 0
    table = markdown_table({"tiny": summ})
    assert "| tiny |" in table and "Early" in table and "±" in table
    assert plot_parts({"tiny": summ}, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
