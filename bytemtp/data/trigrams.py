"""A dataset's byte-trigram counts: how often each byte follows each pair of bytes.

The draft heads predict each future byte without the bytes drafted before it; a
sampled chain or tree draws each draft from its head's distribution, so a draft is
often a likely byte that cannot follow the drafts before it. Weighting the head's
distribution by how much likelier the corpus makes a byte after the two before it
(``bytemtp.decode.coupling``) fixes much of that. ``train`` counts the trigrams of its
training data and every checkpoint carries them (``byte_trigrams.safetensors``, sparse:
the stdlib corpus has 139,000 distinct trigrams, 2.2 MB); they describe the data, not
the weights.
"""

from __future__ import annotations

import os

import numpy as np

from bytemtp import VOCAB
from bytemtp.data.shards import Dataset
from bytemtp_native.trigram_ops import add_trigram_counts

# Bytes counted at most: the statistics of a text corpus settle long before this, and
# counting must stay a second or two however large the dataset.
TRIGRAM_SAMPLE_BYTES = 64 << 20


def count_byte_trigrams(data_dir: str | os.PathLike, max_bytes: int = TRIGRAM_SAMPLE_BYTES) -> np.ndarray:
    """[2, n] int64: the codes ``(a * 257 + b) * 257 + c`` of the trigrams seen in the train split
    (ascending) and their counts. Documents are read as two BOS, their bytes, a closing BOS (as
    the loader packs them, with the pair before the first byte), from the first shards up to
    about ``max_bytes`` bytes (whole documents), one shard in memory at a time."""
    dataset = Dataset(data_dir)
    counts = np.zeros((VOCAB, VOCAB, VOCAB), np.int32)
    left = max_bytes
    for info in dataset.shards("train"):
        if left <= 0:
            break
        shard = dataset.read(info)
        left -= add_trigram_counts(counts, shard.data, shard.offsets.astype(np.int64), left)
    codes = np.flatnonzero(counts)
    return np.stack((codes, counts.ravel()[codes].astype(np.int64)))
