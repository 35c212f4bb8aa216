"""The model registry: a name -> builder :class:`~equivision.registry.Registry` for every
model family in equivision, and :func:`create_model`, the one way to build a model.

Each model family lives in its own module (``models/cnn.py``, ``models/gcnn.py``, ...)
and registers its builders with :func:`register_model`. The family module must be
imported in ``models/__init__.py`` so that its names are available as soon as
``equivision.models`` is imported.

Example::

    @register_model("my-net")
    def my_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
        ...

    model = create_model("my-net", num_classes=5)
    model.equivision_name, model.equivision_kwargs  # "my-net", {"in_channels": 1, ...}
    model = create_model("my-net", checkpoint="runs/my-net/last.pt")  # + trained weights
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, load_model_weights
from ..registry import Registry

__all__ = [
    "MODELS", "register_model", "create_model", "list_models", "model_defaults",
    "model_from_checkpoint", "register_legacy_arguments", "checkpoint_arguments",
]

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

#: Every registered model builder, by name.
MODELS: Registry[Builder] = Registry("model")

#: Per model name: arguments added after checkpoints of the model were written, with the
#: value those older checkpoints were built with (see :func:`register_legacy_arguments`).
LEGACY_ARGUMENTS: dict[str, dict[str, Any]] = {}


def register_legacy_arguments(name: str, **values: Any) -> None:
    """Declare that checkpoints of model ``name`` written before the arguments ``values``
    existed were built with these values.

    A checkpoint whose stored arguments lack such a key is rebuilt with the legacy value,
    not with today's default, so that changing a default never silently changes what an
    old checkpoint computes (e.g. ``z2cnn``'s block order).
    """
    LEGACY_ARGUMENTS.setdefault(name, {}).update(values)


def checkpoint_arguments(name: str, stored: dict[str, Any]) -> dict[str, Any]:
    """Every argument a checkpoint of registered model ``name`` was built with: its stored
    ``model_kwargs``, then the legacy value (:func:`register_legacy_arguments`) or else
    today's default of each argument it lacks (one added since it was written).

    Compare this, not the raw stored dict, with a model's ``equivision_kwargs``.
    """
    if name not in MODELS:
        return dict(stored)
    defaults = {k: v for k, v in model_defaults(name).items()
                if v is not inspect.Parameter.empty}
    legacy = LEGACY_ARGUMENTS.get(name, {})
    return {**defaults, **legacy, **stored}


def register_model(name: str) -> Callable[[B], B]:
    """Decorator that registers a model builder (a function or an ``nn.Module`` class).

    The builder must take keyword arguments only (with defaults wherever sensible); these
    become the ``**kwargs`` of :func:`create_model` and are stored in checkpoints so that the
    model can be rebuilt, so keep them plain (int, float, str, bool, None, lists, tuples,
    dicts). Registering the same name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"model name must be a non-empty string without spaces, got {name!r}")

    def decorator(builder: B) -> B:
        if not callable(builder):
            raise TypeError(f"register_model({name!r}) must decorate a callable")
        MODELS.add(name, builder)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.list()


def _describe(sig: inspect.Signature) -> str:
    parts = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.default is p.empty:
            parts.append(f"{p.name} (required)")
        else:
            parts.append(f"{p.name}={p.default!r}")
    return ", ".join(parts) or "(none)"


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a registered model accepts, with their defaults.

    Required arguments map to ``inspect.Parameter.empty``.
    """
    sig = inspect.signature(MODELS.get(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def create_model(name: str, checkpoint: str | os.PathLike | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build the model ``name`` with keyword arguments ``kwargs``, weights from
    ``checkpoint`` if given.

    ``name`` is a registered name (see :func:`list_models`) or ``"module:attr"``, where
    ``attr`` is an ``nn.Module`` class, a factory function (called with ``kwargs``) or an
    ``nn.Module`` instance. An equivision checkpoint of a registered model supplies the
    constructor arguments it was saved with (``kwargs`` override them); a bare state dict
    works too. Weights are loaded with ``torch.load(weights_only=True)``
    (:func:`equivision.checkpoint.load_model_weights`).

    A registered model carries ``equivision_name`` (``name``) and ``equivision_kwargs`` (all
    arguments, defaults filled in) so that training checkpoints can rebuild it.

    Raises:
        ValueError: unknown ``name`` (an :class:`~equivision.registry.UnknownNameError`
            with did-you-mean suggestions and the valid names), a ``module:attr`` that
            cannot be imported, or an argument value that the model rejects.
        TypeError: unknown or missing arguments (the message names the model and lists the
            arguments it accepts), or a builder that returns no ``nn.Module``.
        CheckpointError: an unreadable checkpoint or weights that do not fit.
    """
    if isinstance(name, str) and ":" in name:
        model = _import_model(name, kwargs)
    else:
        if checkpoint is not None:  # an equivision checkpoint knows its arguments
            kwargs = {**_stored_kwargs(name, checkpoint), **kwargs}
        model = _build_registered(name, kwargs)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    return model


def _import_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model named by ``"module:attr"`` (a class, factory or instance)."""
    mod_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot load model {spec!r}: {err}") from None
    model = obj if isinstance(obj, nn.Module) else obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _stored_kwargs(name: str, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Constructor arguments stored in an equivision checkpoint of model ``name``; none
    for a bare state dict or another model (loading then reports any mismatch)."""
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError:
        return {}  # a bare state dict, or broken: load_model_weights says which
    if state.get("model_name") != name or not isinstance(state.get("model_kwargs"), dict):
        return {}
    return checkpoint_arguments(name, dict(state["model_kwargs"]))


def _build_registered(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call the builder registered as ``name``; tag the model with its name and
    arguments."""
    builder = MODELS.get(name)
    sig = inspect.signature(builder)
    try:
        bound = sig.bind(**kwargs)
    except TypeError as e:
        params = sig.parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params] if not has_var_kw else []
        what = (
            f"got unexpected argument(s) {', '.join(map(repr, unknown))}" if unknown else str(e)
        )
        raise TypeError(
            f"model {name!r} {what}; accepted arguments: {_describe(sig)}"
        ) from None
    bound.apply_defaults()
    model = builder(*bound.args, **bound.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the builder of model {name!r} returned {type(model).__name__}, not an nn.Module"
        )
    stored: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = sig.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            stored.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            stored[key] = value
    model.equivision_name = name
    model.equivision_kwargs = stored
    return model


def model_from_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint and load its weights; returned in eval mode.

    Needs a checkpoint that records ``model_name`` and ``model_kwargs`` (written by
    :func:`equivision.training.train` for models made with ``create_model``).

    Raises:
        CheckpointError: unreadable checkpoint, no model name recorded, unknown model name or
            arguments, or weights that do not fit.
    """
    ckpt = load_checkpoint(path, map_location, required_keys=("model",))
    name, kwargs = ckpt.get("model_name"), ckpt.get("model_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not record which model it holds (the model "
            "was not built with equivision.models.create_model); build the model yourself and "
            "call load_model_weights(model, path)"
        )
    kwargs = checkpoint_arguments(name, kwargs)
    try:
        model = create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} holds model {name!r} with arguments {kwargs}, which "
            f"cannot be built: {e}"
        ) from e
    load_model_weights(model, ckpt)
    return model.eval()
