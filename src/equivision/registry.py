"""One registry type for every name lookup in equivision.

Models, datasets, transformations, augmentations, attacks, defenses, SSL methods and
probes are each kept in a :class:`Registry`: ``register`` (a decorator or a call),
``get`` (a clear error with did-you-mean suggestions for an unknown name), ``list`` and
``describe``.

Example::

    ATTACKS = Registry("attack")

    @ATTACKS.register("pgd", description="projected gradient descent")
    class PGD: ...

    ATTACKS.get("pdg")  # UnknownNameError: unknown attack 'pdg'. Did you mean 'pgd'? ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError", "suggest"]

T = TypeVar("T")


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; the message lists close matches and valid names.

    Subclasses both ``ValueError`` and ``KeyError`` so that callers catching either keep
    working.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def suggest(name: object, valid: list[str]) -> str:
    """`` Did you mean 'x'?`` for names close to ``name``, else an empty string."""
    close = difflib.get_close_matches(str(name), valid, n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


class Registry(Generic[T]):
    """A name -> object table with descriptions and helpful errors.

    Args:
        kind: what the entries are, used in messages (``"model"``, ``"attack"``, ...).
        normalize: applied to names on registration and lookup (e.g. ``str.lower``).
    """

    def __init__(self, kind: str, normalize: Callable[[str], str] | None = None) -> None:
        self.kind = kind
        self._normalize = normalize or (lambda s: s)
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def _key(self, name: str) -> str:
        if not isinstance(name, str):
            raise UnknownNameError(
                f"{self.kind} name must be a string, got {type(name).__name__}; "
                f"valid names: {', '.join(self.list()) or '(none)'}")
        return self._normalize(name.strip())

    def add(self, name: str, item: T, description: str = "", replace: bool = False) -> T:
        """Register ``item`` under ``name``; a second registration of a name raises
        ``ValueError`` unless ``replace`` (or it is the same object)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(
                f"{self.kind} name must be a non-empty string without surrounding spaces, "
                f"got {name!r}")
        key = self._key(name)
        existing = self._items.get(key)
        if existing is not None and existing is not item and not replace:
            where = getattr(existing, "__qualname__", type(existing).__name__)
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({where})")
        self._items[key] = item
        self._descriptions[key] = description or (getattr(item, "__doc__", None) or "").strip(
            ).split("\n")[0]
        return item

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(item: T) -> T:
            return self.add(name, item, description)

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            UnknownNameError: the message suggests close names and lists the valid ones.
        """
        key = self._key(name)
        if key not in self._items:
            valid = self.list()
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{suggest(key, valid)} "
                f"Valid names: {', '.join(valid) or '(none)'}")
        return self._items[key]

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """``{name: one-line description}``, sorted by name."""
        return {k: self._descriptions[k] for k in self.list()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name.strip()) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
