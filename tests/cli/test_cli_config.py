"""``--config FILE``, ``--help`` defaults and ``--quiet`` on every subcommand."""

import argparse
import json
import sys

import pytest

from equivision.cli import main, make_parser
from equivision.cli.common import show_progress
from equivision.cli.config import apply_config


def subparsers():
    p = make_parser()
    return next(a for a in p._actions if hasattr(a, "choices") and a.choices).choices


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_every_subcommand_shows_defaults_and_has_quiet_and_config(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--quiet" in text and "--config FILE" in text
    parser = subparsers()[command]
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False) and \
                not action.option_strings[0].startswith("-h"):
            assert "default" in (action.help or ""), (command, action.option_strings)


def test_toml_config_sets_options_and_flags_win(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "cnn-small"\ndata = "digits"\nbatch_size = 32\n'
                   'epochs = 3\nquiet = true\naugment = "flip"\n')
    parser = make_parser()
    sub = subparsers_of(parser)["train"]
    apply_config(sub, cfg)
    args = parser.parse_args(["train", "--out", "o", "--epochs", "7"])
    assert (args.model, args.data, args.batch_size, args.quiet, args.augment) == \
        ("cnn-small", "digits", 32, True, "flip")
    assert args.epochs == 7  # the command line wins


def test_yaml_config_sets_options(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: cnn-small\ndata: digits\nbatch-size: 16\ndeterministic: true\n")
    parser = make_parser()
    apply_config(subparsers_of(parser)["train"], cfg)
    args = parser.parse_args(["train", "--out", "o"])
    assert (args.model, args.data, args.batch_size, args.deterministic) == \
        ("cnn-small", "digits", 16, True)


def subparsers_of(parser):
    return next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices


def test_json_config_runs_a_command(tmp_path, capsys):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"model": "cnn-small", "model-args": "width=4", "data": "digits",
                               "size": 12, "transforms": "rot90:1", "max-images": 4,
                               "out": str(tmp_path / "m"), "quiet": True}))
    assert main(["measure", "--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "m" / "report.json").read_text())["n_images"] == 4


@pytest.mark.parametrize("text, suffix, needle", [
    ('modle = "cnn7"\nlearning_rate = 1\n', ".toml", "unknown key(s) 'modle', 'learning_rate'"),
    ('epochs = "many"\n', ".toml", "key 'epochs'"),
    ('optimizer = "rmsprop"\n', ".toml", "'rmsprop' is not one of"),
    ('epochs = [1, 2\n', ".toml", "is not valid TOML"),
    ('[1, 2]', ".json", "must hold a table"),
    ('epochs: [1, 2\n', ".yaml", "is not valid YAML"),
    ('a: 1', ".ini", "use a"),
])
def test_bad_config_is_one_line(tmp_path, capsys, text, suffix, needle):
    cfg = tmp_path / f"run{suffix}"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(cfg) in err[0], err
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("out_tty, err_tty, quiet, shown", [
    (True, True, False, True), (False, True, False, False), (True, False, False, False),
    (True, True, True, False)])
def test_progress_bars_only_on_a_terminal_and_without_quiet(monkeypatch, out_tty, err_tty,
                                                             quiet, shown):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: out_tty, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: err_tty, raising=False)
    assert show_progress(argparse.Namespace(quiet=quiet)) is shown
