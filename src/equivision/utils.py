"""Device selection, seeding and RNG-state helpers."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "DeviceError",
    "resolve_device",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
    "preserve_rng_state",
    "model_device",
    "model_dtype",
]

try:  # numpy is a dependency, but keep the helpers usable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


class DeviceError(ValueError):
    """A requested device that is malformed or not available on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


_DEVICE_RE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (or a torch.device)
    into a ``torch.device`` that exists on this machine.

    ``"auto"`` (or None) picks CUDA if available, else MPS, else the CPU.

    Raises:
        DeviceError: a malformed name, or a device that is not available (e.g. ``"cuda"`` on a
            machine without a usable GPU, or ``"cuda:3"`` with only two GPUs).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    text = str(device).strip().lower()
    match = _DEVICE_RE.match(text)
    if match is None:
        raise DeviceError(
            f"unknown device {str(device)!r}; use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'"
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {text!r} was requested but CUDA is not available (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda}); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise DeviceError(
                f"device {text!r} was requested but only {count} CUDA device(s) are visible "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    elif kind == "mps" and not _mps_available():
        raise DeviceError(
            f"device {text!r} was requested but MPS (Apple GPU) is not available; "
            "use 'cpu' or 'auto'"
        )
    return torch.device(text)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and all CUDA devices).

    With ``deterministic=True`` also ask torch for deterministic algorithms (warning, not
    failing, where none exists) and turn off cuDNN autotuning.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def get_rng_state() -> dict[str, Any]:
    """Snapshot of all global RNG states as plain tensors / Python scalars.

    The result contains only tensors, ints, floats and None, so it can be saved in a
    checkpoint and loaded with ``torch.load(..., weights_only=True)``. Keys: ``torch``
    (uint8 tensor), ``cuda`` (list of uint8 tensors or None), ``python`` (dict), ``numpy``
    (dict or None).
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": None,
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`get_rng_state`.

    The CUDA states are restored only if CUDA is available with the same number of devices.
    """
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
    py = state.get("python")
    if py is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    npy = state.get("numpy")
    if npy is not None and np is not None:
        np.random.set_state(
            (
                npy["name"],
                np.asarray(npy["keys"].tolist(), dtype=np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )


@contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Context manager that restores all global RNG states on exit.

    Code run inside (e.g. training callbacks) can then use random numbers without changing
    the random stream that the surrounding code sees.
    """
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def model_device(module: torch.nn.Module, default: str | torch.device = "cpu") -> torch.device:
    """The device of a module's first parameter (or buffer); ``default`` when it has none."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device(default)


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (or buffer), the dtype its
    inputs must have; ``torch.float32`` when it has none."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextmanager
def evaluating(model: Any, enabled: bool = True) -> Iterator[None]:
    """Run the block with ``model`` (an ``nn.Module``) and all its submodules in eval mode,
    then restore each submodule's own mode: the model is left as it was found (BatchNorm
    statistics and dropout untouched). Other callables, or ``enabled=False``, run as they
    are."""
    if not enabled or not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
