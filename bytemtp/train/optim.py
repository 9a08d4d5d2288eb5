"""AdamW with decoupled weight decay on the matrices only (or Muon for the blocks' matrices),
and a warmup-cosine schedule.

Weight decay (``TrainConfig.weight_decay``, 0.1) applies to every matrix that
multiplies activations: attention and MLP projections, the heads' unembeddings.
The embedding table and the RMSNorm gains are not decayed: an embedding row is a
lookup, and rows of rare bytes see few gradient updates, so decay would shrink them
towards zero for no reason other than rarity; a norm gain is a per-channel scale
whose natural value is 1, and pulling it towards 0 fights the normalisation.

The schedule is the usual one for transformer language models (the paper's
Table S13 style): linear warmup to the peak lr, cosine decay to a floor of
``min_lr_ratio * lr``, then flat.

With ``TrainConfig.optimizer="muon"`` every 2-D weight inside a transformer block
(attention and MLP projections, the trunk's and transformer heads') is trained by
``torch.optim.Muon`` (momentum orthogonalised by Newton-Schulz, at ``muon_lr``, no
weight decay; the orthogonalisation in the dtype ``bytemtp.train.muon`` picks for the device), and the rest (embedding, unembeddings, norm gains) by AdamW as above:
Muon is meant for hidden matrices, whose update direction matters more than each
entry's scale; the embedding is a lookup and an unembedding's rows are per-byte
classifiers. Both live in one ``MuonAdamW`` so the loop, the scheduler and the
checkpoints see one optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from bytemtp.model.layers import Block
from bytemtp.train.config import TrainConfig
from bytemtp.train.muon import Muon, orthogonalisation_dtype

_NO_DECAY_MODULES = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (embeddings, norms, vectors)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, _NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
    keep = [p for p in params if p.dim() < 2 or id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over ``model``'s parameters as they are now (after
    any FSDP sharding).

    AdamW uses the fused kernel on CUDA (one launch for all parameters), the default
    multi-tensor implementation elsewhere.
    """
    fused = True if device.type == "cuda" else None
    drafts = {id(p) for p in model.draft_parameters()} if cfg.draft_lr_restart else set()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            _apart(param_groups(model, cfg.weight_decay), drafts), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused
        )
    hidden = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters() if p.dim() == 2}
    adamw_groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in param_groups(model, cfg.weight_decay)
    ]
    ns_dtype, why = orthogonalisation_dtype(cfg.muon_dtype, device)
    muon = Muon(
        _apart([{"params": [p for p in model.parameters() if id(p) in hidden]}], drafts), lr=cfg.muon_lr,
        weight_decay=0.0, momentum=cfg.muon_momentum, ns_dtype=ns_dtype, ns_why=why,
    )
    adamw = torch.optim.AdamW(_apart(adamw_groups, drafts), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return MuonAdamW(muon, adamw)


def _apart(groups: list[dict], drafts: set[int]) -> list[dict]:
    """``groups`` with the parameters in ``drafts`` moved to groups of their own, marked ``"draft"``
    (``build_scheduler`` gives them their schedule); empty groups left out."""
    split = []
    for g in groups:
        split.append({**g, "params": [p for p in g["params"] if id(p) not in drafts]})
        split.append({**g, "params": [p for p in g["params"] if id(p) in drafts], "draft": True})
    return [g for g in split if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer: its param groups are theirs (Muon's first) and its
    state holds both, so an lr scheduler scales every group and a state dict (saved or
    loaded, keyed by parameter name in checkpoints) covers every parameter."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (after ``load_state_dict``
        replaced them)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()


@dataclass
class WarmupCosine:
    """lr multiplier of step ``s`` (0-based: the step about to be taken).

    Step ``warmup_steps - 1`` is the first at the peak and step ``decay_steps - 1``
    (the last step of a run planned with that many) the first at the floor. A
    dataclass rather than a closure so ``LambdaLR.state_dict`` records its
    parameters with the checkpoint.
    """

    warmup_steps: int
    decay_steps: int
    min_ratio: float

    def __call__(self, s: int) -> float:
        done = s + 1
        if done <= self.warmup_steps:
            return done / self.warmup_steps
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (done - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Delayed:
    """lr multiplier of step ``s``: 0 before ``start``, then ``schedule`` counted from there."""

    start: int
    schedule: WarmupCosine

    def __call__(self, s: int) -> float:
        return 0.0 if s < self.start else self.schedule(s - self.start)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg`` must be resolved (``decay_steps`` and ``objective_begin`` as steps). Groups marked
    ``"draft"`` (``draft_lr_restart``) start their schedule over when the draft heads join."""
    schedule = WarmupCosine(cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio)
    if not any(g.get("draft") for g in optimizer.param_groups):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    begin = int(cfg.objective_begin) if cfg.objective_schedule != "constant" else 0
    late = Delayed(begin, WarmupCosine(cfg.warmup_steps, max(1, cfg.decay_steps - begin), cfg.min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [late if g.get("draft") else schedule
                                                         for g in optimizer.param_groups])
