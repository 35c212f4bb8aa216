"""``equivision lie``: files, the random-init baseline, clear errors."""

from __future__ import annotations

import json

import torch

from equivision.checkpoint import save_checkpoint
from equivision.cli.main import main
from equivision.models import create_model


def test_lie_command_writes_reports_and_the_random_init_baseline(tmp_path, capsys):
    torch.manual_seed(3)
    ckpt = tmp_path / "w.pt"
    save_checkpoint(ckpt, {"model": create_model("cnn-small").state_dict()})
    out = tmp_path / "lie"
    assert main(["lie", "--model", "cnn-small", "--checkpoint", str(ckpt), "--data", "digits",
                 "--size", "12", "--generators", "tx,rotate", "--max-images", "6",
                 "--device", "auto", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "contributions to the output's Lie derivative" in text and "(random init)" in text
    trained = json.loads((out / "lie.json").read_text())
    fresh = json.loads((out / "random-init" / "lie.json").read_text())
    assert trained["generators"] == ["tx", "rotate"] and trained["meta"]["n_images"] == 6
    assert trained["meta"]["checkpoint"].endswith("w.pt") and fresh["meta"]["checkpoint"] is None
    assert trained["rows"] != fresh["rows"]  # other weights, other numbers
    assert (out / "lie.csv").exists()


def test_lie_command_errors_are_one_line(tmp_path, capsys):
    assert main(["lie", "--model", "cnn-small", "--data", "digits", "--size", "12",
                 "--generators", "rotation", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rotate" in err[0]
