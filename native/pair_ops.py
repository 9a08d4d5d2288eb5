"""Adjacent-byte counts of a shard's documents, as the packer sees them (BOS before each one).

One pass over the bytes in constant memory: a NumPy version would widen every byte to
an index array first, several times the shard's size (``bytemtp.data.pairs``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

BOS = 256


@njit(cache=True)
def add_pair_counts(counts: np.ndarray, data: np.ndarray, offsets: np.ndarray, limit: int) -> int:
    """Add to ``counts`` [257, 257] the pairs (id, next id) of the shard's documents ``data``
    (uint8) split at ``offsets`` [n_docs + 1], each document read as BOS followed by its bytes
    and then the next document's BOS. Stops after the document that takes it past ``limit``
    bytes -> the bytes counted."""
    done = 0
    for d in range(offsets.size - 1):
        start, end = offsets[d], offsets[d + 1]
        prev = BOS
        for i in range(start, end):
            counts[prev, data[i]] += 1
            prev = data[i]
        counts[prev, BOS] += 1
        done += end - start
        if done >= limit:
            break
    return done
