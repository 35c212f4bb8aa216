"""The one place that writes files: atomic writes of text, bytes, CSV tables, PNG
figures and torch payloads.

Every writer goes through :func:`write_atomic`: the data lands in a temporary file in
the target's folder, is flushed and fsynced, then moved over the target with
``os.replace``. Readers see the old file or the complete new one, never a partial
file, and a failure removes the temporary file and re-raises.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "write_with", "write_csv", "save_png", "fsync_dir"]

PathLike = str | os.PathLike


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries to disk (so that a rename survives a crash); no-op where
    folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: PathLike, writer: Callable[[IO[bytes]], None]) -> Path:
    """Atomically create or replace ``path`` with what ``writer(binary_file)`` writes.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    Parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_atomic(path: PathLike, data: str | bytes) -> Path:
    """Atomically write ``data`` (text is encoded as UTF-8) to ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_with(path, lambda fh: fh.write(payload))


def write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Atomically write a CSV table; ``None`` cells are written empty."""
    buf = io.StringIO(newline="")
    out = csv.writer(buf)
    out.writerow(list(header))
    for row in rows:
        out.writerow(["" if v is None else v for v in row])
    return write_atomic(path, buf.getvalue())


def save_png(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Render a matplotlib figure to PNG, write it atomically and close the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
