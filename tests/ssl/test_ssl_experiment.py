"""experiments/ser.py: the GPU preset runs through the same code on the CPU at a tiny
size (in-domain data, multi-crop, the three arms, probes with their baselines)."""

from __future__ import annotations

import json

import pytest
import ser as experiment

from equivision.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_device_cuda_selects_the_gpu_preset():
    assert experiment.parse(["arms", "--device", "cuda"]).preset == "gpu"
    assert experiment.parse(["arms", "--device", "cpu"]).preset == "full"
    assert experiment.parse(["arms", "--quick"]).preset == "quick"
    gpu = experiment.PRESETS["gpu"]
    assert gpu["pretrain"]["local_crops"] == 4 and gpu["data"] == "fashion-mnist"
    small = experiment.tiny(gpu)
    assert small["pretrain"]["local_crops"] == 2 and small["data"] == "fashion-mnist"
    with pytest.raises(SystemExit):
        experiment.parse(["arms", "--methods", "simclr"])


def test_gpu_preset_runs_tiny_on_the_cpu(tmp_path, capsys):
    experiment.main(["arms", "--preset", "gpu", "--tiny", "--device", "cpu", "--data",
                     "digits", "--out", str(tmp_path), "--quiet"])
    result = json.loads((tmp_path / "arms.json").read_text())
    assert result["preset"] == "gpu" and result["tiny"]
    labels = [e["label"] for e in result["entries"]]
    assert labels == ["mocov3 baseline (lambda=0)", "mocov3 SER", "mocov3 plain (no T_eq)"]
    assert [e["ratio"] for e in result["entries"]] == [0.04, 0.04, 0.0]
    run = result["entries"][1]["runs"][0]
    for key in ("linear", "knn", "equivariance", "corruptions", "baselines"):
        assert key in run
    assert set(run["baselines"]) == {"raw_pixels", "random_init"}
    ckpt = load_checkpoint(tmp_path / "arms" / "mocov3_SER-seed0" / "last.pt")
    assert ckpt["config"]["local_crops"] == 2 and ckpt["config"]["device"] == "cpu"
    table = (tmp_path / "arms.md").read_text()
    assert "20-NN top1 (raw pixels)" in table and "linear top1 (random init)" in table


def test_cpu_preset_is_the_three_arms_in_domain_with_three_seeds():
    """``--preset cpu``: issue 15's arms on Fashion-MNIST at CPU scale, three seeds, the
    small projection heads, and at least one SER image per batch."""
    args = experiment.parse(["arms", "--preset", "cpu"])
    assert args.preset == "cpu" and not args.quick
    cpu = experiment.PRESETS["cpu"]
    assert cpu["data"] == "fashion-mnist" and len(cpu["seeds"]) == 3
    assert cpu["pretrain"]["batch_size"] * cpu["pretrain"]["ratio"] >= 1
    assert cpu["encoder"]["image_size"] % cpu["encoder"]["patch_size"] == 0


def test_seeds_override_the_presets(tmp_path):
    assert experiment.parse(["arms", "--preset", "cpu", "--seeds", "3,4,5"]).seeds == (3, 4, 5)
    assert experiment.parse(["arms"]).seeds is None
    with pytest.raises(SystemExit):
        experiment.parse(["arms", "--seeds", "one"])
    experiment.main(["arms", "--preset", "gpu", "--tiny", "--device", "cpu", "--data",
                     "digits", "--out", str(tmp_path), "--quiet", "--seeds", "7"])
    result = json.loads((tmp_path / "arms.json").read_text())
    assert [r["seed"] for r in result["entries"][0]["runs"]] == [7]
