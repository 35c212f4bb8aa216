"""Opening a run's checkpoint and checking that a resumed run fits it.

A run directory holds ``last.pt``; a fresh run never overwrites it (``FileExistsError``),
a resumed one loads it and compares the stored configuration with the current one:
:func:`config_differences` names every differing key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, load_checkpoint

__all__ = ["config_differences", "open_checkpoint", "refuse_changes", "check_history"]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys (dotted for nested dicts) whose values differ, as ``"key: saved -> current"``.

    A key in ``ignore`` (or whose first part is) is left out; lists and tuples compare
    equal when their items do; a key missing on one side reads ``<absent>``.
    """
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignore or key in ignore:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, list) and isinstance(vb, (list, tuple)):
            vb = list(vb)
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def open_checkpoint(path: Path | None, resume: bool, required_keys: tuple[str, ...],
                    stacklevel: int = 3) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a fresh run.

    Raises:
        ValueError: ``resume`` without a path.
        FileExistsError: the checkpoint exists and ``resume`` is False.
        CheckpointError: it is unreadable or lacks one of ``required_keys``.
    """
    if resume and path is None:
        raise ValueError("resume=True needs the out_dir of the run to resume")
    if path is None:
        return None
    if path.exists():
        if not resume:
            raise FileExistsError(
                f"{str(path)!r} already exists: a run was already trained in "
                f"{str(path.parent)!r}. Pass resume=True to continue it, or choose another "
                "out_dir (or delete the old run) to start a new one")
        return load_checkpoint(path, required_keys=required_keys)
    if resume:
        warnings.warn(f"resume=True but there is no checkpoint {str(path)!r}; starting a "
                      "fresh run", stacklevel=stacklevel)
    return None


def refuse_changes(where: str, differences: list[str]) -> None:
    """Raise ``CheckpointError`` naming ``differences`` (if any): a resumed run must have
    the configuration its checkpoint was trained with."""
    if differences:
        raise CheckpointError(
            f"cannot resume from {where}: it was trained with another configuration; "
            f"differing keys: {'; '.join(differences)}. Use the same model and config to "
            "resume, or train into another out_dir")


def check_history(ckpt: dict[str, Any], keys: tuple[str, ...], where: str
                  ) -> tuple[int, dict[str, list[Any]]]:
    """The epoch counter and the per-epoch log of a checkpoint, checked to agree."""
    history = ckpt.get("history")
    if not isinstance(history, dict) or any(not isinstance(history.get(k), list)
                                            for k in keys):
        raise CheckpointError(f"{where} has a malformed training history")
    log = {k: list(history[k]) for k in keys}
    epoch = ckpt.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch != len(log[keys[0]]):
        raise CheckpointError(f"{where}: its epoch counter {epoch!r} does not match its log")
    return epoch, log
