"""`equivision attack` / `defend` with the ensemble, the automatic checks and per-image
files (an untrained tiny model: the plumbing, not the numbers)."""

import csv
import json

import pytest

from equivision.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["--model", "cnn-small", "--model-args", "width=4", "--dataset", "digits", "--size",
         "12", "--max-images", "6", "--batch-size", "3", "--no-progress"]


def test_attack_with_ensemble_checks_and_per_image_csv(tmp_path, capsys):
    per_image, out = tmp_path / "pi.csv", tmp_path / "r.json"
    assert main(["attack", *MODEL, "--attack", "fgsm", "--eps", "0.1", "--steps", "2",
                 "--ensemble", "standard", "--queries", "5", "--checks", "all",
                 "--check-images", "3", "--per-image", str(per_image),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| autoattack-standard | model |" in text and "| worst-case |" in text
    assert "automatic checks:" in text and "convergence" in text and "[95% CI]" in text
    with open(per_image) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * 4 and {r["row"] for r in rows} == {
        "clean", "fgsm", "autoattack-standard", "worst-case"}
    d = json.loads(out.read_text())
    assert d["meta"]["ensemble"] == "standard" and d["worst_case"]["name"] == "worst-case"
    assert {c["name"] for c in d["checks"]} >= {"randomness", "gradients", "black-box",
                                                "eps-growth", "convergence"}


def test_defend_with_checks_none_and_per_image_json(tmp_path, capsys):
    per_image = tmp_path / "pi.json"
    assert main(["defend", *MODEL, "--defense", "random", "--attack", "fgsm,bpda",
                 "--eps", "0.1", "--steps", "1", "--repeats", "2", "--checks", "none",
                 "--per-image", str(per_image)]) == 0
    assert "automatic checks: none run" in capsys.readouterr().out
    records = json.loads(per_image.read_text())["records"]
    assert {"undefended", "defended", "defended_single"} <= set(records[0])


def test_bad_ensemble_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["attack", *MODEL, "--ensemble", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


CNN7 = ["--model", "cnn7", "--dataset", "digits", "--size", "28", "--max-images", "2",
        "--batch-size", "2", "--no-progress", "--checks", "none", "--attack", "fgsm",
        "--defense-steps", "1"]


def test_defend_cnn7_at_28px_with_default_views(tmp_path, capsys):
    """Bug 5 of issue 14: the 0.3x / 0.6x views made images smaller than cnn7 takes."""
    out = tmp_path / "r.json"
    assert main(["defend", *CNN7, "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["feature_layer"] == "features.relu6"  # the last spatial map
    assert "resize(0.3)" not in meta["score_views"] and "resize(2)" in meta["score_views"]


def test_defense_transforms_on_the_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["defend", *CNN7, "--defense-transforms", "resize:1.5,hflip,rotate:10",
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["meta"]["score_views"] == ["resize(1.5)", "hflip", "rotate(10)"]
    assert main(["defend", *CNN7, "--defense-transforms", "resize:0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot take the view resize(0.5)" in err and "minimum input size is 28 px" in err
    assert main(["defend", *CNN7, "--defense-transforms", "rotat:10"]) == 2
    assert "--defense-transforms" in capsys.readouterr().err


def test_vector_feature_layer_is_refused_for_equivariance(capsys):
    assert main(["defend", *CNN7, "--feature-layer", "logits"]) == 2
    assert "gives vectors" in capsys.readouterr().err
    assert main(["defend", *CNN7, "--defense", "invariance", "--feature-layer", "logits"]) == 0
