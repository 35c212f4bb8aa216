"""A name -> builder registry for every model family in equivision.

Each model family lives in its own module (``models/cnn.py``, later ``models/resnet.py``, ...)
and registers its builders with :func:`register_model`. The family module must be imported
in ``models/__init__.py`` so that its names are available as soon as ``equivision.models``
is imported.

Example::

    @register_model("my-net")
    def my_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
        ...

    model = create_model("my-net", num_classes=5)
    model.equivision_name, model.equivision_kwargs  # "my-net", {"in_channels": 1, ...}
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_defaults"]

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_REGISTRY: dict[str, Builder] = {}


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
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not builder:
            raise ValueError(
                f"a model named {name!r} is already registered "
                f"({existing.__module__}.{existing.__qualname__})"
            )
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        valid = list_models()
        close = difflib.get_close_matches(str(name), valid, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Valid names: {', '.join(valid) or '(none)'}"
        ) from None


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
    sig = inspect.signature(_builder(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    The returned module carries ``equivision_name`` (``name``) and ``equivision_kwargs`` (all
    arguments, defaults filled in) so that training checkpoints can rebuild it.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), or an argument value
            that the model rejects.
        TypeError: unknown or missing arguments (the message names the model and lists the
            arguments it accepts).
    """
    builder = _builder(name)
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
