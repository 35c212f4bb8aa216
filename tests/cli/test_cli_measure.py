"""``equivision measure`` with its baselines and intervals (issue 11)."""

import json

import pytest
import torch

from equivision.cli import main
from equivision.models import create_model

TINY = ["--model", "cnn-small", "--model-args", "width=4", "--data", "digits", "--size", "12",
        "--transforms", "rot90:1", "--max-images", "16", "--quiet"]


def checkpoint(tmp_path):
    """A state dict far from any initialisation."""
    torch.manual_seed(0)
    model = create_model("cnn-small", width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_random_init_baseline_is_on_by_default_with_a_checkpoint(tmp_path, capsys):
    ckpt = checkpoint(tmp_path)
    assert main(["measure", *TINY, "--checkpoint", ckpt, "--seed", "4",
                 "--out", str(tmp_path / "on")]) == 0
    text = capsys.readouterr().out
    assert "rand:equiv" in text and "±" in text and "redundancy" in text
    d = json.loads((tmp_path / "on" / "report.json").read_text())
    assert d["meta"]["random_init"]["seed"] == 4
    res = [r for r in d["results"] if r["exact"]]
    assert all(r["random_init"] and r["ci"]["equivariance"] for r in res)
    assert any(r["random_init"]["equivariance"] != r["metrics"]["equivariance"] for r in res)
    assert main(["measure", *TINY, "--checkpoint", ckpt, "--no-random-init", "--ci-groups", "0",
                 "--out", str(tmp_path / "off")]) == 0
    text = capsys.readouterr().out
    assert "rand:" not in text and "±" not in text and "redundancy" in text
    d = json.loads((tmp_path / "off" / "report.json").read_text())
    assert "random_init" not in d["meta"] and d["meta"]["ci"] is None
    assert all(not r["random_init"] for r in d["results"])


def test_without_checkpoint_the_model_is_its_own_baseline(tmp_path, capsys):
    assert main(["measure", *TINY, "--out", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "itself the random-init baseline" in text and "rand:" not in text


def test_bad_ci_groups_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["measure", *TINY, "--ci-groups", "1", "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    assert "--ci-groups: must be 0 (no intervals) or at least 2" in capsys.readouterr().err


def test_registry_model_without_checkpoint_is_built_for_the_users_data(tmp_path):
    """An RGB image folder of 3 classes: ``measure``, ``lie`` and ``attack`` build an
    untrained registry model with the data's channels and classes (as ``train`` does),
    instead of failing on the default of 1 channel; --model-args still wins."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "pics" / cls / f"{i}.png")
    data = ["--data", str(tmp_path / "pics"), "--split", "all", "--quiet"]
    assert main(["measure", "--model", "cnn-small", *data, "--transforms", "rot90",
                 "--out", str(tmp_path / "m")]) == 0
    rep = json.loads((tmp_path / "m" / "report.json").read_text())
    assert rep["results"][-1]["shape"] == [3]  # three classes
    assert main(["lie", "--model", "cnn-small", *data, "--generators", "tx",
                 "--out", str(tmp_path / "l")]) == 0
    assert main(["attack", "--model", "cnn-small", *data, "--attack", "fgsm",
                 "--checks", "none"]) == 0
    assert main(["measure", "--model", "cnn-small", "--model-args", "in_channels=1", *data,
                 "--transforms", "rot90", "--out", str(tmp_path / "m1")]) == 2
