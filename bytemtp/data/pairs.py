"""A dataset's adjacent-byte statistics: counts of every (byte, next byte) pair.

The draft heads predict each future byte without the bytes drafted before it; a
sampled chain or tree draws each draft from its head's distribution, so a draft is
often a likely byte that cannot follow the draft before it. Weighting the head's
distribution by how much likelier the corpus makes a byte after the previous one
(``bytemtp.decode.coupling``) fixes most of that for the cost of a 257 x 257 table.
``train`` counts the pairs of its training data and every checkpoint carries them
(``byte_pairs.safetensors``); the table is a property of the data, not of the weights.
"""

from __future__ import annotations

import os

import numpy as np

from bytemtp.data.shards import Dataset
from bytemtp import VOCAB
from bytemtp_native.pair_ops import add_pair_counts

# Bytes counted at most: the pair statistics of a text corpus settle long before this,
# and counting must stay a second or two however large the dataset.
PAIR_SAMPLE_BYTES = 64 << 20


def count_byte_pairs(data_dir: str | os.PathLike, max_bytes: int = PAIR_SAMPLE_BYTES) -> np.ndarray:
    """[257, 257] int64 counts of (id, next id) over the train split's documents, each read as
    BOS, its bytes, BOS (as the loader packs them), from the first shards up to about
    ``max_bytes`` bytes (whole documents). One shard in memory at a time."""
    dataset = Dataset(data_dir)
    counts = np.zeros((VOCAB, VOCAB), np.int64)
    left = max_bytes
    for info in dataset.shards("train"):
        if left <= 0:
            break
        shard = dataset.read(info)
        left -= add_pair_counts(counts, shard.data, shard.offsets.astype(np.int64), left)
    return counts
