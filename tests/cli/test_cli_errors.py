"""Bad inputs and faults on the command line: one line on stderr, exit status 2, no
traceback, and nothing lost or overwritten."""

import errno
import json
import os
import tempfile

import pytest
import torch

from equivision.cli import main

TINY_TRAIN = ["--model", "cnn-small", "--model-args", "width=4", "--data", "digits",
              "--size", "12", "--epochs", "1", "--batch-size", "64", "--quiet"]
TINY_MEASURE = ["--model", "cnn-small", "--model-args", "width=4", "--data", "digits",
                "--size", "12", "--transforms", "rot90:1", "--max-images", "8", "--quiet"]


def one_error_line(capsys, needle=""):
    """The command printed exactly one line on stderr (no traceback), holding ``needle``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and needle in err[0], err[0]
    return err[0]


def argparse_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not yours")
    assert main(["measure", *TINY_MEASURE, "--out", str(target)]) == 2
    one_error_line(capsys, f"--out '{target}' is a file")
    assert target.read_text() == "not yours"


@pytest.mark.parametrize("command", [
    ["attack", "--model", "cnn-small", "--data", "digits", "--size", "12", "--steps", "1"],
    ["exactness", "--model", "p4cnn-small", "--input-size", "28"],
])
def test_json_that_is_a_folder_fails_before_computing(tmp_path, capsys, command):
    assert main([*command, "--json", str(tmp_path)]) == 2
    one_error_line(capsys, "--json")
    assert list(tmp_path.iterdir()) == []


def test_read_only_out_fails_before_measuring_and_keeps_the_old_report(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "m"
    assert main(["measure", *TINY_MEASURE, "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["measure", *TINY_MEASURE, "--out", str(out)]) == 2
    line = one_error_line(capsys, "Read-only file system")
    assert str(out) in line and "another folder" in line
    assert snapshot(out) == before


def test_disk_full_while_writing_the_report_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    assert main(["measure", *TINY_MEASURE, "--out", str(out)]) == 0
    (out / "mine.txt").write_text("a file measure did not write")
    before = snapshot(out)
    capsys.readouterr()
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["measure", *TINY_MEASURE, "--seed", "3", "--out", str(out)]) == 2
    one_error_line(capsys, "No space left on device")
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".report-set")]


def test_existing_run_without_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 2
    line = one_error_line(capsys, "add --resume")
    assert "resume=True" not in line and str(run) in line
    assert (run / "last.pt").read_bytes() == before


def test_resume_with_other_augment_or_data_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY_TRAIN, "--epochs", "2", "--augment", "flip", "--out", str(run),
                 "--resume"]) == 2
    one_error_line(capsys, "augment: 'none' -> 'flip'")
    assert (run / "last.pt").read_bytes() == before
    other_data = [a if a != "digits" else "digits6" for a in TINY_TRAIN]
    assert main(["train", *other_data, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    one_error_line(capsys, "data: 'digits' -> 'digits6'")
    assert (run / "last.pt").read_bytes() == before


def test_train_seed_gives_identical_weights(tmp_path):
    for name in ("a", "b"):
        assert main(["train", *TINY_TRAIN, "--seed", "5", "--deterministic",
                     "--out", str(tmp_path / name)]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["run_info"]["input_shape"] == [1, 12, 12]
    assert a["run_info"]["normalization"].startswith("none")


@pytest.mark.parametrize("argv, needle", [
    (["measure", *TINY_MEASURE, "--size", "0", "--out", "x"], "must be >= 1 pixel"),
    (["attack", "--model", "cnn-small", "--data", "digits", "--eps", "2"], "[0, 1]"),
    (["attack", "--model", "cnn-small", "--data", "digits", "--eps", "-0.1"], "[0, 1]"),
    (["train", *TINY_TRAIN, "--size", "-3", "--out", "x"], "must be >= 1 pixel"),
])
def test_bad_numbers_are_clear_argparse_errors(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    argparse_error(capsys, argv, needle)
    assert list(tmp_path.iterdir()) == []


def test_range_backwards(tmp_path, capsys):
    assert main(["exactness", "--model", "p4cnn-small", "--input-size", "28",
                 "--range", "40:20", "--json", str(tmp_path / "e.json")]) == 2
    one_error_line(capsys, "--range A:B needs 1 <= A <= B, got '40:20'")
    assert not (tmp_path / "e.json").exists()


def test_measure_without_checkpoint_says_random_weights(tmp_path, capsys):
    assert main(["measure", *TINY_MEASURE, "--out", str(tmp_path / "m")]) == 0
    assert "random weights" in capsys.readouterr().out


def test_module_attr_model_from_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels_cli_test.py").write_text(
        "from torch import nn\n"
        "def factory():\n"
        "    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert main(["measure", "--model", "mymodels_cli_test:factory", "--data", "digits",
                 "--size", "12", "--transforms", "rot90:1", "--max-images", "4", "--quiet",
                 "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "report.json").read_text())["n_images"] == 4


def test_no_progress_bars_when_output_is_not_a_terminal(tmp_path, capsys):
    # no --quiet: stderr is captured (not a terminal), so no bar lines are written
    assert main(["measure", *TINY_MEASURE[:-1], "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().err == ""


def test_code_carrying_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": RunsCode()}, evil)
    assert main(["measure", *TINY_MEASURE, "--checkpoint", str(evil),
                 "--out", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys, "carries code")
    assert "corrupt" not in line
    assert not (tmp_path / "m" / "report.json").exists()


def test_other_input_size_warns(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    argv = [a if a != "12" else "16" for a in TINY_MEASURE]
    assert main(["measure", *argv, "--checkpoint", str(run / "last.pt"),
                 "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "trained on 1x12x12 images, these are 1x16x16" in err and "--size 12" in err


def test_measure_never_overwrites_a_report_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "report.csv").write_text("the user's own table")
    assert main(["measure", *TINY_MEASURE, "--out", str(out)]) == 2
    one_error_line(capsys, "'report.csv', which equivision did not write")
    assert sorted(p.name for p in out.iterdir()) == ["report.csv"]
    assert (out / "report.csv").read_text() == "the user's own table"
