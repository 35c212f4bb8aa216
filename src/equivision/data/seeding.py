"""Derived seeds for per-item generators."""

from __future__ import annotations

import hashlib

import torch


def derived_generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by a hash of ``parts`` (e.g. ``(seed, index)``).

    torch's CPU generator only uses the low 32 bits of a seed, so ``seed * 2**32 + i``
    would ignore ``seed``; hashing mixes every part into those 32 bits.
    """
    key = "\x1f".join(str(p) for p in parts).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=4)
                                                        .digest(), "little"))
