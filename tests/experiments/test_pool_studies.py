"""One pool of trained models for the augmentation, width, architecture, Spearman and
cosine studies: specs, seed-major order, resumable records, and the tables with
baselines read from the saved reports."""

import json
import math
from pathlib import Path

import pytest
from support.pool import (
    POOL_AUGMENTS,
    POOL_TRANSFORMS,
    finished_records,
    load_reports,
    pool_specs,
    report_path,
    run_pool,
    seed_major,
)
from support.pool_studies import (
    STUDY_COLUMNS,
    cosine_rows,
    group_runs,
    paired_table,
    seeds_show,
    spearman_rows,
    study_table,
    transforms_of,
    write_study,
)
from support.studies import RunSpec, summarise_baselines


def test_pool_specs_cover_every_study_and_order_by_seed():
    groups = pool_specs("fashion-mnist", [0, 1, 2], epochs=3, train_images=100,
                        test_images=50, transformer={"dim": 16, "depth": 1})
    assert [f"cnn7 {a}" for a in POOL_AUGMENTS] == list(groups)[:len(POOL_AUGMENTS)]
    assert {"cnn7 width 10", "cnn7 width 40", "ViT", "MLP-Mixer"} <= set(groups)
    assert groups["cnn7 CutMix"][1].augment == "cutmix:1:1"
    assert groups["cnn7 width 40"][0].model_kwargs == {"width": 40}
    vit = groups["ViT"][2]
    assert (vit.model, vit.seed, vit.optimizer, vit.model_kwargs) == (
        "vit-small", 2, "adamw", {"dim": 16, "depth": 1})
    assert all(s.data == "fashion-mnist" and s.epochs == 3 and s.train_images == 100
               for specs in groups.values() for s in specs)
    order = seed_major(groups)
    assert [s.seed for _, s in order] == [0] * 9 + [1] * 9 + [2] * 9
    assert order[0][0] == "cnn7 none" and order[9][0] == "cnn7 none"


def test_pool_studies_option_trains_only_their_groups():
    """``pool --studies width,arch`` trains the groups those two studies read (cnn7 at
    widths 10 / 20 / 40, the ViT and the Mixer), not the augmented cnn7s."""
    import argparse

    from learned_equivariance import pool_groups

    args = argparse.Namespace(data="fashion-mnist", seeds=None, first_seed=0, quick=False,
                              epochs=None, train_images=24000, test_images=None,
                              studies="width,arch")
    groups = pool_groups(args)
    assert set(groups) == {"cnn7 none", "cnn7 width 10", "cnn7 width 40", "ViT", "MLP-Mixer"}
    assert all(s.train_images == 24000 and s.epochs == 6 for v in groups.values() for s in v)
    args.studies = None
    assert len(pool_groups(args)) == 9
    args.studies = "width,depth"
    with pytest.raises(SystemExit, match="--studies takes"):
        pool_groups(args)


def _tiny_groups() -> dict[str, list[RunSpec]]:
    def spec(seed: int, width: int) -> RunSpec:
        return RunSpec("cnn-small", "digits", seed=seed, size=12, epochs=1,
                       model_kwargs={"width": width}, train_images=48, test_images=24)
    return {"narrow": [spec(s, 3) for s in (0, 1, 2)], "wide": [spec(s, 6) for s in (0, 1, 2)]}


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    groups = _tiny_groups()
    records = run_pool(groups, tmp / "models", tmp / "out", max_images=16, device="cpu")
    return groups, tmp, records


def test_run_pool_saves_each_record_and_resumes(tiny_pool):
    groups, tmp, records = tiny_pool
    lines = (tmp / "out" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[1])["label"] == "wide"
    path = report_path(tmp / "models", groups["narrow"][0])
    assert Path(records[0]["report"]) == path and path.exists()
    stamp = path.stat().st_mtime_ns
    again = run_pool({"narrow": groups["narrow"][:1]}, tmp / "models", tmp / "out", 16, "cpu")
    assert path.stat().st_mtime_ns == stamp  # neither retrained nor re-measured
    assert again[0]["accuracy"] == records[0]["accuracy"]
    done = finished_records(groups, tmp / "models", tmp / "out")
    assert [r["label"] for r in done] == ["narrow", "wide"] * 3  # last record per model
    rep = load_reports(done[:1])[0]
    assert rep.has_random_init and rep.n_images == 16
    assert transforms_of(rep, "rotation") == ["rot90", "rot180", "rot270"]
    assert transforms_of(rep, "sub-pixel") == ["subshift(0.5,0.5)"]
    assert len(transforms_of(rep, "translation")) == 4 and POOL_TRANSFORMS.startswith("rot90")


def test_study_tables_put_baselines_and_intervals_beside_each_part(tiny_pool):
    _, tmp, records = tiny_pool
    reports = load_reports(records)
    runs = group_runs(records, reports, {"wide": "6 channels", "narrow": "3 channels",
                                         "absent": "never trained"}, "rotation")
    assert list(runs) == ["6 channels", "3 channels"] and len(runs["6 channels"]) == 3
    table, summ = study_table(runs)
    assert "| 6 channels | 3 |" in table and "Early" in table
    early = summ["3 channels"]["Early"]
    assert set(early) == set(STUDY_COLUMNS)
    width = early["equivariance CI width"][0]
    assert width is not None and 0 <= width <= 2
    assert early["random-init equivariance CI width"][0] is not None
    compact = write_study(tmp / "out", "toy", runs, "rotation", "toy")
    assert compact.startswith("| setting (accuracy, seeds) | part | eq |")
    assert "| 3 channels (" in compact and ", 3) | Early |" in compact
    assert compact == (tmp / "out" / "toy-rotation-compact.md").read_text().strip()
    assert "Paired by seed against 6 channels" in compact
    assert (tmp / "out" / "toy-rotation.png").read_bytes()[:4] == b"\x89PNG"
    assert "6 channels" in (tmp / "out" / "toy-rotation.md").read_text()


def test_paired_table_differences_per_seed():
    def run(seed, eq):
        return {"seed": seed, "accuracy": 0.5, "parts": {"Late": {"equivariance": eq}},
                "parts_random_init": {}}
    runs = {"ref": [run(0, 0.5), run(1, 0.6), run(2, 0.7)],
            "new": [run(1, 0.9), run(2, 1.0), run(0, 0.8)],  # +0.3 on every seed
            "noisy": [run(0, 0.9), run(1, 0.4), run(5, 0.1)]}  # seed 5 has no partner
    table = paired_table(runs, "ref", metrics=("equivariance",))
    assert "| new (3) | Late | +0.300 ± 0.000 † |" in table
    assert "| noisy (2) | Late | +0.100 ± 0.424 |" in table
    assert "Early" not in table


def test_spearman_and_cosine_rows_over_the_pool(tiny_pool):
    _, _, records = tiny_pool
    reports = load_reports(records)
    rows, payload = spearman_rows(records, reports, "all", lambda r: True)
    assert len(rows) == 3 * 2 * 3 and rows[0].startswith("| all (6) | translation |")
    c = payload["all/rotation/equivariance/trained/Early"]
    assert c is None or c["n"] == 6
    rows, per = cosine_rows(records, reports)
    assert [r.split(" | ")[0] for r in rows] == ["| narrow", "| wide"]
    assert all(-1 <= r <= 1 for r in per["wide"]["trained/invariance"])


def test_seeds_show_uses_the_t_interval():
    assert seeds_show([0.10, 0.11, 0.09])
    assert not seeds_show([0.10, -0.10, 0.05])
    assert not seeds_show([0.3]) and not seeds_show([None, 0.2])
    # n = 3: t = 4.30, so the mean must exceed 2.48 sd
    assert not seeds_show([0.0, 0.1, 0.2])  # mean 0.1, sd 0.1
    assert seeds_show([0.2, 0.25, 0.3])
    assert not seeds_show([-1e-16, -1e-16, -1e-16])  # exact layers: round-off only
    assert seeds_show([0.1, 0.1])


def test_summarise_baselines_takes_extra_columns():
    runs = [{"parts": {"Early": {"equivariance": 0.5, "equivariance CI width": 0.02}},
             "parts_random_init": {"Early": {"equivariance": 0.4,
                                             "equivariance CI width": 0.04}},
             "accuracy": 0.9}]
    s = summarise_baselines(runs, ("equivariance CI width",
                                   "random-init equivariance CI width", "Δ equivariance"))
    assert s["Early"]["equivariance CI width"] == (0.02, 0.0)
    assert s["Early"]["random-init equivariance CI width"] == (0.04, 0.0)
    assert math.isclose(s["Early"]["Δ equivariance"][0], 0.1)
