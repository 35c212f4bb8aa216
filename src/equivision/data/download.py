"""``equivision data download NAME``: fetch a real dataset's official files, verified.

Nothing downloads unless this is called. Each file is streamed into a temporary file
in the target folder, its SHA-256 is checked, and only then is it moved into place
(:func:`equivision.io.write_with`); a mismatch or a failed transfer leaves no new file
and keeps any old one.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..io import write_with
from ..registry import UnknownNameError, suggest
from .real import REAL_DATASETS, default_download_root

__all__ = ["MIRROR_ENV", "ChecksumError", "DownloadError", "download_dataset", "sha256_of"]

#: environment variable overriding the base URL (``{name}`` in it becomes the dataset name)
MIRROR_ENV = "EQUIVISION_DATA_MIRROR"
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched (server error, no network); nothing was written."""


class ChecksumError(DownloadError, ValueError):
    """A fetched file's SHA-256 differs from the table; nothing was written."""


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_url(name: str, mirror: str | None) -> str:
    """The folder URL the files come from: ``mirror``, ``$EQUIVISION_DATA_MIRROR`` or the
    official one; ``{name}`` is replaced by the dataset name."""
    base = mirror or os.environ.get(MIRROR_ENV) or REAL_DATASETS[name].url
    base = base.replace("{name}", name)
    return base if base.endswith("/") else base + "/"


def _fetch_verified(url: str, target: Path, expected: str, timeout: float) -> None:
    """Stream ``url`` to ``target`` atomically, refusing it unless its SHA-256 is
    ``expected``."""

    def writer(fh: IO[bytes]) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                for block in iter(lambda: response.read(CHUNK), b""):
                    digest.update(block)
                    fh.write(block)
        except (urllib.error.URLError, OSError) as err:
            reason = (f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError)
                      else getattr(err, "reason", err))
            raise DownloadError(f"cannot fetch {url}: {reason}; nothing was written to "
                                f"{target}") from None
        if digest.hexdigest() != expected:
            kept = " (the existing file is kept)" if target.exists() else ""
            raise ChecksumError(
                f"checksum mismatch for {url}: SHA-256 {digest.hexdigest()}, expected "
                f"{expected}; nothing was written to {target}{kept}")

    write_with(target, writer)


def download_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    mirror: str | None = None,
    log: Callable[[str], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``name``'s official files into ``root/<name>/`` and return that folder.

    A file already there with the right SHA-256 is not fetched again.

    Args:
        name: a real dataset (``"fashion-mnist"``, ``"mnist"``).
        root: the folder holding dataset folders; default ``$EQUIVISION_DATA``, else
            ``~/.cache/equivision`` (where :func:`~equivision.data.resolve_dataset` looks).
        mirror: base URL to fetch ``<mirror>/<file>`` from instead of the official one
            (default ``$EQUIVISION_DATA_MIRROR``); ``{name}`` in it becomes ``name``.
        log: called with one line per file (e.g. ``print``).
        timeout: seconds to wait for the server.

    Raises:
        UnknownNameError: ``name`` is not a downloadable dataset.
        DownloadError: a file could not be fetched; ChecksumError: its SHA-256 is wrong.
            Either way that file was not written and any old copy is kept.
    """
    if name not in REAL_DATASETS:
        valid = sorted(REAL_DATASETS)
        raise UnknownNameError(f"unknown downloadable dataset {name!r}.{suggest(name, valid)} "
                               f"Valid names: {', '.join(valid)}")
    folder = Path(root).expanduser() if root is not None else default_download_root()
    folder = folder / name
    base = _base_url(name, mirror)
    created = not folder.exists()
    try:
        for file, expected in REAL_DATASETS[name].sha256.items():
            target = folder / file
            if target.is_file() and sha256_of(target) == expected:
                if log:
                    log(f"{target}: already present, checksum ok")
                continue
            _fetch_verified(base + file, target, expected, timeout)
            if log:
                log(f"{target}: downloaded, checksum ok")
    except DownloadError:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # leave nothing behind
        raise
    return folder
