"""Model wrappers that let attacks work in [0, 1] pixel space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Normalize", "pick_output", "select_output"]

#: Keys :func:`pick_output` looks for in a dict output, in this order: Hugging Face's
#: ``ModelOutput.logits``, torchvision's segmentation ``{"out": ..., "aux": ...}``.
LOGIT_KEYS = ("logits", "out")


class Normalize(nn.Module):
    """Wrap a model trained on normalized inputs so that it takes images in ``[0, 1]``.

    ``Normalize(model, mean, std)(x) = model((x - mean) / std)`` with per-channel ``mean``
    and ``std`` (``C`` values each, or one value for all channels). Attacks then perturb
    and clip in pixel space, where ``eps`` has its usual meaning. The wrapped network is
    ``.model``; ``mean`` and ``std`` are buffers ``(1, C, 1, 1)`` and follow ``.to()``.

    Raises:
        ValueError: empty or mismatched ``mean``/``std``, or a ``std`` entry <= 0.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | float,
                 std: Sequence[float] | float) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 0 or s.numel() == 0 or (m.numel() != s.numel() and 1 not in
                                                 (m.numel(), s.numel())):
            raise ValueError(f"mean ({m.numel()} values) and std ({s.numel()} values) must "
                             "have one value per channel (or one value for all)")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) \
                or not bool(torch.isfinite(s).all()):
            raise ValueError(f"std must be finite and > 0 and mean finite, got mean "
                             f"{m.tolist()}, std {s.tolist()}")
        self.model = model
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> the wrapped model's output."""
        c = self.mean.shape[1] if self.mean.shape[1] > 1 else self.std.shape[1]
        if x.dim() != 4 or (c > 1 and x.shape[1] != c):
            raise ValueError(f"Normalize expects images (B, {c}, H, W), got {tuple(x.shape)}")
        return self.model((x - self.mean) / self.std)


def pick_output(out: Any, key: str | int | None = None) -> Any:
    """The logits in a model's output: a tensor as it is; from a dict (or a Hugging Face
    ``ModelOutput``) the entry ``key``, else the first of :data:`LOGIT_KEYS` it has; from a
    tuple or list item ``key``, else the first item.

    Raises:
        ValueError: a dict without ``key`` or any of :data:`LOGIT_KEYS`, an index out of
            range, or an entry that is not a tensor.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        keys = list(out.keys())
        found = key if key is not None else next((k for k in LOGIT_KEYS if k in out), None)
        if found not in out:
            raise ValueError(
                f"the model returns a {type(out).__name__} with keys {keys[:8]}, "
                f"{'none is ' + repr(key) if key is not None else 'no logits or out'}; "
                "pick the logits: --output-key KEY (Python: select_output(model, KEY))")
        picked, where = out[found], found
    elif isinstance(out, (tuple, list)):
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(out) <= index < len(out):
            raise ValueError(f"the model returns a {type(out).__name__} of {len(out)} items; "
                             f"--output-key must be an index below {len(out)}, got {key!r}")
        picked, where = out[index], index
    else:
        return out  # the attack's own check names the type
    if not isinstance(picked, Tensor):
        raise ValueError(f"the model's output entry {where!r} is a {type(picked).__name__}, "
                         "not a tensor of logits; pick another with --output-key")
    return picked


def select_output(model: nn.Module, key: str | int | None = None) -> RemovableHandle:
    """Make ``model`` return only its logits (:func:`pick_output`), by a forward hook, so
    that attacks, defenses and evaluations take models whose ``forward`` returns a dict,
    a ``ModelOutput`` or a tuple. The model keeps its layer names (feature layers of the
    defenses are found as before). ``handle.remove()`` undoes it.

    Example::

        handle = select_output(hf_model, "logits")
        evaluate_robustness(hf_model, data, ["pgd"])
        handle.remove()
    """
    if key is not None and not isinstance(key, (str, int)):
        raise ValueError(f"an output key is a name or an index, got {type(key).__name__}")

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        return pick_output(output, key)

    return model.register_forward_hook(hook)
