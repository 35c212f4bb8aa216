"""A report is a set of files: written all together or not at all, nothing else touched."""

import errno
import json
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from equivision.io import MANIFEST, check_writable_dir, check_writable_file, write_report_set
from equivision.measure import measure


def _disk_full_on_second_file(monkeypatch):
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_report_set_replaces_all_files_and_leaves_others(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    write_report_set(tmp_path, {"a.json": b"old", "b.csv": b"old"})
    paths = write_report_set(tmp_path, {"a.json": b"new", "b.csv": b"new"})
    assert {p.read_bytes() for p in paths.values()} == {b"new"}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "a.json", "b.csv",
                                                          "notes.txt"]


def test_disk_full_leaves_the_old_set_whole(tmp_path, monkeypatch):
    write_report_set(tmp_path, {"a.json": b"old", "b.png": b"old"})
    _disk_full_on_second_file(monkeypatch)
    with pytest.raises(OSError, match="No space left.*unchanged"):
        write_report_set(tmp_path, {"a.json": b"new", "b.png": b"new"})
    assert (tmp_path / "a.json").read_bytes() == b"old"
    assert (tmp_path / "b.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "a.json", "b.png"]


def test_measure_report_disk_full_keeps_old_report(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    rep = measure(model, TensorDataset(torch.rand(4, 1, 8, 8)), "rot90:1", progress=False)
    rep.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    rep.meta["run"] = "second"
    _disk_full_on_second_file(monkeypatch)
    with pytest.raises(OSError):
        rep.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "second" not in json.loads(before["report.json"])["meta"].get("run", "")


def test_out_that_is_a_file_or_json_that_is_a_folder(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(NotADirectoryError, match="--out .*'.*f' is a file"):
        check_writable_dir(tmp_path / "f")
    with pytest.raises(IsADirectoryError, match="--json .* is a folder"):
        check_writable_file(tmp_path)
    assert (tmp_path / "f").read_text() == "keep"


def read_only(monkeypatch):
    """Simulate a read-only file system (the tests may run as root, who ignores chmod)."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


def test_read_only_folder_is_refused_before_work(tmp_path, monkeypatch):
    (tmp_path / "report.json").write_text("old")
    read_only(monkeypatch)
    with pytest.raises(OSError, match="cannot write into --out .*Read-only.*another folder"):
        check_writable_dir(tmp_path)
    with pytest.raises(OSError):
        write_report_set(tmp_path, {"report.json": b"new"})
    assert (tmp_path / "report.json").read_text() == "old"


def test_a_file_equivision_did_not_write_is_never_overwritten(tmp_path):
    (tmp_path / "report.png").write_bytes(b"my own figure")
    with pytest.raises(FileExistsError, match="'report.png', which equivision did not write"):
        write_report_set(tmp_path, {"report.json": b"new", "report.png": b"new"})
    assert (tmp_path / "report.png").read_bytes() == b"my own figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]
    write_report_set(tmp_path / "sub", {"report.png": b"one"})
    write_report_set(tmp_path / "sub", {"report.png": b"two"})  # its own file: replaced
    assert (tmp_path / "sub" / "report.png").read_bytes() == b"two"
