"""Byte-trigram counts of a shard's documents, as the packer sees them (BOS before each one).

One pass over the bytes into a dense table of every possible trigram (257^3 int32, 68 MB:
fixed, whatever the data); a NumPy version would first widen every byte to an index array,
several times the shard's size (``bytemtp.data.trigrams``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

BOS = 256


@njit(cache=True)
def add_trigram_counts(counts: np.ndarray, data: np.ndarray, offsets: np.ndarray, limit: int) -> int:
    """Add to ``counts`` [257, 257, 257] the trigrams (a, b, c) of the shard's documents ``data``
    (uint8) split at ``offsets`` [n_docs + 1], each document read as two BOS, its bytes and a
    closing BOS (so the pairs (BOS, first byte) and (last byte, BOS) have a context too). Stops
    after the document that takes it past ``limit`` bytes -> the bytes counted."""
    done = 0
    for d in range(offsets.size - 1):
        start, end = offsets[d], offsets[d + 1]
        a, b = BOS, BOS
        for i in range(start, end):
            counts[a, b, data[i]] += 1
            a, b = b, data[i]
        counts[a, b, BOS] += 1
        done += end - start
        if done >= limit:
            break
    return done
