"""Seeded permutations that stay the same across NumPy and platform versions.

Resuming a run must replay exactly the shard, document and row orders it was
trained on. NumPy reserves the right to change ``Generator`` streams between
releases, so the orders are drawn here instead: a Fisher-Yates shuffle driven by
SplitMix64, keyed by a BLAKE2b hash of the integers that name the order (seed,
epoch, shard, ...). Both are fixed algorithms, so the order is fixed forever.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _shuffled_range(n, key):
    perm = np.arange(n)
    state = key
    for i in range(n - 1, 0, -1):
        state += np.uint64(0x9E3779B97F4A7C15)
        z = state
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        j = np.int64(z % np.uint64(i + 1))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def order_key(*parts: int) -> np.uint64:
    """A 64-bit key naming one order; distinct part tuples give unrelated keys."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64) determined by ``n`` and the integers ``key`` alone."""
    if n < 0:
        raise ValueError(f"permutation of a negative count ({n})")
    return _shuffled_range(n, order_key(*key))
