"""Group layers into the depth-wise parts of the learned-equivariance paper."""

from __future__ import annotations

PARTS = ("Early", "Middle", "Late", "Pool", "Final")


def assign_parts(n_layers: int, pool_index: int | None) -> list[str]:
    """Part of each of ``n_layers`` layers (in forward order).

    Layers before the global pooling layer at ``pool_index`` are split uniformly into
    Early, Middle and Late (the first parts get the extra layer when the count does
    not divide by 3); the pooling layer is Pool; layers after it are Final. With no
    pooling layer (``None``) every layer is split into Early, Middle and Late.
    """
    pre = n_layers if pool_index is None else pool_index
    parts: list[str] = []
    base, extra = divmod(pre, 3)
    for i, name in enumerate(PARTS[:3]):
        parts += [name] * (base + (1 if i < extra else 0))
    if pool_index is not None:
        parts.append("Pool")
        parts += ["Final"] * (n_layers - pool_index - 1)
    return parts
