"""``experiments/defense.py --data fashion-mnist`` on a tiny IDX folder (no real data)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import defense
import numpy as np
import pytest
import torch
from defense import Ctx, cmd_throughput, main, model_seeds

STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _write_idx(folder: Path, n: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in n.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for stem, arr in zip(STEMS[split], (images, labels)):
            head = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(
                struct.pack(">I", d) for d in arr.shape)
            (folder / stem).write_bytes(head + arr.tobytes())


def test_fashion_ctx_trains_cnn7_with_view_augment(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "data" / "fashion-mnist", {"train": 20, "test": 10})
    monkeypatch.setenv("EQUIVISION_DATA", str(tmp_path / "data"))
    ctx = Ctx(True, tmp_path / "runs", "fashion-mnist")
    assert ctx.out == tmp_path / "runs" / "defense-fashion-quick"
    assert ctx.tasks["cls"]["dataset"] == "fashion-mnist" and ctx.tasks["seg"]["model"] == \
        "segmenter"
    assert model_seeds(ctx, "cls") == (0, 1, 2) and not ctx.heads
    assert len(ctx.data("cls", "test")) == 10
    ctx.tasks["cls"] = {**ctx.tasks["cls"], "epochs": 1,
                        "model_kwargs": dict(padding=1, width=4)}
    model = ctx.model("cls", 0)
    assert not model.training
    assert (ctx.models_dir / "cls-cnn7-seed0" / "last.pt").exists()
    # channels-last weights (faster on CPU), also when reloaded from the checkpoint
    w = model.features.conv2.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    again = Ctx(True, tmp_path / "runs", "fashion-mnist")
    again.tasks["cls"] = ctx.tasks["cls"]
    reloaded = again.model("cls", 0).features.conv2.weight
    assert reloaded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(reloaded, w)
    with torch.no_grad():  # any size the defense's views make (0.3x of 28 px = 8 px)
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    digits = Ctx(True, tmp_path / "runs")
    assert digits.tasks["cls"]["dataset"] == "digits" and digits.heads


@pytest.mark.parametrize("argv, message", [
    (["worstcase", "--columns", "Vanila"], "--columns must list"),
    (["worstcase", "--n", "0"], "--n must be >= 1"),
    (["models", "--seeds", "a"], "--seeds must be"),
    (["models", "--tasks", "det"], "--tasks must list"),
])
def test_bad_options_give_one_line(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_throughput_rows(tmp_path: Path) -> None:
    ctx = Ctx(True, tmp_path / "runs", "fashion-mnist")
    ctx.tasks["cls"] = {**ctx.tasks["cls"], "model_kwargs": dict(padding=1, width=4)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI's --threads 1: several threads on a busy CPU crawl
    try:
        res = cmd_throughput(ctx)
    finally:
        torch.set_num_threads(threads)
    assert [(r["T"], r["batch"]) for r in res["results"]] == [(2, 1), (2, 4)]
    assert all(r["predict"] > 0 for r in res["results"])
    assert "| 2 | 4 |" in res["markdown"]


def _run_tiny_sweep(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``command --quick --tasks cls --n 4`` on a 20/10-image IDX folder with a width-4
    cnn7 trained 1 epoch; returns the output folder."""
    _write_idx(tmp_path / "data" / "fashion-mnist", {"train": 20, "test": 10})
    monkeypatch.setenv("EQUIVISION_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(defense, "FASHION_CLS", {
        **defense.FASHION_CLS, "epochs": 1, "model_kwargs": dict(padding=1, width=4)})
    main([command, "--quick", "--data", "fashion-mnist", "--tasks", "cls", "--n", "4",
          "--threads", "1", "--runs", str(tmp_path / "runs")])
    return tmp_path / "runs" / "defense-fashion-quick"


def test_sweep_runs_on_the_chosen_tasks_with_intervals(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """table5 with ``--tasks cls --n 4``: only the classifier, 4 images, every cell with its
    95% interval, written to table5-cls.json (not over a both-task table5.json)."""
    out = _run_tiny_sweep("table5", tmp_path, monkeypatch)
    assert not (out / "table5.json").exists()
    res = json.loads((out / "table5-cls.json").read_text())["results"]
    assert set(res) == {"cls"} and set(res["cls"]) == set(defense.SUBSETS)
    for row in res["cls"].values():
        for key in ("clean", "PGD", "BPDA+EOT"):
            lo, hi = row["intervals"][key]
            assert 0.0 <= lo <= row[key] <= hi <= 100.0
            assert hi - lo > 20.0  # 4 images cannot pin an accuracy down
    md = (out / "table5-cls.md").read_text()
    assert "\n4 test images" in md and "**seg**" not in md
    # every finished config was saved as it finished: the last partial file holds them all
    partial = json.loads((out / "table5-cls-partial.json").read_text())
    assert partial["results"] == res["cls"]
    # the attack-curve checks ran on the first config only; every config kept its checks
    levels = [row["checks"]["level"] for row in res["cls"].values()]
    assert levels == ["all"] + ["basic"] * (len(levels) - 1)
    names = [{c["name"] for c in row["checks"]["results"]} for row in res["cls"].values()]
    assert names[0] > names[1] and names[1] >= {"randomness", "gradients"}
    assert "Automatic checks (all checks on " in md


def test_table4_scores_have_intervals_and_paired_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run_tiny_sweep("table4", tmp_path, monkeypatch)
    md = (out / "table4-cls.md").read_text()
    assert "| attacked - clean | restored - attacked |" in md
    row = json.loads((out / "table4-cls.json").read_text())["results"]["cls"]["rows"][2]
    assert row["name"] == "BPDA+EOT"
    for name, (lo, hi) in row["intervals"]["equivariance"].items():
        assert lo <= row["equivariance"][name] <= hi, name
    cells = [ln for ln in md.splitlines() if ln.startswith("| cls | BPDA+EOT |")][0]
    assert cells.count("[") == 5
