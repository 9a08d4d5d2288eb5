"""bytemtp: byte-level language models with multi-byte prediction.

Ids 0-255 are bytes; id 256 is BOS, written before every document. There is no
tokenizer: what goes in and what comes out are raw bytes.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

BOS = 256
VOCAB = 257  # bytes + BOS; embedding tables are padded past this, padding ids are never sampled
# The largest seed any command takes (--seed, a config's "seed") or draws itself: seeds reach
# torch.Generator.manual_seed, which takes 64 bits, and 2^62 leaves headroom for the per-sample
# seeds seed + i. A drawn seed stays in range so that the seed a run prints can be given back.
MAX_SEED = 2**62


def user_cache_dir() -> Path:
    """Where bytemtp keeps what it can rebuild (the prepared demo corpus, compiled kernels):
    ``$XDG_CACHE_HOME/bytemtp``, else ``~/.cache/bytemtp``, as the XDG convention says."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bytemtp"
