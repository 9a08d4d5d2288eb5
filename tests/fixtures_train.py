"""Small models trained for a few seconds on Python standard library source.

Random weights make the draft heads useless, so self-speculative decoding would
never accept a draft. The text is ``html/entities.py``: real source, but with
long runs of near-identical dictionary lines (``    'name;': '\\u2211',``) that a
small model learns within a couple of hundred steps, after which its draft heads
predict the fixed parts of a line (and its greedy output is varied structured
text rather than a run of spaces, as on ordinary code at this stage). Models are
cached per process: every test module that asks for the same configuration gets
the same (eval-mode) model, trained once.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch

from bytemtp import BOS, VOCAB
from bytemtp.model.config import ModelConfig
from bytemtp.train.objective import multihead_loss
from bytemtp.model.transformer import ByteMTP

STDLIB_FILE = "html/entities.py"


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> torch.Tensor:
    """``STDLIB_FILE`` as one document of ids: BOS, then its bytes."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / STDLIB_FILE).read_bytes()
    return torch.tensor([BOS, *text], dtype=torch.long)


@functools.lru_cache(maxsize=None)
def trained_model(
    head_kind: str = "linear",
    n_future: int = 8,
    steps: int = 200,
    d_model: int = 48,
    n_layers: int = 2,
    max_seq_len: int = 128,
    seq_len: int = 48,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    draft_mlp: int = 0,
    draft_next_byte: bool = False,
) -> ByteMTP:
    """A ``ByteMTP`` trained with the multi-byte loss on ``stdlib_corpus`` (deterministic per arguments)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_attn_heads=4,
        n_future=n_future,
        head_kind=head_kind,
        max_seq_len=max_seq_len,
        draft_mlp=draft_mlp,
        draft_next_byte=draft_next_byte,
    )
    model = ByteMTP(cfg)
    corpus = stdlib_corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    width = seq_len + n_future
    for _ in range(steps):
        starts = torch.randint(0, len(corpus) - width, (batch_size,), generator=gen)
        batch = corpus[starts[:, None] + torch.arange(width)]
        opt.zero_grad(set_to_none=True)
        multihead_loss(model, batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    # the byte-trigram counts ``train`` keeps with a checkpoint: sampled drafts are coupled by them
    ids = torch.cat((corpus[:1], corpus, corpus[:1]))  # BOS, BOS, the text, BOS
    codes, counts = ((ids[:-2] * VOCAB + ids[1:-1]) * VOCAB + ids[2:]).unique(return_counts=True)
    model.byte_trigrams = torch.stack((codes, counts))
    return model.eval()


def trained_draft_mlps() -> ByteMTP:
    """``trained_model()`` whose draft heads read the features through MLPs (``draft_mlp``)."""
    return trained_model(draft_mlp=64)


def trained_next_byte() -> ByteMTP:
    """``trained_draft_mlps()`` whose draft heads also read the next byte (``draft_next_byte``)."""
    return trained_model(draft_mlp=64, draft_next_byte=True)


def trained_by_kind(kind: str) -> ByteMTP:
    """The trained model of a head kind, or ``"mlp"``: linear heads with draft MLPs (``"next_byte"``:
    which also read the next byte)."""
    return {"linear": trained_model, "transformer": trained_transformer_heads, "mlp": trained_draft_mlps,
            "next_byte": trained_next_byte}[kind]()


def trained_transformer_heads() -> ByteMTP:
    """The transformer-head counterpart of ``trained_model()``: 4 heads, smaller, as cheap to train."""
    return trained_model("transformer", n_future=4, steps=150, n_layers=1)

