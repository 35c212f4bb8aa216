"""Every script in examples/ runs, on tiny sizes, and produces what it says."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_test():
    tested = {"measure_model", "group_cnn_exactness", "attack_and_defend", "ser_pretrain_probe"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_measure_model(tmp_path, capsys):
    out = load("measure_model").main(["--tiny", "--out", str(tmp_path)])
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 16 and "hflip" in report["transforms"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "train" / "last.pt").exists()
    assert "equivariance" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_group_cnn_exactness(capsys):
    out = load("group_cnn_exactness").main(["--tiny", "--size", "29"])
    assert out["verdict"].startswith("not exact") and out["exact_size"] in (28, 30)
    assert out["error@29"] > 1e-3 and out[f"error@{out['exact_size']}"] < 1e-9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attack_and_defend(tmp_path):
    out = load("attack_and_defend").main(["--tiny", "--out", str(tmp_path)])
    assert all(0 <= v <= 1 for v in out.values())
    assert out["pgd"] <= out["clean"]
    assert json.loads((tmp_path / "defend.json").read_text())["rows"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ser_pretrain_probe(tmp_path):
    results = load("ser_pretrain_probe").main(["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "last.pt").exists()
    assert 0 <= results["knn"]["top1"] <= 1
    assert all(not math.isnan(s) for v in results["equivariance"]["scores"].values() for s in v)
