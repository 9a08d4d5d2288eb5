"""AdamW with decoupled weight decay on the matrices only, and a warmup-cosine schedule.

Weight decay (``TrainConfig.weight_decay``, 0.1) applies to every matrix that
multiplies activations: attention and MLP projections, the heads' unembeddings.
The embedding table and the RMSNorm gains are not decayed: an embedding row is a
lookup, and rows of rare bytes see few gradient updates, so decay would shrink them
towards zero for no reason other than rarity; a norm gain is a per-channel scale
whose natural value is 1, and pulling it towards 0 fights the normalisation.

The schedule is the usual one for transformer language models (the paper's
Table S13 style): linear warmup to the peak lr, cosine decay to a floor of
``min_lr_ratio * lr``, then flat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from bytemtp.train.config import TrainConfig

_NO_DECAY_MODULES = (nn.Embedding, nn.RMSNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (embeddings, norms, vectors)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, _NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
    keep = [p for p in params if p.dim() < 2 or id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters as they are now (after any FSDP sharding).

    The fused kernel on CUDA (one launch for all parameters); the default
    multi-tensor implementation elsewhere.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=True if device.type == "cuda" else None,
    )


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg`` must be resolved (``decay_steps`` filled in)."""
    schedule = WarmupCosine(cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
