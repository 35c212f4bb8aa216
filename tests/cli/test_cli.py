"""The `equivision` command end to end, on tiny sizes."""

import json

import pytest
import torch

from equivision.cli import main, make_parser
from equivision.io import write_report_set

SUBCOMMANDS = ["measure", "train", "demo", "list"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_for_each_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: equivision " + sub in capsys.readouterr().out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cnn7" in out and "digits" in out and "rot90" in out


def test_train_then_measure_with_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--data", "digits", "--size", "12",
                 "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    assert (run / "last.pt").exists() and (run / "log.csv").exists()
    out = tmp_path / "m"
    assert main(["measure", "--model", "cnn-small", "--checkpoint", str(run / "last.pt"),
                 "--data", "digits", "--size", "12", "--transforms", "rot90:1,shift:1-2",
                 "--max-images", "40", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "== rot90" in text and "mean per part" in text
    d = json.loads((out / "report.json").read_text())
    assert d["n_images"] == 40 and d["meta"]["checkpoint"].endswith("last.pt")
    assert {"invariance", "equivariance", "mse", "l1", "cosine"} <= set(d["results"][0]["metrics"])
    assert (out / "report.png").exists() and (out / "report.csv").exists()


def test_measure_rebuilds_the_model_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--model-args", "width=5", "--data", "digits",
                 "--size", "12", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    # no --model-args: width=5 comes from the checkpoint
    assert main(["measure", "--model", "cnn-small", "--checkpoint", str(run / "last.pt"),
                 "--data", "digits", "--size", "12", "--transforms", "hflip",
                 "--max-images", "8", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    d = json.loads((tmp_path / "m" / "report.json").read_text())
    assert d["results"][0]["n_channels"] == 5


def test_module_attr_model(tmp_path):
    out = tmp_path / "m"
    assert main(["measure", "--model", "equivision.measure.validation:gaussian_cnn",
                 "--data", "digits", "--size", "12", "--transforms", "rot90",
                 "--max-images", "16", "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "report.json").read_text())
    assert all(abs(r["metrics"]["invariance"] - 1) < 1e-4 for r in d["results"])


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet9000"], "unknown model"),
    (["--data", "imagenet"], "digits"),
    (["--transforms", "twirl"], "valid entries"),
    (["--model", "no_such_module:thing"], "cannot load model"),
])
def test_bad_names_give_clear_errors(tmp_path, capsys, args, message):
    base = {"--model": "cnn-small", "--data": "digits", "--transforms": "rot90"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["measure", "--size", "12", "--out", str(tmp_path / "o"), "--quiet"]
    for k, v in base.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err.lower()


def test_corrupt_or_foreign_checkpoint_keeps_existing_report(tmp_path, capsys):
    out = tmp_path / "o"
    write_report_set(out, {"report.json": b'{"earlier": true}'})  # an earlier run's report
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint at all")
    argv = ["measure", "--model", "cnn-small", "--data", "digits", "--size", "12",
            "--checkpoint", str(bad), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "bad.pt" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    argv[argv.index(str(bad))] = str(wrong)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "wrong.pt" in err and ("fc.weight" in err or "missing" in err)
    assert (out / "report.json").read_text() == '{"earlier": true}'


def test_parser_defaults():
    args = make_parser().parse_args(["measure", "--model", "m", "--data", "d", "--out", "o"])
    assert args.device == "auto" and args.split == "test"


def test_exactness_command(tmp_path, capsys):
    out = tmp_path / "ex.json"
    assert main(["exactness", "--model", "p4cnn", "--input-size", "29", "--range", "28:31",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-1] == "verdict: not exact"
    assert any("features.maxpool2" in line and "NO" in line for line in text)
    assert "exact sizes in 28..31: 28, 30" in text
    assert json.loads(out.read_text())["verdict"] == "not exact"
    assert main(["exactness", "--model", "p4cnn", "--input-size", "28"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "verdict: exact"
    assert main(["exactness", "--model", "p4cnn", "--input-size", "big"]) == 2
    assert "HxW" in capsys.readouterr().err


def test_list_every_registry(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attacks:") and "bpda-eot" in out and "cnn7" not in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for what, name in [("defenses", "equivariance-reference"), ("methods", "mocov3"),
                       ("models", "p4cnn"), ("datasets", "digits6-roteq")]:
        line = next(ln for ln in out.splitlines() if ln.startswith(what + ":"))
        assert name in line


def test_version(capsys):
    from equivision import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"equivision {__version__}"


def test_python_dash_m_equivision():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import equivision

    src = str(Path(equivision.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for module in ("equivision", "equivision.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("equivision ")


def test_unknown_model_suggests_a_name(tmp_path, capsys):
    assert main(["exactness", "--model", "p4cnm", "--input-size", "28"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown model 'p4cnm'. Did you mean 'p4cnn'" in err and "Valid names:" in err


def test_no_import_cycle_between_command_groups():
    """Every command module imports only common.py from the cli package."""
    import ast
    from pathlib import Path

    import equivision.cli as cli

    folder = Path(cli.__file__).parent
    for path in folder.glob("*.py"):
        if path.stem in ("main", "__init__", "__main__", "common"):
            continue
        tree = ast.parse(path.read_text())
        siblings = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert siblings <= {"common"}, (path.name, siblings)


def test_exactness_translation_mode_and_in_channels(tmp_path, capsys):
    """--translation prints the shift table and writes its JSON; --in-channels lets the
    analyzer run a model whose first layer has no convolution weight to read them from."""
    out = tmp_path / "tr.json"
    assert main(["exactness", "--model", "cnn7", "--input-size", "28", "--translation",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "aliasing at features.maxpool2" in text and text.strip().endswith("verdict: exact")
    data = json.loads(out.read_text())
    assert data["shifts"] == [2, 2] and data["aliasing"] == ["features.maxpool2"]
    assert main(["exactness", "--model", "cnn7", "--input-size", "28", "--in-channels", "1"]) == 0
    assert "weights: unconstrained" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(["exactness", "--model", "cnn7", "--input-size", "28", "--in-channels", "0"])
    assert bad.value.code == 2


def test_train_a_dict_output_model_with_its_output_key(tmp_path):
    """A model whose forward returns a dict (Hugging Face style) trains on the entry
    ``--output-key`` names (default: ``logits``); a wrong key or a dict whose logits
    cannot be found is a one-line error that says how to pick them."""
    common = ["train", "--model", "others_models:DictOutCNN", "--data", "digits",
              "--size", "12", "--epochs", "1", "--batch-size", "256", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "last.pt").exists()
    assert main([*common, "--model-args", "key='scores'", "--output-key", "scores",
                 "--out", str(tmp_path / "b")]) == 0
    assert main([*common, "--output-key", "features", "--out", str(tmp_path / "c")]) == 2
    assert main([*common, "--model-args", "key='scores'", "--out", str(tmp_path / "d")]) == 2


def test_train_a_module_attr_model_then_measure_and_resume_it(tmp_path):
    """``train --model module:attr``: the user's model gets only its --model-args (no
    num_classes / in_channels it may not take); measure takes it back from last.pt."""
    run, out = tmp_path / "run", tmp_path / "m"
    train_args = ["train", "--model", "others_models:TinyConvNeXt", "--model-args",
                  "in_channels=1", "--data", "digits", "--size", "16", "--batch-size", "128",
                  "--out", str(run), "--quiet"]
    assert main([*train_args, "--epochs", "1"]) == 0
    assert main(["measure", "--model", "others_models:TinyConvNeXt", "--model-args",
                 "in_channels=1", "--checkpoint", str(run / "last.pt"), "--data", "digits",
                 "--size", "16", "--transforms", "rot90", "--max-images", "16",
                 "--no-random-init", "--out", str(out), "--quiet"]) == 0
    layers = {r["layer"] for r in json.loads((out / "report.json").read_text())["results"]}
    assert {"stem", "stages.0.norm", "stages.1.pwconv2"} <= layers
    assert main([*train_args, "--epochs", "2", "--resume"]) == 0
