"""The task study (section 4.3) with baselines: rotated-label variants of any dataset,
image subsets, the random-init measurement and the per-part baseline summary."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from learned_equivariance import TASK_COLUMNS, merged_runs, task_runs, task_specs, task_tables
from support.pool import run_pool
from support.studies import (
    BASELINE_COLUMNS,
    RunSpec,
    markdown_table,
    plot_parts,
    study_dataset,
    summarise_baselines,
    train_and_measure,
)

from equivision.data import get_dataset


def test_study_dataset_subset_and_rotated_variants():
    base = study_dataset("digits", "test", size=12, limit=40)
    assert len(base) == 40 and base.name == "digits/test"
    assert torch.equal(base.images, study_dataset("digits", "test", 12, 40).images)
    full = get_dataset("digits", split="test", size=12)
    assert len(full) > 40  # the subset is drawn from the whole split
    inv = study_dataset("digits-rotinv", "test", size=12, limit=40)
    eq = study_dataset("digits-roteq", "test", size=12, limit=40)
    assert inv.num_classes == 10 and eq.num_classes == 40
    assert torch.equal(inv.labels, base.labels)
    rot = eq.labels % 4
    assert torch.equal(eq.labels // 4, base.labels) and len(set(rot.tolist())) > 1
    for i in range(40):  # image i is base image i turned by rot[i] quarter turns
        want = torch.rot90(base.images[i], int(rot[i]), dims=(-2, -1))
        assert torch.allclose(eq.images[i], want, atol=1e-5)
        assert torch.allclose(inv.images[i], want, atol=1e-5)  # same angles, label kept


def test_study_dataset_bad_input():
    with pytest.raises(ValueError, match="at least 1"):
        study_dataset("digits", "test", limit=0)
    with pytest.raises(ValueError, match="digitz"):
        study_dataset("digitz-roteq", "test")


def test_runspec_name_records_subsets():
    a = RunSpec("cnn7", "digits", train_images=100, test_images=50)
    assert "n100t50" in a.name and a.name != RunSpec("cnn7", "digits").name
    assert RunSpec("cnn7", "digits").name == "cnn7_digits_none_e10_seed0"  # unchanged


def _run(parts, rand, acc=0.5):
    return {"parts": parts, "parts_random_init": rand, "accuracy": acc}


def test_summarise_baselines_difference_per_run():
    runs = [_run({"Early": {"equivariance": 0.9, "invariance": 0.5, "redundancy": 0.7}},
                 {"Early": {"equivariance": 0.6, "invariance": 0.4, "redundancy": 0.5}}),
            _run({"Early": {"equivariance": 0.8, "invariance": 0.3, "redundancy": None}},
                 {"Early": {"equivariance": 0.7, "invariance": 0.3, "redundancy": 0.6}})]
    s = summarise_baselines(runs)
    assert set(s["Early"]) == set(BASELINE_COLUMNS)
    m, sd = s["Early"]["Δ equivariance"]
    assert math.isclose(m, 0.2) and math.isclose(sd, math.sqrt(0.02))
    assert math.isclose(s["Early"]["random-init equivariance"][0], 0.65)
    assert s["Early"]["redundancy"] == (0.7, 0.0)  # undefined values are skipped
    assert s["Early"]["equivariance - redundancy"][0] == pytest.approx(0.2)  # run 1 only
    assert math.isclose(s["Early"]["random-init redundancy"][0], 0.55)
    assert "Pool" not in s and s["accuracy"]["accuracy"] == (0.5, 0.0)


def test_train_and_measure_with_random_init(tmp_path: Path):
    spec = RunSpec("cnn-small", "digits-roteq", seed=1, size=12, epochs=1,
                   model_kwargs={"width": 4}, train_images=64, test_images=32)
    run = train_and_measure(spec, tmp_path, "rot90", max_images=16, random_init=True)
    assert run["report"].endswith("-ri.json") and Path(run["report"]).exists()
    assert set(run["parts_random_init"]) == set(run["parts"])
    early, rand = run["parts"]["Early"], run["parts_random_init"]["Early"]
    assert early["equivariance"] != rand["equivariance"]  # a different network measured
    assert rand["redundancy"] is not None and 0 < early["redundancy"] <= 1
    summ = {"tiny": summarise_baselines([run])}
    table = markdown_table(summ, metrics=BASELINE_COLUMNS)
    assert "| tiny |" in table and "random-init equivariance" in table
    png = plot_parts(summ, tmp_path / "t.png", metrics=("equivariance",
                                                        "random-init equivariance"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_task_specs_follow_data_and_sizes():
    args = argparse.Namespace(data="fashion-mnist", quick=False, seeds=2, epochs=3,
                              train_images=500, test_images=None)
    groups = task_specs(args)
    assert [s.data for ss in groups.values() for s in ss[:1]] == [
        "fashion-mnist", "fashion-mnist-rotinv", "fashion-mnist-roteq"]
    spec = groups["rotation-equivariant task"][1]
    assert (spec.model, spec.size, spec.epochs, spec.seed) == ("cnn7", 28, 3, 1)
    assert (spec.train_images, spec.test_images) == (500, None)
    quick = task_specs(argparse.Namespace(data="digits6", quick=True, seeds=None, epochs=None,
                                          train_images=None, test_images=None))
    assert len(quick["digits6 (upright)"]) == 2 and quick["digits6 (upright)"][0].epochs == 6
    args.first_seed = 5
    assert [s.seed for s in task_specs(args)["rotation-invariant task"]] == [5, 6]


def test_merged_runs_concatenate_seeds(tmp_path: Path):
    for name, seeds in (("a", (0, 1)), ("b", (2,))):
        runs = {"up": [{"seed": s} for s in seeds], "inv": [{"seed": 10 + s} for s in seeds]}
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": runs}))
    merged = merged_runs([tmp_path / "a.json", tmp_path / "b.json"])
    assert list(merged) == ["up", "inv"]
    assert [r["seed"] for r in merged["inv"]] == [10, 11, 12]


def test_task_study_runs_seed_major_logs_and_resumes(tmp_path: Path):
    def spec(data: str, seed: int) -> RunSpec:
        return RunSpec("cnn-small", data, seed=seed, size=12, epochs=1,
                       model_kwargs={"width": 3}, train_images=48, test_images=24)
    groups = {"up": [spec("digits", s) for s in (0, 1)],
              "eq": [spec("digits-roteq", s) for s in (0, 1)]}
    models, out = tmp_path / "models", tmp_path / "out"
    records = run_pool(groups, models, out, 16, "cpu", transforms="rot90")
    assert [(r["label"], r["spec"]["seed"]) for r in records] == [
        ("up", 0), ("eq", 0), ("up", 1), ("eq", 1)]  # seed-major
    assert all(r["report"].endswith("measure-rot90-ri.json") for r in records)
    assert records[0]["train_cpu_seconds"] > 0 and records[0]["measure_cpu_seconds"] > 0
    runs = task_runs(records)
    assert list(runs) == ["up", "eq"] and [len(v) for v in runs.values()] == [2, 2]
    assert set(runs["eq"][1]["parts_random_init"]) == set(runs["eq"][1]["parts"])
    assert summarise_baselines(runs["up"])["Early"]["Δ equivariance"][0] is not None
    log = out / "records.jsonl"
    assert len(log.read_text().splitlines()) == 4
    Path(records[3]["report"]).unlink()  # a stopped run: the last model lacks its report
    again = run_pool(groups, models, out, 16, "cpu", transforms="rot90")
    assert len(log.read_text().splitlines()) == 5  # only that model was redone
    assert again[0]["train_seconds"] == records[0]["train_seconds"]  # logged record kept
    assert Path(again[3]["report"]).exists()
    text = task_tables(out, again, ["up", "eq"], "tiny")
    head = text.splitlines()[0]
    assert all(f" {c} |" in head for c in TASK_COLUMNS) and "| up (" in text
    assert "Paired by seed against up" in text and "| eq (2) | Early |" in text
    assert (out / "task-rotation-compact.md").read_text().strip() == text.strip()
    assert (out / "task-rotation.png").read_bytes()[:4] == b"\x89PNG"
