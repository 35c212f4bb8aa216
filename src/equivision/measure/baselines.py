"""The random-initialisation baseline: the same architecture with fresh, seeded weights.

A pattern that a randomly initialised network already shows (equivariance falling with
depth, equivariance far above invariance) is not learned. :func:`random_init_copy`
gives the network to measure beside the trained one; the channel-redundancy baseline
needs no second network (:meth:`~equivision.measure.stats.PairStats.redundancy`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn

from .capture import MeasureError

__all__ = ["random_init_copy"]

#: Methods that re-initialise a module's own parameters, tried in this order.
RESET_METHODS = ("reset_parameters", "_reset_parameters")
#: Model-level initialisation methods (timm's and this project's), called after the resets
#: so that a model's own scheme (e.g. a ViT's positional embedding) is restored.
INIT_METHODS = ("init_weights", "_init_weights")


def _no_arg_method(module: nn.Module, names: tuple[str, ...]) -> Callable[[], object] | None:
    """The first of ``names`` that ``module`` has as a method callable without arguments."""
    for name in names:
        fn = getattr(module, name, None)
        if not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params):
            return fn
    return None


def random_init_copy(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` re-initialised as at construction, seeded.

    Every module's ``reset_parameters`` (or ``_reset_parameters``, as in
    ``nn.MultiheadAttention``) runs under ``torch.manual_seed(seed)``, then every
    module's argument-free ``init_weights`` / ``_init_weights`` (a model's own scheme).
    Batch norms get fresh running statistics. The caller's RNG state is left as it was.

    Returns:
        ``(copy, kept)``: ``kept`` names the modules (``"(model)"`` for the root) whose
        own parameters have no such method and keep their trained values.

    Raises:
        MeasureError: when the model cannot be deep-copied.
    """
    try:
        clone = copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001 - any failure means: no baseline
        raise MeasureError(
            f"the random-init baseline needs a deep copy of {type(model).__name__}, which "
            f"failed ({type(err).__name__}: {err}); turn the baseline off "
            "(random_init=False, --no-random-init)") from None
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    kept: list[str] = []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        modules = list(clone.named_modules())
        inits = {name: _no_arg_method(m, INIT_METHODS) for name, m in modules}
        for name, m in modules:
            reset = _no_arg_method(m, RESET_METHODS)
            if reset is not None:
                reset()
            elif inits[name] is None and any(True for _ in m.parameters(recurse=False)):
                kept.append(name or "(model)")
        for fn in inits.values():
            if fn is not None:
                fn()
    return clone, kept
