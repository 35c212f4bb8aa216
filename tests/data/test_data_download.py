"""``equivision data download``: verified, atomic downloads from a local HTTP server the
tests start (no internet needed; nothing downloads unless asked)."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from datafiles import STEMS, idx_bytes

from equivision.cli.main import main
from equivision.data import (
    ChecksumError,
    DownloadError,
    download_dataset,
    real,
    resolve_dataset,
)
from equivision.data.download import MIRROR_ENV, sha256_of
from equivision.registry import UnknownNameError

NAME = "tiny-mnist"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """``(base URL, served folder, requested paths)`` of an HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})

    def make(*args, **kw):
        return handler(*args, directory=str(served), **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def tiny(server, monkeypatch):
    """A downloadable dataset ``tiny-mnist`` whose four files the server holds in
    ``served/tiny-mnist/``; returns ``(mirror URL, served folder, requests)``."""
    url, served, requests = server
    folder = served / NAME
    folder.mkdir()
    rng = np.random.default_rng(0)
    sums = {}
    for split, n in (("train", 20), ("test", 5)):
        arrays = (rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), np.arange(n) % 10)
        for stem, arr in zip(STEMS[split], arrays):
            path = folder / f"{stem}.gz"
            path.write_bytes(gzip.compress(idx_bytes(arr)))
            sums[path.name] = sha256_of(path)
    spec = real.RealDataset(NAME, "http://127.0.0.1:9/never/", sums,
                            tuple(str(k) for k in range(10)))
    monkeypatch.setitem(real.REAL_DATASETS, NAME, spec)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return url + "{name}/", folder, requests


def test_download_success_then_resolves(tmp_path, tiny):
    mirror, served, requests = tiny
    lines: list[str] = []
    folder = download_dataset(NAME, root=tmp_path / "data", mirror=mirror, log=lines.append)
    assert folder == tmp_path / "data" / NAME
    for f in served.iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes()
    assert len(requests) == 4 and len(lines) == 4 and all("checksum ok" in s for s in lines)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in served.iterdir())
    ds = resolve_dataset(NAME, "test", root=tmp_path / "data")
    assert len(ds) == 5 and ds.image_shape == (1, 6, 6)


def test_already_present_is_not_downloaded_again(tmp_path, tiny):
    mirror, _, requests = tiny
    download_dataset(NAME, root=tmp_path, mirror=mirror)
    requests.clear()
    lines: list[str] = []
    download_dataset(NAME, root=tmp_path, mirror=mirror, log=lines.append)
    assert requests == [] and all("already present" in s for s in lines)


def test_checksum_mismatch_writes_nothing_and_keeps_the_old_file(tmp_path, tiny):
    mirror, served, _ = tiny
    target = tmp_path / NAME
    target.mkdir()
    old = target / "train-images-idx3-ubyte.gz"
    old.write_bytes(b"old contents")
    (served / old.name).write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=r"checksum mismatch .*train-images.*nothing was "
                       r"written .*existing file is kept") as err:
        download_dataset(NAME, root=tmp_path, mirror=mirror)
    assert "\n" not in str(err.value)
    assert old.read_bytes() == b"old contents"
    assert [p.name for p in target.iterdir()] == [old.name]  # no temporary file left


def test_server_error_writes_nothing(tmp_path, tiny):
    mirror, served, _ = tiny
    (served / "t10k-images-idx3-ubyte.gz").unlink()  # the server answers 404
    with pytest.raises(DownloadError, match=r"cannot fetch .*t10k-images.*: HTTP 404"):
        download_dataset(NAME, root=tmp_path, mirror=mirror)
    assert not (tmp_path / NAME / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in (tmp_path / NAME).iterdir() if p.name.startswith(".")]


def test_unreachable_server(tmp_path, tiny):
    with pytest.raises(DownloadError, match="cannot fetch http://127.0.0.1:9/"):
        download_dataset(NAME, root=tmp_path, mirror="http://127.0.0.1:9/", timeout=5)
    assert not (tmp_path / NAME).exists()  # not even an empty folder


def test_mirror_from_environment_and_default_root(tmp_path, tiny, monkeypatch):
    mirror, _, requests = tiny
    monkeypatch.setenv(MIRROR_ENV, mirror)
    monkeypatch.setenv(real.DATA_ENV, str(tmp_path / "envroot"))
    folder = download_dataset(NAME)
    assert folder == tmp_path / "envroot" / NAME and len(requests) == 4
    assert all(r.startswith(f"/{NAME}/") for r in requests)


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'fashion-mnist'"):
        download_dataset("fashion-mnst")


def test_official_table_lists_four_sha256_per_dataset():
    for spec in real.REAL_DATASETS.values():
        assert sorted(spec.sha256) == sorted(f"{s}.gz" for pair in STEMS.values() for s in pair)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.sha256.values())
        assert spec.url.startswith("http") and spec.url.endswith("/")


def test_cli_download_and_list(tmp_path, tiny, capsys, no_default_data):
    mirror, _, _ = tiny
    root = tmp_path / "cli"
    assert main(["data", "download", NAME, "--root", str(root), "--mirror", mirror]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: {root / NAME}" in out and out.count("checksum ok") == 4
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert "digits" in listing and "fashion-mnist" in listing
    assert "not found; `equivision data download fashion-mnist`" in listing
    (Path(tiny[1]) / "train-labels-idx1-ubyte.gz").write_bytes(b"bad")
    (root / NAME / "train-labels-idx1-ubyte.gz").unlink()
    assert main(["data", "download", NAME, "--root", str(root), "--mirror", mirror]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.count("\n") == 1
    assert hashlib.sha256(b"bad").hexdigest() in err
