"""Draft-head self-distillation: fit heads 2..n to head 1's own continuations.

Self-speculative decoding keeps a draft only when head 1 would have put it there: greedy,
when it is head 1's choice; sampled, with the probability ``sum min(p, q)`` of head 1's
distribution and the draft's. Heads trained on the corpus learn what the *text* does next,
and decoding follows what *head 1* does: the two part ways exactly where speculation runs,
in head 1's own continuations. An undertrained model's greedy text falls into runs
(``self.________``, ``the the the``) that real text soon leaves, so heads that learnt the
text bet on the run ending, and lose on every step it does not.

By default (``temperature > 0``) distillation samples continuations of training prompts at
that temperature and fits each draft head k to head 1's whole tempered distribution k - 1
positions later along them, as decoding draws its drafts (``bytemtp.train.soft_targets``).
With ``temperature`` 0 it fits each head to head 1's greedy choices along greedy
continuations instead: greedy drafts gain more, sampled drafts lose (the heads grow sharper
than head 1). Windows of real text are fitted alongside either way, with head 1's
distributions (or choices) on them as targets: fitted on its continuations alone, the heads
learn its runs and lose some of their agreement with head 1 on ordinary text. Only the draft
heads' own parameters train: the trunk, the shared final norm and head 1 (and, for
transformer heads, the shared unembedding) stay frozen, so head 1's every output, and
therefore everything decoding outputs, is unchanged bit for bit; drafts are simply right
more often. The trunk being frozen, its output is computed once per sequence and the fit
runs on those features alone (for linear heads, a logistic regression: minutes on a CPU).
The price is the draft heads' fit to the corpus (their validation bits per byte rise): they
now predict the model, not the text.

Then, by default, the greedy drafts' coupling table is fitted to the heads on greedy
continuations (``bytemtp.train.couple``): the weights a draft gets after the two bytes
before it, learnt from where these heads go wrong on this model's greedy text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
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
from bytemtp.train.soft_targets import DraftLaw, Targets, acceptance, soft_loss


@dataclass
class DistillConfig:
    """What to generate and how to fit. ``text`` windows of real text are fitted alongside the
    ``prompts`` continuations (see ``distill``), sampled at ``temperature`` (0: greedy, and the
    heads fitted to head 1's choices). ``batch_size`` sequences are generated and encoded
    together, ``fit_rows`` make one optimizer step (``epochs`` 0: the heads stay as they are);
    ``holdout`` continuations (and as many text windows) are kept out of the fit to measure the
    heads' agreement with head 1 before and after, and the coupling's fit."""

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
    temperature: float = 0.8  # the benchmarks' and the server's default sampling temperature

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise BytemtpError(f"--temperature: must be >= 0 (0: fit to greedy choices), got {self.temperature}")
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


def continuations(
    model: ByteMTP, prompts: list[bytes], new_bytes: int, batch_size: int, progress: bool = False,
    temperature: float = 0.0, seed: int = 0,
) -> torch.Tensor:
    """``BOS + prompt`` and its ``new_bytes`` ids under head 1, greedy or sampled at ``temperature``
    (row i with seed ``seed + i``), [N, 1 + P + new_bytes], decoded by the decode engine
    ``batch_size`` prompts at a time. A generated BOS does not end a continuation here: every
    row runs to the same length, as the fit wants."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise BytemtpError(f"continuations: prompts must have one length, got {sorted(lengths)}")
    total = 1 + lengths.pop() + new_bytes
    if total > model.cfg.max_seq_len:
        raise BytemtpError(
            f"--prompt-bytes + --new-bytes: BOS and {total - 1} bytes need {total} positions, more than the "
            f"model's max_seq_len={model.cfg.max_seq_len}"
        )
    decoder = Decoder(model, GenerationConfig(max_new_bytes=new_bytes, stop_at_bos=False, temperature=temperature))
    seqs = []
    desc = f"sample at T = {temperature:g}" if temperature else "greedy"
    with tqdm(total=len(prompts) * new_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            generation = decoder.generate(chunk, [seed + i + j for j in range(len(chunk))])
            generation.read_all()
            bar.update(sum(row.stats.bytes for row in generation.rows))  # a generated BOS counts too
            # a row's ids: its context, every id that entered the cache, then its last decided one
            seqs += [(row.window + [row.pending])[:total] for row in generation.rows]
    return torch.tensor(seqs, device=next(model.parameters()).device)


@torch.no_grad()  # not inference_mode: the fit's autograd must be able to save these
def trunk_and_choices(
    model: ByteMTP, seqs: torch.Tensor, batch_size: int, temperature: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen part, computed once: trunk output [N, T, d], head 1's choice at every position
    [N, T] and, given a ``temperature``, its log-probabilities at it [N, T, V] (bfloat16: they are
    targets, ``soft_targets.Targets``; None without)."""
    z, choice, log_p = [], [], []
    for i in range(0, len(seqs), batch_size):
        zi = model.trunk(seqs[i : i + batch_size])
        logits = model.head_logits(zi, 0)
        z.append(zi)
        choice.append(logits.argmax(-1))
        if temperature:
            log_p.append((logits.float() / temperature).log_softmax(-1).to(torch.bfloat16))
    return torch.cat(z), torch.cat(choice), torch.cat(log_p) if temperature else None


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
    model: ByteMTP, n_rows: int, loss_of: Callable[[torch.Tensor], torch.Tensor], cfg: DistillConfig,
    progress: bool = False,
) -> None:
    """Adam on ``loss_of(rows)`` (the mean loss of those of ``n_rows`` cached rows), draft heads'
    parameters only."""
    params = model.draft_parameters()
    trained = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = cfg.fit_rows
    steps = cfg.epochs * -(-n_rows // rows)
    try:
        with tqdm(total=steps, desc="fit draft heads", disable=not progress) as bar:
            for _ in range(cfg.epochs):
                order = torch.randperm(n_rows, generator=gen)
                for i in range(0, n_rows, rows):
                    loss = loss_of(order[i : i + rows])
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
    """Distil ``model``'s draft heads in place on continuations of ``prompts`` (sampled at
    ``cfg.temperature``, or greedy), and on ``text``: windows of real text as long as a prompt and
    its continuation. There head 1 follows the corpus's contexts; fitting them too keeps the
    heads' agreement on real text from dropping while they learn head 1's habits.

    Returns the draft heads' agreement with head 1's choices before and after, on held-out
    greedy continuations (``"greedy"``) and text windows (``"text"``), and when sampling their
    expected acceptance on held-out sampled continuations (``"sampled"``, ``soft_targets.acceptance``);
    how many bytes the fit saw, and what it all cost (``"flops"``,
    ``bytemtp.train.flops.distill_flops``): a distillation spends compute a training run of the
    same budget does not get.
    """
    if model.cfg.n_future < 2:
        raise BytemtpError("distill: the model has no draft heads (n_future=1)")
    model.eval()
    sampling = cfg.temperature > 0 and cfg.epochs > 0  # with no fit of the heads, nothing to sample for
    parts = {"greedy": continuations(model, prompts, cfg.new_bytes, cfg.batch_size, progress)}
    if text:
        parts["text"] = torch.tensor([[BOS, *window] for window in text], device=model.embed.weight.device)
    if sampling:
        parts["sampled"] = continuations(model, prompts, cfg.new_bytes, cfg.batch_size, progress, cfg.temperature,
                                         cfg.seed)
    # head 1's log-probabilities where the fit is soft: along the sampled continuations and the text
    soft_t = {name: cfg.temperature if sampling and name != "greedy" else 0.0 for name in parts}
    encoded = {name: (seqs, *trunk_and_choices(model, seqs, cfg.batch_size, soft_t[name])) for name, seqs in parts.items()}
    held = {name: (z[: cfg.holdout], choice[: cfg.holdout]) for name, (_, z, choice, _) in encoded.items()
            if name != "sampled"}
    generated = (1 + sampling) * len(prompts) * cfg.new_bytes
    positions = sum(s.numel() for s in parts.values())
    if sampling:
        soft = {name: Targets(seqs, z, log_p) for name, (seqs, z, _, log_p) in encoded.items() if log_p is not None}
        law = DraftLaw.of(model, cfg.temperature)
        fit_soft = Targets.join([soft[name][cfg.holdout :] for name in ("sampled", "text") if name in soft])
        rows = len(fit_soft)

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            return soft_loss(model, fit_soft[batch], law).mean()
    else:
        fit_z, fit_choice = (torch.cat([e[i][cfg.holdout :] for e in encoded.values()]) for i in (1, 2))
        rows = len(fit_z)

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            return draft_loss(model, fit_z[batch], fit_choice[batch])

    def measure() -> dict[str, list[float]]:
        if not cfg.holdout:
            return {}
        out = {name: agreement(model, z, c, cfg.batch_size) for name, (z, c) in held.items()}
        if sampling:
            out["sampled"] = acceptance(model, soft["sampled"][: cfg.holdout], law, cfg.batch_size)
        return out

    before = measure()
    if cfg.epochs:
        fit_draft_heads(model, rows, loss_of, cfg, progress)
    T = parts["greedy"].shape[1]
    measured = sum(len(c) for _, c in held.values()) + (cfg.holdout if sampling else 0)
    flops = distill_flops(model.cfg, T, generated, positions, rows, measured, cfg.epochs)
    result = {"agreement_before": before, "agreement_after": measure(), "fit_bytes": rows * T, "flops": flops}
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
    seqs, z, choice, _ = encoded["greedy"]
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
