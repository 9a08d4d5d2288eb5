"""Draft-head self-distillation: fit heads 2..n to head 1's own greedy continuations.

Self-speculative decoding keeps a draft only when it is the byte head 1 would choose
there. Heads trained on the corpus learn what the *text* does next, and greedy
decoding follows what *head 1* does: the two part ways exactly where speculation
runs, in head 1's own continuations. An undertrained model's greedy text falls into
runs (``self.________``, ``the the the``) that real text soon leaves, so heads that
learnt the text bet on the run ending, and lose on every step it does not.

Distillation generates greedy continuations of training prompts and fits each draft
head k to head 1's choice k - 1 positions later along them. Only the draft heads'
own parameters train: the trunk, the shared final norm and head 1 (and, for
transformer heads, the shared unembedding) stay frozen, so head 1's every output,
and therefore everything decoding outputs, is unchanged bit for bit; drafts are
simply right more often. The trunk being frozen, its output is computed once per
sequence and the fit runs on those features alone (for linear heads, a logistic
regression: minutes on a CPU). Windows of real text are fitted alongside, with head
1's choices on them as targets too: fitted on the continuations alone, the heads learn
the runs and lose some of their agreement with head 1 on ordinary text. The price is
the draft heads' fit to the corpus (their validation bits per byte rise): they now
predict the model, not the text.

Then, by default, the greedy drafts' coupling table is fitted to the heads on the same
continuations (``bytemtp.train.couple``): the weights a draft gets after the two bytes
before it, learnt from where these heads go wrong on this model's greedy text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bytemtp import BOS
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.generate import Decoder
from bytemtp.decode.prompts import sample_prompts
from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.model.transformer import ByteMTP
from bytemtp.decode.coupling import FittedCoupling
from bytemtp.train.couple import FIT_ROWS, FIT_STEPS, corpus_ratios, examples, fit_coupling
from bytemtp.train.flops import coupling_flops, distill_flops


@dataclass
class DistillConfig:
    """What to generate and how to fit. ``text`` windows of real text are fitted alongside the
    ``prompts`` continuations (see ``distill``). ``batch_size`` sequences are generated and
    encoded together, ``fit_rows`` make one optimizer step (``epochs`` 0: the heads stay as they
    are); ``holdout`` continuations (and as many text windows) are kept out of the fit to measure
    the heads' agreement with head 1 before and after, and the coupling's fit."""

    prompts: int = 1024
    text: int = 1024
    prompt_bytes: int = 64
    new_bytes: int = 191  # with BOS and a 64-byte prompt: the tiny preset's 256 positions
    batch_size: int = 64
    epochs: int = 3
    lr: float = 1e-3
    holdout: int = 64
    seed: int = 0
    fit_rows: int = 32
    coupling: bool = True  # then fit greedy drafts' coupling table to the heads (``bytemtp.train.couple``), given trigrams
    coupling_steps: int = FIT_STEPS

    def __post_init__(self) -> None:
        positive = ("prompts", "prompt_bytes", "new_bytes", "batch_size", "fit_rows", "coupling_steps")
        require_at_least_one(self, positive, flags=True)
        if not 0 < self.lr < 1:
            raise BytemtpError(f"--lr: must be in (0, 1), got {self.lr}")
        if self.text < 0:
            raise BytemtpError(f"--text: must be >= 0, got {self.text}")
        if self.epochs < 0 or (self.epochs == 0 and not self.coupling):
            raise BytemtpError(f"--epochs: must be >= 1, or 0 with the coupling fit (nothing to fit), got {self.epochs}")
        if not 0 <= self.holdout < min(self.prompts, self.text or self.prompts):
            raise BytemtpError(f"--holdout: must be at least 0 and below --prompts and --text, got {self.holdout}")


def greedy_continuations(
    model: ByteMTP, prompts: list[bytes], new_bytes: int, batch_size: int, progress: bool = False
) -> torch.Tensor:
    """``BOS + prompt`` and its ``new_bytes`` greedy ids under head 1, [N, 1 + P + new_bytes],
    decoded by the decode engine ``batch_size`` prompts at a time. A generated BOS does not
    end a continuation here: every row runs to the same length, as the fit wants."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise BytemtpError(f"greedy_continuations: prompts must have one length, got {sorted(lengths)}")
    total = 1 + lengths.pop() + new_bytes
    if total > model.cfg.max_seq_len:
        raise BytemtpError(
            f"--prompt-bytes + --new-bytes: BOS and {total - 1} bytes need {total} positions, more than the "
            f"model's max_seq_len={model.cfg.max_seq_len}"
        )
    decoder = Decoder(model, GenerationConfig(max_new_bytes=new_bytes, stop_at_bos=False))
    seqs = []
    with tqdm(total=len(prompts) * new_bytes, unit="B", unit_scale=True, desc="greedy", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            generation = decoder.generate(prompts[i : i + batch_size])
            generation.read_all()
            bar.update(sum(row.stats.bytes for row in generation.rows))  # a generated BOS counts too
            # a row's ids: its context, every id that entered the cache, then its last decided one
            seqs += [(row.window + [row.pending])[:total] for row in generation.rows]
    return torch.tensor(seqs, device=next(model.parameters()).device)


@torch.no_grad()  # not inference_mode: the fit's autograd must be able to save these
def trunk_and_choices(model: ByteMTP, seqs: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen part, computed once: trunk output [N, T, d] and head 1's choice at every position [N, T]."""
    z, choice = [], []
    for i in range(0, len(seqs), batch_size):
        zi = model.trunk(seqs[i : i + batch_size])
        z.append(zi)
        choice.append(model.head_logits(zi, 0).argmax(-1))
    return torch.cat(z), torch.cat(choice)


def draft_pairs(model: ByteMTP, z: torch.Tensor, choice: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per draft head k+1 (k = 1..n-1): its logits at every t that has a target, [B, T-k, vocab],
    and the target, head 1's choice at t + k (the byte head 1 puts at t + k + 1, the one head
    k+1 drafts), [B, T-k]."""
    T = z.shape[1]
    for k in range(1, model.cfg.n_future):  # heads that read the next byte read head 1's choice, as decoding's
        yield model.head_logits(z[:, : T - k], k, next_ids=choice[:, : T - k]), choice[:, k:]


def draft_loss(model: ByteMTP, z: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Mean over draft heads of the cross-entropy against head 1's choices (``draft_pairs``)."""
    losses = [F.cross_entropy(lg.flatten(0, 1).float(), t.flatten()) for lg, t in draft_pairs(model, z, choice)]
    return torch.stack(losses).mean()


@torch.no_grad()
def agreement(model: ByteMTP, z: torch.Tensor, choice: torch.Tensor, batch_size: int) -> list[float]:
    """Per draft head, how often its top byte is the choice of head 1 it drafts for (``draft_pairs``)."""
    hits = torch.zeros(model.cfg.n_future - 1)
    for i in range(0, len(z), batch_size):
        for k, (logits, target) in enumerate(draft_pairs(model, z[i : i + batch_size], choice[i : i + batch_size])):
            hits[k] += (logits.argmax(-1) == target).sum().item()
    T = z.shape[1]
    return [h / (len(z) * (T - k)) for k, h in enumerate(hits.tolist(), start=1)]


def fit_draft_heads(
    model: ByteMTP, z: torch.Tensor, choice: torch.Tensor, cfg: DistillConfig, progress: bool = False
) -> None:
    """Adam on ``draft_loss`` over the cached trunk outputs, draft heads' parameters only."""
    params = model.draft_parameters()
    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = cfg.fit_rows
    steps = cfg.epochs * -(-len(z) // rows)
    try:
        with tqdm(total=steps, desc="fit draft heads", disable=not progress) as bar:
            for _ in range(cfg.epochs):
                order = torch.randperm(len(z), generator=gen)
                for i in range(0, len(z), rows):
                    batch = order[i : i + rows]
                    loss = draft_loss(model, z[batch], choice[batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    bar.update()
    finally:
        for p in frozen:
            p.requires_grad_(True)


def distill(
    model: ByteMTP, prompts: list[bytes], cfg: DistillConfig, text: list[bytes] = (), progress: bool = False
) -> dict:
    """Distil ``model``'s draft heads in place on greedy continuations of ``prompts``, and on
    ``text``: windows of real text as long as a prompt and its continuation. There head 1's
    choices follow the corpus's contexts; fitting them too keeps the heads' agreement on
    real text from dropping while they learn the greedy runs.

    Returns the draft heads' agreement with head 1 before and after, on the held-out
    continuations (``"greedy"``) and text windows (``"text"``), how many bytes the fit saw, and
    what it all cost (``"flops"``, ``bytemtp.train.flops.distill_flops``): a distillation spends
    compute a training run of the same budget does not get.
    """
    if model.cfg.n_future < 2:
        raise BytemtpError("distill: the model has no draft heads (n_future=1)")
    model.eval()
    parts = {"greedy": greedy_continuations(model, prompts, cfg.new_bytes, cfg.batch_size, progress)}
    if text:
        parts["text"] = torch.tensor([[BOS, *window] for window in text], device=model.embed.weight.device)
    encoded = {name: (seqs, *trunk_and_choices(model, seqs, cfg.batch_size)) for name, seqs in parts.items()}
    held = {name: (z[: cfg.holdout], choice[: cfg.holdout]) for name, (_, z, choice) in encoded.items()}
    fit_z, fit_choice = ([e[i][cfg.holdout :] for e in encoded.values()] for i in (1, 2))

    def measure() -> dict[str, list[float]]:
        return {name: agreement(model, z, c, cfg.batch_size) for name, (z, c) in held.items()} if cfg.holdout else {}

    before = measure()
    if cfg.epochs:
        fit_draft_heads(model, torch.cat(fit_z), torch.cat(fit_choice), cfg, progress)
    rows, T = sum(len(c) for c in fit_choice), parts["greedy"].shape[1]
    flops = distill_flops(model.cfg, T, len(prompts) * cfg.new_bytes, sum(s.numel() for s in parts.values()), rows,
                          sum(len(c) for _, c in held.values()), cfg.epochs)
    result = {"agreement_before": before, "agreement_after": measure(),
              "fit_bytes": sum(c.numel() for c in fit_choice), "flops": flops}
    if cfg.coupling and model.byte_trigrams is None:  # a checkpoint from before trigrams: nothing to start from
        result["coupling"] = {"skipped": "the checkpoint has no byte_trigrams.safetensors (it predates them)"}
    elif cfg.coupling:
        model.fitted_coupling, result["coupling"] = couple(model, encoded, len(prompts[0]), cfg)
        flops["coupling"] = coupling_flops(model.cfg, T, result["coupling"]["examples"], cfg.coupling_steps * FIT_ROWS)
        flops["total"] += flops["coupling"]
    return result


def couple(model: ByteMTP, encoded: dict[str, tuple[torch.Tensor, ...]], prompt_bytes: int, cfg: DistillConfig
           ) -> tuple[FittedCoupling, dict[str, float]]:
    """The greedy rows' coupling table fitted to the heads (``bytemtp.train.couple``) on the
    ``encoded`` continuations from their prompts' last byte on, the held-out ones apart, and its
    report (``fit_coupling``'s, and ``"examples"``: how many draft logits were computed for it)."""
    base = corpus_ratios(model)
    seqs, z, choice = encoded["greedy"]
    index = base.index.to(seqs.device)
    cuts = [slice(cfg.holdout, None)] + ([slice(0, cfg.holdout)] if cfg.holdout else [])
    ex = [examples(model, seqs[c], z[c], choice[c], prompt_bytes, index, cfg.batch_size, cfg.seed) for c in cuts]
    table, report = fit_coupling(base, ex[0][0], ex[1][0] if cfg.holdout else None, cfg.seed, cfg.coupling_steps)
    return table, {**report, "examples": sum(n for _, n in ex)}


def training_prompts(data_dir: str | Path, cfg: DistillConfig) -> tuple[list[bytes], list[bytes]]:
    """``cfg.prompts`` seeded prompts and ``cfg.text`` text windows (``prompt_bytes + new_bytes``
    long) from the train split, never the val split the bench draws its prompts from."""
    prompts = sample_prompts(data_dir, cfg.prompts, cfg.prompt_bytes, cfg.seed, "train")
    if not cfg.text:
        return prompts, []
    return prompts, sample_prompts(data_dir, cfg.text, cfg.prompt_bytes + cfg.new_bytes, cfg.seed + 1, "train")
