"""experiments/gcnn_rotations.py: early stopping, the data it builds, resuming, the report.

Tiny sizes on the built-in digits only (never Fashion-MNIST)."""

import json

import gcnn_rotations as gr
import pytest
import torch
from support.rotations import (
    EarlyStopping,
    StopTraining,
    circular_distance,
    prepare_images,
    rotate_fixed,
)
from torch import nn

from equivision.data import ImageDataset, circle_crop

TINY = ["--dataset", "digits", "--train-size", "40", "--val-size", "20", "--test-size", "24",
        "--curve-size", "8", "--max-epochs", "1", "--seeds", "1"]


def test_early_stopping_keeps_best_weights_and_stops_after_patience():
    model = nn.Linear(2, 2)
    stop = EarlyStopping(patience=2)
    accs = [0.5, 0.7, 0.6, 0.65]
    with torch.no_grad():
        for epoch in range(1, 4):
            model.weight.fill_(epoch)
            stop.on_epoch_end(epoch, model, {"val_acc": accs[:epoch]})
        model.weight.fill_(4)
        with pytest.raises(StopTraining):
            stop.on_epoch_end(4, model, {"val_acc": accs})
    assert stop.best_epoch == 2 and stop.best == 0.7
    assert torch.all(stop.restore(model).weight == 2)
    with pytest.raises(ValueError, match="validation set"):
        EarlyStopping().on_epoch_end(1, model, {"val_acc": [None]})
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)


def test_fit_stops_early_on_a_flat_validation_accuracy():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    data = ImageDataset(x, torch.zeros(16, dtype=torch.long), [str(i) for i in range(10)])
    args = gr.parse_args(["table1", "--rule", "plateau", "--max-epochs", "9",
                          "--patience", "2"])
    model, info = gr.fit(args, "z2cnn", 28, 0, data, data, width=2)
    # one class only: val accuracy is 1.0 from some epoch on, then cannot improve
    assert info["epochs_run"] == info["best_epoch"] + 2 < 9
    assert len(info["val_acc"]) == info["epochs_run"] and not model.training


def test_cosine_rule_trains_every_epoch_and_keeps_the_best():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    data = ImageDataset(x, torch.zeros(16, dtype=torch.long), [str(i) for i in range(10)])
    args = gr.parse_args(["table1", "--max-epochs", "4", "--patience", "1"])
    assert args.rule == "cosine" and args.out.name == "gcnn-fmnist-cosine"
    _, info = gr.fit(args, "z2cnn", 28, 0, data, data, width=2)
    # the flat validation accuracy would stop the plateau rule; cosine runs all epochs
    assert info["epochs_run"] == 4 and info["best_epoch"] < 4
    assert gr.parse_args(["table1"]).max_epochs == 10
    assert gr.parse_args(["table1", "--rule", "plateau"]).max_epochs == 15


def test_dropout_is_a_study_of_its_own(tmp_path):
    gr.main(["table1", "--column", "rotated", *TINY, "--only", "Z2CNN", "--dropout", "0",
             "--out", str(tmp_path)])
    assert not (tmp_path / "table1-rotated.jsonl").exists()
    recs = [json.loads(x) for x in (tmp_path / "table1-rotated-dropout0.jsonl").open()]
    assert [r["label"] for r in recs] == ["Z2CNN (28)"]
    gr.main(["report", "--out", str(tmp_path)])
    assert "| Z2CNN (28) (rotated only) |" in (tmp_path / "table1-dropout0.md").read_text()
    # with the upright column too, the report pairs both columns of the same dropout
    gr.main(["table1", "--column", "upright", *TINY, "--only", "Z2CNN", "--dropout", "0",
             "--out", str(tmp_path)])
    gr.main(["report", "--out", str(tmp_path)])
    table = (tmp_path / "table1-dropout0.md").read_text()
    assert "(rotated only)" not in table and "| Z2CNN (28) | 1 |" in table


def test_a_study_folder_never_mixes_rules(tmp_path):
    path = tmp_path / "table2.jsonl"
    path.write_text(json.dumps({"label": "ResNet (33)", "seed": 0}) + "\n")
    plateau = gr.recipe(gr.parse_args(["table2", "--rule", "plateau"]))
    assert gr.done_keys(path, plateau) == {("ResNet (33)", 0)}  # old records: plateau
    with pytest.raises(ValueError, match="--rule plateau"):
        gr.done_keys(path, gr.recipe(gr.parse_args(["table2"])))


def test_a_study_folder_never_mixes_data_sizes_or_epochs(tmp_path):
    gr.main(["table1", *TINY, "--only", "Z2CNN", "--out", str(tmp_path)])
    path = tmp_path / "table1-upright.jsonl"
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert rec["sizes"] == [40, 20, 24, 8] and rec["max_epochs"] == 1
    bigger = [*TINY[:2], "--train-size", "50", *TINY[4:]]
    with pytest.raises(ValueError, match="holds runs of --train-size 40, not"):
        gr.main(["table1", *bigger, "--only", "Z2CNN", "--out", str(tmp_path)])
    longer = [*TINY[:-4], "--max-epochs", "2", *TINY[-2:]]
    with pytest.raises(ValueError, match="holds runs of --max-epochs 1, not"):
        gr.main(["table1", *longer, "--only", "Z2CNN", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--curve-size 8"):
        gr.main(["table1", *TINY[:-6], "--curve-size", "9", *TINY[-4:], "--out",
                 str(tmp_path)])
    assert len(path.read_text().splitlines()) == 1  # nothing was added
    gr.main(["table1", *bigger, "--only", "Z2CNN", "--out", str(tmp_path / "bigger")])
    assert json.loads((tmp_path / "bigger" / path.name).read_text())["sizes"][0] == 50


def test_default_out_names_the_recipe():
    assert gr.parse_args(["table1"]).out.name == "gcnn-fmnist-cosine"
    assert gr.parse_args(["table1", "--rule", "plateau", "--max-epochs", "15"]
                         ).out.name == "gcnn-fmnist-plateau"
    args = gr.parse_args(["table1", "--train-size", "12000", "--max-epochs", "12"])
    assert args.out.name == "gcnn-fmnist-cosine-train12000"
    assert gr.parse_args(["table1", "--val-size", "2000"]).out.name == (
        "gcnn-fmnist-cosine-val2000")
    assert gr.parse_args(["table1", "--quick"]).out.name == "gcnn-quick"
    assert gr.parse_args(["table1", "--out", "x"]).out.name == "x"


def test_val_table_gives_the_validation_curve_per_epoch(tmp_path):
    recs = [{"label": "Z2CNN (28)", "seed": s, "val_acc": [0.5, 0.7 + 0.1 * s, 0.8]}
            for s in range(2)]
    recs.append({"label": "P4CNN exact (28)", "seed": 0, "val_acc": [0.6, 0.6]})
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rows = gr.val_table(tmp_path, "t").splitlines()
    assert len(rows) == 2 + 3 + 2
    assert rows[2] == "| Z2CNN (28) | 1 | 2 | 0.500 ± 0.000 | - |"
    assert rows[3] == "| Z2CNN (28) | 2 | 2 | 0.750 ± 0.071 | 0.250 ± 0.071 |"
    assert rows[4] == "| Z2CNN (28) | 3 | 2 | 0.800 ± 0.000 | 0.050 ± 0.071 |"
    assert rows[6] == "| P4CNN exact (28) | 2 | 1 | 0.600 ± 0.000 | 0.000 ± 0.000 |"
    assert gr.val_table(tmp_path, "missing") == ""


def test_layout_reaches_the_models_and_the_records(tmp_path, monkeypatch):
    built = []
    create = gr.create_model

    def spy(name, **kwargs):
        model = create(name, **kwargs)
        built.append((name, model.order, model.dropout_layers))
        return model

    monkeypatch.setattr(gr, "create_model", spy)
    gr.main(["table1", "--column", "rotated", *TINY, "--only", "Z2CNN",
             "--out", str(tmp_path / "paper")])
    gr.main(["table1", "--column", "rotated", *TINY, "--only", "Z2CNN", "--layout", "bn-relu",
             "--out", str(tmp_path / "old")])
    assert built == [("z2cnn", "relu-bn", 5), ("z2cnn", "bn-relu", 7)]
    for folder, layout in (("paper", "paper"), ("old", "bn-relu")):
        recs = [json.loads(x) for x in (tmp_path / folder / "table1-rotated.jsonl").open()]
        assert [r["layout"] for r in recs] == [layout]


def test_a_study_folder_never_mixes_layouts(tmp_path):
    # a record written before --layout existed is the bn-relu layout
    (tmp_path / "table1-upright.jsonl").write_text(json.dumps(
        {"label": "Z2CNN (28)", "seed": 0, "model": "z2cnn", "rule": "cosine"}) + "\n")
    with pytest.raises(ValueError, match="holds runs of --layout bn-relu, not paper"):
        gr.main(["table1", "--column", "rotated", *TINY, "--out", str(tmp_path)])
    assert not (tmp_path / "table1-rotated.jsonl").exists()
    gr.check_layout(tmp_path, "bn-relu")  # the same layout: accepted
    # ResNet records carry no layout and never conflict
    (tmp_path / "table2.jsonl").write_text(json.dumps(
        {"label": "ResNet (33)", "seed": 0, "model": "resnet44"}) + "\n")
    gr.check_layout(tmp_path, "bn-relu")
    old = gr.load_records(tmp_path / "table1-upright.jsonl")
    assert gr.layout_title(old) == ", layout bn-relu"
    assert gr.layout_title(gr.load_records(tmp_path / "table2.jsonl")) == ""


def test_prepare_and_rotate_fixed():
    x = torch.rand(3, 1, 28, 28)
    data = ImageDataset(x, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    big = prepare_images(data, 29)
    assert big.images.shape == (3, 1, 29, 29) and (big.images[..., 0, 0] == 0).all()
    same = prepare_images(data, 28)
    assert torch.equal(same.images, circle_crop(x))
    rot = rotate_fixed(same, torch.tensor([90.0, 180.0, 0.0]))
    assert torch.allclose(rot.images[0], torch.rot90(same.images[0], 1, (-2, -1)))
    assert torch.allclose(rot.images[2], same.images[2])
    assert circular_distance(350, 45) == 55 and circular_distance(45, 225) == 180


def test_splits_are_disjoint_and_checked():
    tr, va, te = gr.splits("digits", 29, 50, 20, 10)
    assert len(tr) == 50 and len(va) == 20 and len(te) == 10
    assert tr.images.shape[-1] == 29
    rows = {tuple(im.flatten().tolist()) for im in tr.images}
    assert not any(tuple(im.flatten().tolist()) in rows for im in va.images)
    with pytest.raises(ValueError, match="exceeds"):
        gr.splits("digits", 28, 10**6, 1, 1)


def test_table1_tiny_end_to_end_and_resume(tmp_path):
    gr.main(["table1", *TINY, "--out", str(tmp_path)])
    path = tmp_path / "table1-upright.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["label"] for r in recs] == [c[2] for c in gr.TABLE1]
    exact, approx = recs[1], recs[2]
    # exact size: the four right angles give the same accuracy; the errors are ~0
    assert len(set(exact["right"].values())) == 1
    assert exact["errors"][0]["parts"]["Late"]["mse"] < 1e-10
    assert approx["errors"][0]["parts"]["Late"]["nmse"] > 1e-4
    assert [e["epoch"] for e in exact["errors"]] == [0, 1]
    assert {r["rule"] for r in recs} == {"cosine"} and recs[0]["max_epochs"] == 1
    assert all(0 < r["cpu_s"] for r in recs)
    gr.main(["table1", *TINY, "--out", str(tmp_path)])  # everything done: nothing added
    assert len(path.read_text().splitlines()) == 3
    gr.main(["report", "--out", str(tmp_path)])
    table = (tmp_path / "table1.md").read_text()
    assert "P4CNN exact (28) | 1 |" in table and (tmp_path / "table1.png").exists()
    assert "| P4CNN approximate (29) | Final |" in (tmp_path / "errors.md").read_text()
    assert "| P4CNN exact (28) | 1 | 1 |" in (tmp_path / "table1-val.md").read_text()


def _curve(peak):
    return {str(float(a)): (1.0 if circular_distance(a, 45) <= peak else 0.5)
            for a in range(0, 360, 15)}


def test_report_biased_bands_and_rotated_column(tmp_path):
    recs = [{"label": "P4CNN exact (28) sigma 20", "seed": s, "sigma": 20.0,
             "curve": _curve(20)} for s in range(2)]
    (tmp_path / "biased.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rot = [{"label": "Z2CNN (28)", "seed": s, "rotated_test": acc}
           for s, acc in enumerate((0.8, 0.9))]
    (tmp_path / "table1-rotated.jsonl").write_text("\n".join(json.dumps(r) for r in rot))
    text = gr.biased_table(tmp_path)
    assert "| P4CNN exact (28) | 20 | 2 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in text
    table = gr.rotation_table(tmp_path, "table1-upright", "table1-rotated", "t.png")
    assert "0.850 ± 0.071 (2)" in table
