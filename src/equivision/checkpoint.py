"""Safe, atomic checkpoint files.

A checkpoint is a dict saved with ``torch.save`` that carries a format marker
(``"format": "equivision-checkpoint"``, ``"format_version": 1``), a SHA-256 checksum of
everything else in it (``"checksum"``: every tensor's dtype, shape and bytes and every
plain value; verified on load, so a flipped byte inside a weight is caught) and, for models
built with :func:`equivision.models.create_model`, the model name and keyword arguments, so that
:func:`equivision.models.model_from_checkpoint` can rebuild the model. Everything is loaded with
``torch.load(..., weights_only=True)``: checkpoints hold only tensors and plain Python values,
and files holding anything else are refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import write_with

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "check_weights_only_safe",
    "content_checksum",
]

FORMAT = "equivision-checkpoint"
FORMAT_VERSION = 1
#: the key holding :func:`content_checksum` of the rest of the checkpoint
CHECKSUM_KEY = "checksum"

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, corrupt, foreign or incompatible."""


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` if ``obj`` holds anything ``torch.load(weights_only=True)`` refuses.

    Allowed: tensors, None, bool, int, float, complex, str, bytes, torch.Size, torch.dtype and
    (nested) lists, tuples and dicts of these. NumPy arrays and scalars, sets and custom
    classes are not allowed; the message names the offending entry.
    """
    if isinstance(obj, Tensor):
        return
    if type(obj) in _PLAIN or isinstance(obj, (torch.Size, torch.dtype)):
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_weights_only_safe(k, f"{where} key {k!r}")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be loaded "
        "with torch.load(weights_only=True); convert it to a tensor or plain Python value"
    )


def _digest(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors, plain values, nested containers) into hash ``h``."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _digest(h, v)
    else:
        h.update(f"V{obj!r}".encode())


def content_checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint dict without its ``checksum`` entry: every tensor's
    dtype, shape and bytes and every plain value, keys in sorted order."""
    h = hashlib.sha256()
    _digest(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def _verify_checksum(obj: dict[str, Any], name: str) -> None:
    """Raise CheckpointError when ``obj``'s stored checksum does not match its content
    (checkpoints written before checksums existed have none and pass)."""
    stored = obj.get(CHECKSUM_KEY)
    if stored is not None and stored != content_checksum(obj):
        raise CheckpointError(
            f"checkpoint file {name!r} fails its checksum: its weights or settings were "
            "changed after it was written (a flipped bit on disk, a bad copy); restore it "
            "from a backup or retrain")


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically write the checkpoint dict ``state`` to ``path``; returns the path.

    The dict is written through :func:`equivision.io.write_with` (a temporary file in the
    same directory, flushed and fsynced, then moved over ``path`` with ``os.replace``):
    readers see either the old file or the complete new one, and a failure never leaves a
    partial file (the temporary file is removed and the exception re-raised). The format
    marker keys ``format``/``format_version`` are added. Parent directories are created.

    Raises:
        TypeError: ``state`` is not a dict or holds values that ``weights_only`` loading
            would refuse (nothing is written then).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    payload = dict(state)
    payload["format"] = FORMAT
    payload["format_version"] = FORMAT_VERSION
    check_weights_only_safe(payload, "checkpoint")
    payload[CHECKSUM_KEY] = content_checksum(payload)
    return write_with(path, lambda fh: torch.save(payload, fh))


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _short(e: BaseException) -> str:
    """A one-line summary of a torch.load error."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        text = next((line.strip() for line in rest.splitlines() if line.strip()), "")
    else:
        text = text.strip().splitlines()[0] if text.strip() else ""
        text = text.split(". ", 1)[0]
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _load_file(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a directory, not a file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"checkpoint file {str(path)!r} is empty (0 bytes)")
        magic = _magic(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {e}") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {e}") from e
    except Exception as e:
        raise _load_failure(path, e, size, magic) from None


def _code_detail(e: BaseException) -> str | None:
    """What a weights-only refusal names (``Unsupported global: GLOBAL posix.system``),
    whatever torch version worded it; None when ``e`` is not such a refusal."""
    text = str(e)
    lower = text.lower()
    if "unsupported global" in lower:
        line = text[lower.index("unsupported global"):].splitlines()[0]
        return line.split(" was not", 1)[0].split(" whose module", 1)[0].strip(" .")
    if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in lower:
        line = next((ln for ln in text.splitlines() if "GLOBAL" in ln), "")
        return line.split(" whose module", 1)[0].strip(" .") or None
    return None


def _load_failure(path: Path, e: BaseException, size: int, magic: bytes) -> CheckpointError:
    """The CheckpointError for a failed ``torch.load`` of ``path``."""
    detail = _code_detail(e)
    if detail is not None:
        return CheckpointError(
            f"checkpoint file {str(path)!r} carries code, not only weights: it contains "
            f"Python objects other than tensors and plain containers ({detail}). "
            "equivision refuses to unpickle arbitrary objects, which could run code; if "
            "you trust the file, load it yourself with torch.load(weights_only=False) and "
            "re-save its tensors")
    if magic[:1] == b"\x80":
        return CheckpointError(
            f"checkpoint file {str(path)!r} ({size} bytes) is a Python pickle that cannot "
            "be loaded with weights_only=True (a plain pickle of arbitrary objects, or a "
            "corrupted or old-format torch file); equivision refuses to unpickle arbitrary "
            f"objects [{_short(e)}]")
    if magic != b"PK\x03\x04":
        return CheckpointError(
            f"checkpoint file {str(path)!r} ({size} bytes) is not a PyTorch checkpoint: it "
            "is not a torch.save zip archive (it may be corrupted, or another kind of "
            f"file) [{_short(e)}]")
    return CheckpointError(
        f"checkpoint file {str(path)!r} ({size} bytes) is corrupt or truncated and cannot "
        f"be read; it may have been only partially written or copied [{_short(e)}]")

def load_checkpoint(
    path: PathLike,
    map_location: Any = "cpu",
    required_keys: Iterable[str] = ("model",),
) -> dict[str, Any]:
    """Load an equivision checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(..., weights_only=True)``.

    Raises:
        CheckpointError: (naming the file) the file is missing, empty, corrupt or truncated,
            holds arbitrary Python objects, does not hold a dict, lacks the equivision format
            marker (e.g. a bare state dict: use :func:`load_model_weights`), was written by a
            newer format version, or lacks one of ``required_keys``.
    """
    obj = _load_file(path, map_location)
    name = str(path)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint file {name!r} holds a {type(obj).__name__}, not a checkpoint dict"
        )
    if obj.get("format") != FORMAT:
        keys = ", ".join(map(repr, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
        raise CheckpointError(
            f"checkpoint file {name!r} is not an equivision checkpoint (no "
            f"'format': {FORMAT!r} marker; its keys are {keys or 'none'}). For a bare model "
            "state dict use load_model_weights()"
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {name!r} has format version {version!r}, but this equivision "
            f"reads versions up to {FORMAT_VERSION}; upgrade equivision"
        )
    _verify_checksum(obj, name)
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise CheckpointError(
            f"checkpoint file {name!r} lacks the key(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(map(repr, obj))}"
        )
    return obj


def _model_label(model: nn.Module) -> str:
    name = getattr(model, "equivision_name", None)
    return f"{name!r} ({type(model).__name__})" if name else type(model).__name__


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(map(repr, keys[:n]))
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _strip_prefix(state: dict[str, Any], model_keys: set[str]) -> dict[str, Any]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in model_keys
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_model_weights(
    model: nn.Module,
    source: PathLike | Mapping[str, Any],
    map_location: Any = "cpu",
) -> nn.Module:
    """Load weights into ``model`` from a file or dict; returns ``model``.

    ``source`` may be a path or an already loaded object; either a bare state dict (name ->
    tensor) or a checkpoint dict with the state dict under ``"model"``. A ``module.`` (DDP) or
    ``_orig_mod.`` (torch.compile) prefix on every key is removed.

    Raises:
        CheckpointError: unreadable file (see :func:`load_checkpoint`), no state dict inside,
            or missing / unexpected keys or shape mismatches (the message names the first
            offending keys and the model).
    """
    if isinstance(source, Mapping):
        return _load_weights(model, source, "state dict")
    obj = _load_file(source, map_location)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _verify_checksum(obj, str(source))
    return _load_weights(model, obj, f"checkpoint file {str(source)!r}")


def _load_weights(model: nn.Module, obj: Any, where: str) -> nn.Module:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state = dict(obj["model"])
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        raise CheckpointError(
            f"{where} holds neither a model state dict nor a checkpoint dict with a 'model' "
            f"state dict (got {type(obj).__name__})"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: the model state dict has non-tensor entries {_first(bad)}")
    expected = model.state_dict()
    state = _strip_prefix(state, set(expected))
    label = _model_label(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    shapes = [
        f"{k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        more = f" and {len(shapes) - 5} more" if len(shapes) > 5 else ""
        problems.append(f"shape mismatches {'; '.join(shapes[:5])}{more}")
    if problems:
        raise CheckpointError(
            f"{where} does not fit model {label}: {'; '.join(problems)}. Was it saved from a "
            "different architecture or different model arguments?"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where} does not fit model {label}: {e}") from e
    return model
