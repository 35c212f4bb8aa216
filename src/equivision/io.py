"""The one place that writes files: atomic writes of text, bytes, CSV tables, PNG
figures and torch payloads.

Every writer goes through :func:`write_atomic`: the data lands in a temporary file in
the target's folder, is flushed and fsynced, then moved over the target with
``os.replace``. Readers see the old file or the complete new one, never a partial
file, and a failure removes the temporary file and re-raises.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "write_with", "write_csv", "save_png", "fsync_dir",
           "check_report_set", "check_writable_dir", "check_writable_file",
           "write_report_set", "png_bytes", "MANIFEST"]

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


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_png(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Render a matplotlib figure to PNG, write it atomically and close the figure."""
    return write_atomic(path, png_bytes(fig, dpi))


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder: PathLike, what: str = "--out") -> Path:
    """Make sure files can be created in ``folder`` before any work is done, without
    creating anything: a missing folder is checked through its nearest existing
    ancestor (where it would be created). Returns ``folder`` as a Path.

    Raises:
        OSError: naming the path and ``what`` when ``folder`` (or an ancestor) is a
            file, or the folder does not accept new files (read-only, no permission,
            disk full).
    """
    path = Path(folder)
    base = _existing_ancestor(path)
    if not base.is_dir():
        where = "" if base == path.absolute() else f" ({str(base)!r} is a file)"
        raise NotADirectoryError(
            errno.ENOTDIR, f"{what} {str(path)!r} is a file, not a folder{where}; give a "
            "folder path")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".equivision-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"cannot write into {what} {str(path)!r}: "
                      f"{err.strerror or err}; choose another folder") from None
    return path


def check_writable_file(path: PathLike, what: str = "--json") -> Path:
    """Make sure ``path`` can be written as a file before any work is done (its folder
    is created and probed; ``path`` itself is left untouched).

    Raises:
        OSError: naming the path and ``what`` when ``path`` is a folder or its folder
            does not accept new files.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{what} {str(target)!r} is a folder; give a file path such as "
            f"{str(target / 'result.json')!r}")
    check_writable_dir(target.parent if str(target.parent) else ".", f"the folder of {what}")
    return target


def check_report_set(folder: PathLike, names: Iterable[str], what: str = "--out") -> Path:
    """Before any work: :func:`write_report_set` could write ``names`` into ``folder``
    (writable, and no file in the way that equivision did not write). Creates nothing.

    Raises:
        OSError: as :func:`write_report_set` would.
    """
    out = check_writable_dir(folder, what)
    if out.is_dir():
        _refuse_foreign(out, list(names), what)
    return out


#: the file in a report folder listing the files equivision wrote there
MANIFEST = ".equivision-files.json"


def _refuse_foreign(out: Path, names: Iterable[str], what: str) -> list[str]:
    """The names listed in ``out``'s manifest; raises when a file that is about to be
    replaced was not written by equivision (not in the manifest) or is a folder."""
    try:
        known = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = []
    known = [k for k in known if isinstance(k, str)] if isinstance(known, list) else []
    for name in names:
        if (out / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, f"{what} {str(out)!r} holds a folder "
                                    f"{name!r} where the report writes a file; move it away")
    foreign = [n for n in names if (out / n).exists() and n not in known]
    if foreign:
        raise FileExistsError(
            errno.EEXIST, f"{what} {str(out)!r} holds {', '.join(map(repr, foreign))}, "
            f"which equivision did not write; move it away or choose another {what}")
    return known


def write_report_set(folder: PathLike, files: Mapping[str, bytes],
                     what: str = "--out") -> dict[str, Path]:
    """Write a set of files ``{name: content}`` into ``folder`` all together or not at all.

    The set is written into a fresh temporary folder inside ``folder`` (fsynced), then
    each file is moved into place with ``os.replace``. When writing the set fails (disk
    full, read-only), nothing in ``folder`` has changed. Files of ``folder`` that are
    not in ``files`` are never touched, and a file in the way that equivision did not
    write (it is not listed in ``folder``'s :data:`MANIFEST`) is never overwritten.
    Returns ``{name: final path}``.

    Raises:
        OSError: naming ``folder`` and ``what`` (``FileExistsError`` for a file in the
            way that equivision did not write).
    """
    out = check_writable_dir(folder, what)
    bad = [n for n in files if Path(n).name != n or n.startswith(".")]
    if bad:
        raise ValueError(f"report file names must be plain names, got {bad}")
    out.mkdir(parents=True, exist_ok=True)
    known = _refuse_foreign(out, files, what)
    listing = json.dumps(sorted(set(known) | set(files)), indent=1).encode()
    files = {**files, MANIFEST: listing}
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".report-set."))
    try:
        for name, content in files.items():
            with open(staging / name, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(staging)
        for name in files:
            os.replace(staging / name, out / name)
        fsync_dir(out)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the report into {what} {str(out)!r}: "
                      f"{err.strerror or err}; the files there are unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out / name for name in files if name != MANIFEST}
