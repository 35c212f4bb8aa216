"""`equivision attack` and `equivision defend` end to end, on tiny sizes."""

import json

import pytest
import torch
from torch.utils.data import Subset

from equivision.cli import main
from equivision.data import get_dataset
from equivision.models import create_model
from equivision.robust.heads import RotationHead
from equivision.robust.registry import save_head
from equivision.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "digits", "--size", "12", "--max-images", "8", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    """``last.pt`` of a cnn-small (width 4) trained for 3 epochs on 400 digits at 12 px."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = create_model("cnn-small", width=4)
    train(model, Subset(get_dataset("digits", split="train", size=12), range(400)),
          config=TrainConfig(epochs=3, batch_size=32, lr=0.02, optimizer="adam",
                             weight_decay=0.0, seed=0, device="cpu"),
          out_dir=out, progress=False)
    return str(out / "last.pt")


@pytest.mark.parametrize("sub", ["attack", "defend"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: equivision " + sub in capsys.readouterr().out


def test_attack_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "attack.json"
    assert main(["attack", "--checkpoint", checkpoint, *DATA, "--attack", "pgd,fgsm",
                 "--eps", "0.3", "--steps", "2", "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| pgd | model |" in text and "| fgsm | model |" in text and f"wrote {out}" in text
    d = json.loads(out.read_text())
    assert d["n_images"] == 8 and [r["name"] for r in d["rows"]] == ["clean", "pgd", "fgsm"]
    assert d["meta"]["checkpoint"] == checkpoint and d["meta"]["eps"] == 0.3
    clean = d["rows"][0]["undefended"]["accuracy"]
    assert clean > 0
    assert d["rows"][1]["undefended"]["accuracy"] <= clean
    assert d["rows"][1]["defended"] is None


def test_defend_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "defend.json"
    assert main(["defend", "--checkpoint", checkpoint, *DATA, "--defense", "equivariance",
                 "--eps-v", "16/255", "--defense-steps", "2", "--attack",
                 "pgd,bpda-eot,adaptive", "--eps", "8/255", "--steps", "2", "--eot-samples",
                 "2", "--lambda-e", "0,1", "--repeats", "2", "--json", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| bpda-eot | defense |" in text and "equiv. restored" in text
    d = json.loads(out.read_text())
    assert d["meta"]["defense"] == "EquivarianceDefense"
    assert d["meta"]["defense_settings"]["eps_v"] == pytest.approx(16 / 255)
    assert d["meta"]["lambdas"] == [0.0, 1.0] and d["meta"]["repeats_used"] == 2
    assert [r["attack_target"] for r in d["rows"]] == [None, "model", "defense", "defense"]
    for row in d["rows"]:
        assert 0 <= row["defended"]["accuracy"] <= row["defended_single"]["accuracy"] <= 1
        assert set(row["equivariance"]) == {"clean", "attacked", "restored",
                                             "attacked - clean", "restored - attacked"}
        assert set(row["intervals"]["equivariance"]) == set(row["equivariance"])
        assert row["equivariance"]["restored"] is not None


def test_defend_with_a_head_file(checkpoint, tmp_path, capsys):
    head = save_head(tmp_path / "head.pt", RotationHead(4, hidden=8), "features.relu3")
    assert main(["defend", "--checkpoint", checkpoint, *DATA, "--defense", "rotation",
                 "--head", str(head), "--defense-steps", "1", "--attack", "pgd",
                 "--steps", "1", "--no-progress"]) == 0
    assert "| pgd | model |" in capsys.readouterr().out


BAD = [
    (["attack", "--eps", "0"], "eps must be a finite number > 0"),
    (["attack", "--attack", "pgd,zap"], "unknown attack 'zap'. Valid names: adaptive"),
    (["defend", "--defense", "magic"], "unknown defense 'magic'. Valid names: contrastive"),
    (["defend", "--feature-layer", "conv9"], "unknown feature layer 'conv9'"),
    (["attack", "--model", "segmenter"], "holds a 'cnn-small' model, not 'segmenter'"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line(checkpoint, capsys, args, message):
    argv = [args[0], "--checkpoint", checkpoint, *DATA, "--steps", "1", "--defense-steps", "1",
            "--no-progress", *args[1:]] if args[0] == "defend" else \
        [args[0], "--checkpoint", checkpoint, *DATA, "--steps", "1", "--no-progress", *args[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"equivision {args[0]}: error:")
    assert message in err


def test_labels_that_do_not_fit_and_debug_traceback(capsys, monkeypatch):
    argv = ["attack", "--model", "segmenter", "--model-args", "in_channels=1,width=4", *DATA,
            "--steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not match the model output" in err
    monkeypatch.setenv("EQUIVISION_DEBUG", "1")
    with pytest.raises(ValueError, match="do not match"):
        main(argv)


def test_missing_model_is_an_error(capsys):
    assert main(["attack", *DATA]) == 2
    assert "give --checkpoint PATH" in capsys.readouterr().err
