"""The purification optimizer of Algorithm 1 (equivariance defense), shared by the
equivariance, invariance, rotation and contrastive defenses.

Starting from the (possibly attacked) input ``x``, for ``t = 0 .. T-1``::

    g   = grad_x' loss(x')                          per image, loss (B,) lower = better
    d   = normalize(g) + sigma_t * N(0, 1)          sigma_t = noise * (T - 1 - t) / T
    x'  = x' - eta * sign(d)                        ("sign", the paper) or - eta * d ("l2")
    x'  = clip(x + clip(x' - x, -eps_v, eps_v), 0, 1)

``normalize`` is per image by default: ``g / rms(g)`` with the root mean square over
``C x H x W``, so the normalized gradient has unit scale per element and the noise
level is comparable to it whatever the image size. ``grad_norm="batch"`` reproduces
the released code: ``g / ||g||_2`` with one L2 norm over the whole batch, which couples
the images of a batch and makes every element ~1/sqrt(B C H W), so the noise drowns
the gradient.

The paper's noise is ``N(0, (T-1-t)/T)`` with ``t = 1..T`` (negative at ``t = T``, an
off-by-one); with ``t = 0..T-1`` the same formula anneals linearly from
``(T-1)/T`` to zero at the last step, which is what is used here (times ``noise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GRAD_NORMS", "UPDATES", "check_images", "check_purify_args", "purify_loop"]

#: Gradient normalizations: per image (ours) or over the whole batch (released code).
GRAD_NORMS = ("image", "batch")
#: Update rules: sign of the noisy normalized gradient (paper) or the vector itself.
UPDATES = ("sign", "l2")


def check_images(x: Tensor, what: str = "images") -> None:
    """Raise unless ``x`` is a floating ``(B, C, H, W)`` tensor with values in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{what} must have shape (B, C, H, W), got {tuple(x.shape)}; "
            "use x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}; use x.float() / 255")
    if x.numel() and (x.min() < 0 or x.max() > 1 or not torch.isfinite(x).all()):
        raise ValueError(
            f"{what} must have values in [0, 1], got [{float(x.min()):.4g}, "
            f"{float(x.max()):.4g}]; defenses take unnormalized images (normalize inside "
            "the model)"
        )


def _number(name: str, value: object, minimum: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        rule = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
    return float(value)


def check_purify_args(
    eps_v: float, eta: float | None, steps: int, noise: float, grad_norm: str, update: str
) -> tuple[float, float, int, float]:
    """Validate the optimizer settings; returns ``(eps_v, eta, steps, noise)`` with the
    default ``eta = 2.5 eps_v / steps`` filled in."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    eps_v = _number("eps_v", eps_v, 0.0, strict=True)
    if eps_v > 1:
        raise ValueError(f"eps_v must be <= 1 (images are in [0, 1]), got {eps_v}")
    eta = 2.5 * eps_v / max(steps, 1) if eta is None else _number("eta", eta, 0.0, strict=True)
    noise = _number("noise", noise, 0.0, strict=False)
    if grad_norm not in GRAD_NORMS:
        raise ValueError(f"grad_norm must be one of {GRAD_NORMS}, got {grad_norm!r}")
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    return eps_v, eta, steps, noise


def noise_std(noise: float, t: int, steps: int) -> float:
    """Noise level of step ``t`` (0-based): ``noise * (steps - 1 - t) / steps``."""
    return noise * (steps - 1 - t) / steps


def purify_loop(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps_v: float,
    eta: float,
    steps: int,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    differentiable: bool = False,
    grad_norm: str = "image",
    update: str = "sign",
) -> Tensor:
    """Minimize ``loss_fn`` over ``x + r``, ``||r||_inf <= eps_v``, ``x + r`` in [0, 1].

    Args:
        loss_fn: ``(B, C, H, W) -> (B,)`` per-image loss, differentiable w.r.t. its input.
        x: images ``(B, C, H, W)`` in [0, 1].
        eps_v, eta, steps, noise: bound, step size, number of steps, initial noise std.
        generator: source of the Gaussian noise (None: torch's global RNG).
        differentiable: keep the graph so that the result is differentiable w.r.t. ``x``
            (inner gradients with ``create_graph=True`` for ``update="l2"``; the sign has
            zero derivative, so with ``update="sign"`` the result depends on ``x`` through
            the start point and the projection only). Otherwise the result is detached.
        grad_norm: ``"image"`` (per image, ours) or ``"batch"`` (released code).
        update: ``"sign"`` (paper) or ``"l2"`` (the noisy normalized gradient itself).

    Returns:
        ``x + r``, ``(B, C, H, W)``; no gradients are accumulated in any ``.grad``.
    """
    x0 = x if differentiable else x.detach()
    cur = x0
    create_graph = differentiable and update == "l2"
    dims = tuple(range(1, x.dim()))
    for t in range(steps):
        with torch.enable_grad():
            keep = differentiable and cur.requires_grad
            inp = cur if keep else cur.detach().requires_grad_(True)
            loss = loss_fn(inp)
            (grad,) = torch.autograd.grad(loss.sum(), inp, create_graph=create_graph)
        if not create_graph:
            grad = grad.detach()
        if grad_norm == "image":
            scale = grad.pow(2).mean(dim=dims, keepdim=True).sqrt()
        else:
            scale = grad.pow(2).sum().sqrt().reshape([1] * x.dim())
        direction = grad / (scale + 1e-12)
        std = noise_std(noise, t, steps)
        if std > 0:
            dev = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
            direction = direction + std * z.to(x.device)
        step = torch.sign(direction) if update == "sign" else direction
        cur = cur - eta * step
        cur = torch.clamp(x0 + torch.clamp(cur - x0, -eps_v, eps_v), 0.0, 1.0)
    return cur if differentiable else cur.detach()
