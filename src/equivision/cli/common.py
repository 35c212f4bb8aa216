"""What every ``equivision`` subcommand shares: the user-error type (one line, exit status
2), argument parsers for numbers and ``key=value`` lists, model loading from the command
line and the ``torchrun`` session."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..data import resolve_dataset
from ..io import check_writable_dir, write_atomic
from ..models import create_model, model_defaults

__all__ = ["CLIError", "DATA_ROOT_ENV", "add_data_options", "add_output_key", "check_new_run",
           "distributed_session", "finite", "fit_to_data", "image_size", "load_model",
           "names", "number", "parse_kwargs", "positive_int", "resolve_dataset",
           "show_progress", "unit_interval", "warn_other_input", "write_json"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _output_key(text: str) -> str | int:
    """``--output-key``: an integer is an index into a tuple output, anything else a key."""
    try:
        return int(text)
    except ValueError:
        return text


def add_output_key(p: argparse.ArgumentParser) -> None:
    """``--output-key``: which entry of a dict or tuple output holds the logits
    (:func:`~equivision.robust.select_output`)."""
    p.add_argument("--output-key", type=_output_key, default=None,
                   help="the logits in a model whose forward returns a dict or tuple: a key "
                   "or an index (default: 'logits' or 'out' of a dict, item 0 of a tuple)")


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``"width=8,num_classes=6"`` -> ``{"width": 8, "num_classes": 6}`` (Python literals)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"bad model argument {item!r}; write key=value, e.g. width=8")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def names(text: str) -> list[str]:
    """``"pgd, fgsm,"`` -> ``["pgd", "fgsm"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _float_arg(text: str, parse: Callable[[str], float], hint: str = "") -> float:
    """``parse(text)``, as an argparse type that accepts finite values only."""
    try:
        value = parse(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}{hint}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _fraction(text: str) -> float:
    num, sep, den = str(text).partition("/")
    return float(num) / float(den) if sep else float(num)


def number(text: str) -> float:
    """An argparse type: a finite float, also written as a fraction (``0.03``, ``8/255``)."""
    return _float_arg(text, _fraction, " (write e.g. 0.03 or 8/255)")


def finite(text: str) -> float:
    """An argparse type: a finite float."""
    return _float_arg(text, float)


def _int_at_least(text: str, low: int, rule: str) -> int:
    """``int(text)``, as an argparse type that accepts values >= ``low`` only."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "must be >= 1")


def fit_to_data(spec: str, kwargs: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """``kwargs`` of registry model ``spec`` with the class count, the channels and (ViT /
    Mixer) the image size of ``dataset`` where not given; a ``module:attr`` model gets
    only its own arguments."""
    if ":" in spec:
        return kwargs
    out = dict(kwargs)
    shape = getattr(dataset, "image_shape", None)
    if getattr(dataset, "num_classes", None) is not None:
        out.setdefault("num_classes", dataset.num_classes)
    if shape is not None:
        out.setdefault("in_channels", shape[0])
        if "image_size" in model_defaults(spec):
            out.setdefault("image_size", shape[-1])
    return out


def load_model(spec: str, model_args: str | None, checkpoint: str | None,
               dataset: Any = None) -> tuple[nn.Module, str]:
    """``--model``, ``--model-args`` and ``--checkpoint`` -> (model, its display name):
    :func:`equivision.models.create_model` with the parsed arguments; without a
    checkpoint a registry model is built for ``dataset`` (:func:`fit_to_data`). A
    ``module:attr`` model is imported with the current folder on the import path (as
    ``python`` does)."""
    if ":" in spec and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    kwargs = parse_kwargs(model_args)
    if checkpoint is None and dataset is not None:
        kwargs = fit_to_data(spec, kwargs, dataset)
    model = create_model(spec, checkpoint=checkpoint, **kwargs)
    return model, spec.partition(":")[2] or spec


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (non-JSON values as
    strings)."""
    write_atomic(path, json.dumps(payload, indent=1, default=str))


def check_new_run(out: str, resume: bool, checkpoint: str = "last.pt") -> Path:
    """Before any work: ``--out`` must be a writable folder, and must not hold a run
    unless ``--resume`` is given (an old run is never overwritten)."""
    folder = check_writable_dir(out, "--out")
    if (folder / checkpoint).exists() and not resume:
        raise CLIError(f"--out {out!r} already holds a run ({folder / checkpoint}); add "
                       "--resume to continue it, or choose another --out")
    return folder


def _init_distributed(device: torch.device) -> int:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); returns
    this process's rank (0 when not distributed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.get_rank() if dist.is_initialized() else 0
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank()


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[int]:
    """``with distributed_session(device) as rank:`` joins the process group under
    ``torchrun`` and, if it started it, waits for every rank and tears it down at the
    end (a gloo group left open when the process exits aborts it)."""
    started = dist.is_available() and not dist.is_initialized()
    rank = _init_distributed(device)
    started = started and dist.is_initialized()
    try:
        yield rank
        if started:
            dist.barrier()  # rank 0 has written its files
    finally:
        if started:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data

#: environment variable naming the default ``--data-root``
DATA_ROOT_ENV = "EQUIVISION_DATA"


def add_data_options(p: argparse.ArgumentParser, dest: str = "data",
                     required: bool = True, default: str | None = None,
                     aliases: tuple[str, ...] = ()) -> None:
    """``--data SPEC`` and ``--data-root DIR`` (default: ``$EQUIVISION_DATA``)."""
    p.add_argument(*aliases, "--data", dest=dest, required=required, default=default,
                   help="a built-in dataset name (see `equivision list datasets`), a dataset "
                   "folder (MNIST IDX, CIFAR pickles, one folder per class) or module:attr")
    p.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV),
                   help=f"where named datasets are looked for (default: ${DATA_ROOT_ENV}, "
                   "then the system dataset folders)")


def image_size(text: str) -> int:
    """An argparse type for ``--size``: an image side of at least 1 pixel."""
    return _int_at_least(text, 1, "an image size must be >= 1 pixel")


def unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1] (images live in [0, 1]), also as a fraction."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1] (pixel values are in [0, 1]), got {text!r}; e.g. 8/255")
    return value


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: not with ``--quiet``, and only when both stdout and
    stderr are terminals (``equivision ... > log`` gets no bar lines anywhere)."""
    return not getattr(args, "quiet", False) and sys.stdout.isatty() and sys.stderr.isatty()


def warn_other_input(checkpoint: str | None, dataset: Any, command: str) -> str | None:
    """Warn (on stderr) when ``dataset``'s images differ in shape from those the
    checkpoint was trained on (``run_info["input_shape"]``, written by ``equivision
    train``); returns the warning, or None. Bare state dicts carry no shape: no check."""
    if checkpoint is None or not hasattr(dataset, "image_shape"):
        return None
    try:
        info = load_checkpoint(checkpoint).get("run_info") or {}
    except CheckpointError:
        return None  # a bare state dict; the model loader reports real problems
    trained, now = info.get("input_shape"), list(dataset.image_shape)
    if not trained or list(trained) == now:
        return None
    text = (f"equivision {command}: warning: {checkpoint} was trained on "
            f"{'x'.join(map(str, trained))} images, these are {'x'.join(map(str, now))}; "
            f"pass --size {trained[-1]} to match")
    print(text, file=sys.stderr)
    return text


def parse_token_grid(text: str | None) -> tuple[int, ...] | None:
    """``--token-grid h,w[,prefix]`` -> a tuple of 2 or 3 ints (None when not given)."""
    if not text:
        return None
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) not in (2, 3):
        raise CLIError(f"--token-grid takes h,w or h,w,prefix (integers), got {text!r}")
    return grid
