"""Objective schedules: how the draft heads' loss weight and the number of heads trained move
over a run.

Small models pay for multi-byte training with head 1's bits per byte (bench/RESULTS.md,
"Training recipe"), and curricula over the multi-token objective are reported to win that
back: the draft heads' weight or number grows over training (or, the reverse, shrinks). A
schedule moves both, with one shape, from their initial values (``draft_weight_initial``,
``heads_initial``) to their final ones (``draft_loss_weight``, ``heads_final``) between
steps ``objective_begin`` and ``objective_end`` (0: the run's last step; a number in (0, 1): that
fraction of the run's steps, so that a preset's schedule fits runs of any length): before the
range they hold the initial values, after it the final ones. ``objective_schedule="constant"`` (the
default, and what a config saved before the fields existed means) holds the final values
throughout. A head beyond the number trained, or a draft head while the draft weight is 0,
weighs 0 and is not computed (``bytemtp.train.objective.trained_heads``; its loss is logged
as missing): a schedule that trains fewer heads early saves their compute, and a run's FLOPs
are the mean over its steps (``bytemtp.train.flops.mean_flops_per_byte``).

The weights are a function of the step number and the config alone, so a resumed run
trains with exactly the weights an uninterrupted one would. This module does not import
torch (the config checks run before the CLI pays for it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bytemtp.errors import BytemtpError

if TYPE_CHECKING:
    from bytemtp.train.config import TrainConfig

SHAPES = ("constant", "linear", "cosine")
# The fields a schedule reads beside ``draft_loss_weight``; only meaningful off "constant".
SCHEDULE_FIELDS = ("draft_weight_initial", "heads_initial", "objective_begin", "objective_end")


def check_schedule(cfg: TrainConfig) -> None:
    """Reject a schedule that cannot be followed, naming the field (the model-dependent
    bounds are ``check_heads``'s)."""
    if cfg.objective_schedule not in SHAPES:
        raise BytemtpError(f"objective_schedule: {cfg.objective_schedule!r} is not one of {', '.join(SHAPES)}")
    if not cfg.draft_weight_initial >= 0:
        raise BytemtpError(f"draft_weight_initial: must be >= 0, got {cfg.draft_weight_initial}")
    for name in ("heads_initial", "heads_final", "objective_begin", "objective_end"):
        if getattr(cfg, name) < 0:
            raise BytemtpError(f"{name}: must not be negative, got {getattr(cfg, name)}")
    for name in ("objective_begin", "objective_end"):
        value = getattr(cfg, name)
        if value >= 1 and value != int(value):
            raise BytemtpError(f"{name}: a step number or a fraction of the run in (0, 1), got {value}")
    if cfg.objective_schedule == "constant":
        defaults = {"draft_weight_initial": 0.0, "heads_initial": 0, "objective_begin": 0, "objective_end": 0}
        for name, default in defaults.items():
            if getattr(cfg, name) != default:
                raise BytemtpError(f"{name}: only used by a schedule; set objective_schedule to linear or cosine")
    begin, end = schedule_range(cfg)
    if cfg.objective_end and end <= begin:
        raise BytemtpError(
            f"objective_end: must be after objective_begin={cfg.objective_begin}, got {cfg.objective_end}"
            + (f" (steps {begin} and {end} of {cfg.steps})" if (begin, end) != (cfg.objective_begin, cfg.objective_end) else "")
        )


def schedule_range(cfg: TrainConfig) -> tuple[int, int]:
    """The steps the schedule moves between: ``objective_begin`` and ``objective_end`` as step numbers
    (a fraction in (0, 1) of the run's ``steps``, rounded; a whole number as it is), an end of 0
    the run's last step."""
    def step(value: float) -> int:
        return round(value * cfg.steps) if 0 < value < 1 else int(value)

    return step(cfg.objective_begin), step(cfg.objective_end) or cfg.steps


def check_heads(cfg: TrainConfig, n_future: int) -> None:
    """The numbers of heads trained fit the model's ``n_future``."""
    for name in ("heads_initial", "heads_final"):
        if getattr(cfg, name) > n_future:
            raise BytemtpError(f"{name}: {getattr(cfg, name)} exceeds the model's n_future={n_future}")


def progress(cfg: TrainConfig, step: int) -> float:
    """How far optimizer step ``step`` (1-based) is through the schedule: 0 at or before
    ``objective_begin``, 1 at or after ``objective_end``, shaped in between."""
    if cfg.objective_schedule == "constant":
        return 1.0
    begin, end = schedule_range(cfg)
    t = min(max((step - begin) / max(end - begin, 1), 0.0), 1.0)
    return t if cfg.objective_schedule == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)


def draft_weights(cfg: TrainConfig, step: int, n_future: int) -> list[float]:
    """The loss weight of each draft head (heads 2..n; head 1 weighs 1) at step ``step``:
    the scheduled weight for the heads trained, 0 for the rest."""
    t = progress(cfg, step)
    weight = cfg.draft_weight_initial + t * (cfg.draft_loss_weight - cfg.draft_weight_initial)
    first, last = cfg.heads_initial or n_future, cfg.heads_final or n_future
    heads = round(first + t * (last - first))
    return [weight if k < heads else 0.0 for k in range(1, n_future)]


def logged_weights(drafts: list[float]) -> list[float]:
    """Every head's weight in the objective (head 1 first, normalised to sum 1), for
    ``metrics.jsonl``: computed on the host, as no device value is read between logged steps."""
    total = 1.0 + sum(drafts)
    return [1.0 / total, *(w / total for w in drafts)]
