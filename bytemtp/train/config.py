"""Training configuration: ``TrainConfig``, per-preset defaults, and how flags, a JSON
config file and a checkpoint's saved configs combine.

Precedence is preset < ``--config`` file < flags. On ``--resume`` the checkpoint's
saved configs take the place of the preset, so a bare ``--resume`` continues exactly
the run that was started (except ``PER_INVOCATION`` fields: a time budget or a device
belongs to one invocation, not to the run); anything given explicitly is checked
against the checkpoint, and a contradiction names the field. Only the fields in
``RESUMABLE_CHANGES`` (how long and where to run, how often to log and save) may
differ on resume: every other field decides which bytes are seen in which order
or how the parameters move, so changing it would silently make a different run.

This module does not import torch: the CLI reads configs before paying for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bytemtp import MAX_SEED
from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.model.config import PRESETS, ModelConfig, from_dict
from bytemtp.train.objective_schedule import SCHEDULE_FIELDS, check_heads, check_schedule, schedule_range

LOADER_MODES = ("concat", "best-fit")
LOSS_MODES = ("sequential", "stacked", "naive")
OPTIMIZERS = ("adamw", "muon")
MUON_DTYPES = ("auto", "bfloat16", "float32")

# Fields a resumed run may set differently from the run it continues.
RESUMABLE_CHANGES = frozenset(
    {"steps", "eval_every", "log_every", "ckpt_every", "keep", "time_budget", "device", "compile", "fsdp",
     "peak_tflops", "muon_dtype"}
)
# Fields a resumed run does not inherit from the checkpoint (they start from the defaults).
PER_INVOCATION = frozenset({"time_budget", "device", "compile", "peak_tflops", "muon_dtype"})
# Fields whose 0 means "derive it": seq_len from the model, decay_steps from steps.
AUTO_ZERO = frozenset({"seq_len", "decay_steps", "objective_end"})


@dataclass
class TrainConfig:
    """Everything about a training run that is not the architecture.

    ``steps`` is the total number of optimizer steps of the run (not of one
    invocation). The learning rate warms up linearly over ``warmup_steps``, then
    follows a cosine down to ``min_lr_ratio * lr`` at ``decay_steps`` (0: the
    run's ``steps`` when it starts) and stays there, so extending a finished run
    with ``--resume --steps`` continues at the floor unless ``decay_steps`` was set
    for the longer run from the start. One optimizer step sees
    ``world_size * grad_accum * batch_size`` rows of ``seq_len`` bytes.

    ``optimizer="muon"`` moves the blocks' matrices to Muon (``muon_lr``,
    ``muon_momentum``; see ``bytemtp.train.optim``); ``"adamw"`` (the default, and what
    a config saved before the field existed means) trains everything with AdamW.
    ``muon_dtype`` is the dtype of Muon's orthogonalisation: ``"auto"`` (the default) picks
    bfloat16 where the device multiplies it natively and float32 elsewhere
    (``bytemtp.train.muon``). Like ``device`` and ``compile`` it says how this machine
    computes the same update, so a resumed run picks its own.

    ``draft_loss_weight`` weighs each draft head's loss against head 1's in the objective
    (``bytemtp.train.objective.head_weights``); 1, the default and what an older config
    means, is the paper's plain mean over heads.

    ``objective_schedule`` (``"linear"``, ``"cosine"``; default ``"constant"``) moves that weight
    from ``draft_weight_initial`` and the number of heads trained from ``heads_initial``
    to their final values (``draft_loss_weight``, ``heads_final``; heads 0: all) between steps
    ``objective_begin`` and ``objective_end`` (0: the run's ``steps`` when it starts; in (0, 1): that
    fraction of them, fixed to a step when the run starts); see ``bytemtp.train.objective_schedule``.

    ``draft_detach`` (linear heads): the draft heads learn from the trunk's features without
    training the trunk, so head 1 shapes it alone (``bytemtp.train.objective``); False, the
    default and what an older config means, is the paper's shared training.

    ``draft_lr_restart``: the draft heads' own parameters (``ByteMTP.draft_parameters``) follow
    a learning-rate schedule of their own, the run's warm-up and cosine started over at
    ``objective_begin`` and ending with the run, instead of the run's: heads that join late
    would otherwise start learning near the floor of the run's cosine. False (the default,
    and what an older config means): one schedule for every parameter.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 0  # 0: the model's max_seq_len
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_dtype: str = "auto"
    draft_loss_weight: float = 1.0
    objective_schedule: str = "constant"
    draft_weight_initial: float = 0.0
    heads_initial: int = 0
    heads_final: int = 0
    objective_begin: int | float = 0  # a step, or a fraction of the run in (0, 1)
    objective_end: int | float = 0
    draft_detach: bool = False
    draft_lr_restart: bool = False
    seed: int = 0
    loader_mode: str = "concat"
    loss_mode: str = "auto"  # a head schedule of bytemtp.train.objective; auto: the device's default
    eval_every: int = 50  # 0: no periodic eval (nor the final one)
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 3  # newest checkpoints kept; 0 keeps all
    time_budget: float = 0.0  # minutes; 0: no budget
    device: str = "auto"
    compile: bool | None = None  # None: on for CUDA, off for CPU
    fsdp: bool = False
    peak_tflops: float = 0.0  # the GPU's dense bf16 peak for MFU; 0: looked up by its name

    def __post_init__(self) -> None:
        require_at_least_one(self, ("steps", "batch_size", "grad_accum", "log_every"))
        for name in ("seq_len", "warmup_steps", "decay_steps", "eval_every", "ckpt_every", "keep", "weight_decay"):
            if getattr(self, name) < 0:
                raise BytemtpError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            if not getattr(self, name) > 0:
                raise BytemtpError(f"{name}: must be positive, got {getattr(self, name)}")
        if not self.draft_loss_weight >= 0:
            raise BytemtpError(f"draft_loss_weight: must be >= 0, got {self.draft_loss_weight}")
        if not 0 <= self.muon_momentum < 1:
            raise BytemtpError(f"muon_momentum: must be in [0, 1), got {self.muon_momentum}")
        if self.optimizer not in OPTIMIZERS:
            raise BytemtpError(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.muon_dtype not in MUON_DTYPES:
            raise BytemtpError(f"muon_dtype: {self.muon_dtype!r} is not one of {', '.join(MUON_DTYPES)}")
        if self.optimizer == "muon" and self.fsdp:
            raise BytemtpError("optimizer: muon needs whole matrices; it does not run under --fsdp")
        if not 0 <= self.min_lr_ratio <= 1:
            raise BytemtpError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip > 0:
            raise BytemtpError(f"grad_clip: must be positive, got {self.grad_clip}")
        for name in ("time_budget", "peak_tflops"):
            if not getattr(self, name) >= 0:
                raise BytemtpError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.loader_mode not in LOADER_MODES:
            raise BytemtpError(f"loader_mode: {self.loader_mode!r} is not one of {', '.join(LOADER_MODES)}")
        if self.loss_mode not in ("auto", *LOSS_MODES):
            raise BytemtpError(f"loss_mode: {self.loss_mode!r} is not one of auto, {', '.join(LOSS_MODES)}")
        check_train_ranges(self)
        check_schedule(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        return from_dict(cls, d, where)

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """This config with its derived fields filled in, checked against ``model``."""
        seq_len = self.seq_len or model.max_seq_len
        if seq_len > model.max_seq_len:
            raise BytemtpError(f"--seq-len: {seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
        check_heads(self, model.n_future)
        if self.draft_detach and model.head_kind != "linear":
            raise BytemtpError("draft_detach: needs linear heads (transformer heads share head 1's unembedding)")
        return dataclasses.replace(self, seq_len=seq_len, decay_steps=self.decay_steps or self.steps,
                                   **_resolved_schedule(self))


# Upper bounds that keep a finite but absurd value from overflowing inside torch (a traceback) or
# wrecking the weights in one step: AdamW and Muon move each weight by about lr per step, and the
# weights start near 0.02; a draft head weighing more than a thousand times head 1 leaves head 1
# untrained.
MAX_LR = 10.0
MAX_DRAFT_LOSS_WEIGHT = 1000.0


def check_train_ranges(cfg: TrainConfig) -> None:
    """The bounds of ``TrainConfig``'s values beyond their signs: finite floats, the seed within
    what ``--seed`` takes, learning rates and the draft weight within reason, Adam's betas in
    [0, 1), and weight decay that cannot shrink a weight past zero in one step."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BytemtpError(f"{f.name}: must be a finite number, got {value}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise BytemtpError(f"seed: must be in [0, {MAX_SEED}], got {cfg.seed}")
    for name in ("lr", "muon_lr"):
        if getattr(cfg, name) > MAX_LR:
            raise BytemtpError(f"{name}: at most {MAX_LR:g}, got {getattr(cfg, name):g}")
    for name in ("draft_loss_weight", "draft_weight_initial"):  # a schedule's start weighs like its end
        if getattr(cfg, name) > MAX_DRAFT_LOSS_WEIGHT:
            raise BytemtpError(f"{name}: at most {MAX_DRAFT_LOSS_WEIGHT:g}, got {getattr(cfg, name):g}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise BytemtpError(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
    fastest = max(cfg.lr, cfg.muon_lr if cfg.optimizer == "muon" else 0.0)
    if fastest * cfg.weight_decay > 1:
        raise BytemtpError(f"weight_decay: {cfg.weight_decay:g} x the learning rate {fastest:g} exceeds 1, so one "
                           "step would shrink every weight past zero")


# Training defaults per model preset: larger models want a lower peak lr and a longer
# warmup. ``tiny`` trains its blocks' matrices with Muon (see its model preset for the
# measurement) and the rest with the dataclass defaults, chosen so 200 CPU steps clearly learn;
# its draft heads weigh 0.25 in the objective: after 300 steps head 1 reached 2.13 val bits per
# byte where the plain mean over heads gave 2.50, the draft heads' own losses no worse. And
# they join only halfway (weight 0, not computed, for the first half of the run; 0.25 from 55 %
# on): at equal training FLOPs head 1 gained 0.11 bits per byte at 300 steps and 0.04 at 2000,
# with greedy chains as long (bench/bench_recipe.py, bench/RESULTS.md "Objective schedules").
TINY_SCHEDULE: dict[str, Any] = {"objective_schedule": "linear", "draft_weight_initial": 0.0,
                                 "objective_begin": 0.5, "objective_end": 0.55}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"optimizer": "muon", "draft_loss_weight": 0.25, **TINY_SCHEDULE},
    "small": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 200, "steps": 5000, "eval_every": 500, "ckpt_every": 500},
    "base": {"batch_size": 16, "lr": 6e-4, "warmup_steps": 500, "steps": 20000, "eval_every": 1000, "ckpt_every": 1000},
}


def _resolved_schedule(cfg: TrainConfig) -> dict[str, int]:
    """A schedule's steps fixed when the run starts (its end at the run's steps, fractions at theirs),
    so extending the run with ``--resume --steps`` does not stretch a schedule already under way."""
    if cfg.objective_schedule == "constant":
        return {}
    begin, end = schedule_range(cfg)
    return {"objective_begin": begin, "objective_end": end}


_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
_TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat JSON object of ModelConfig and TrainConfig fields; any other key, or a value of
    the wrong type, is an error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BytemtpError(f"--config {path}: unreadable ({e})") from None
    return checked_fields(data, (ModelConfig, TrainConfig), f"--config {path}")


def checked_fields(data: Any, classes: tuple[type, ...], where: str) -> dict[str, Any]:
    """``data`` as fields of the dataclasses ``classes``: a JSON object whose every key is a
    field of one of them and whose every value has that field's type (an int where a float
    is wanted is fine, a bool where an int is wanted is not). Anything else is an error
    naming ``where`` and the field, so a config of the wrong shape never reaches a
    constructor, where it would fail with a TypeError far from its cause."""
    names = " or ".join(c.__name__ for c in classes)
    if not isinstance(data, dict):
        raise BytemtpError(f"{where}: expected a JSON object of {names} fields, got {type(data).__name__}")
    hints = {}
    for cls in reversed(classes):
        hints.update(typing.get_type_hints(cls))
    fields = {}
    for key, value in data.items():
        if key not in hints:
            raise BytemtpError(f"{where}: unknown field {key!r} (not a {names} field)")
        allowed = typing.get_args(hints[key]) if isinstance(hints[key], types.UnionType) else (hints[key],)
        if not any(_has_type(value, t) for t in allowed):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise BytemtpError(f"{where}: {key} must be {wanted}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e999, Infinity, NaN
            raise BytemtpError(f"{where}: {key} must be a finite number, got {value}")
        fields[key] = float(value) if allowed == (float,) else value
    return fields


def _has_type(value: Any, t: type) -> bool:
    if t is type(None):
        return value is None
    if t in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if t is float else t)


def load_config(cls: type, data: Any, where: str) -> Any:
    """A ``cls`` (ModelConfig, TrainConfig) from JSON ``data``, checked; its own value checks
    then name ``where`` too."""
    fields = checked_fields(data, (cls,), where)
    try:
        return cls(**fields)
    except BytemtpError as e:
        raise BytemtpError(f"{where}: {e}") from None


def build_configs(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    saved: tuple[ModelConfig, TrainConfig] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Combine the sources of a run's configs (see the module docstring for precedence).

    ``saved`` is the checkpoint's (model, train) configs when resuming; ``preset``
    defaults to ``tiny`` for a new run and to nothing (the saved model) on resume.
    """
    if saved is None:
        name = preset or "tiny"
        if name not in PRESETS:
            raise BytemtpError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        model_fields, train_fields = PRESETS[name].to_dict(), TRAIN_PRESETS[name].copy()
    else:
        model_fields, train_fields = saved[0].to_dict(), saved[1].to_dict()
        defaults = TrainConfig().to_dict()
        train_fields.update({k: defaults[k] for k in PER_INVOCATION})
        if preset is not None:
            if preset not in PRESETS:
                raise BytemtpError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
            model_fields = PRESETS[preset].to_dict()
    given = read_config_file(config_file) if config_file is not None else {}
    given.update(overrides or {})
    if "objective_schedule" in given:  # a schedule given replaces the one inherited, not field by field
        defaults = TrainConfig().to_dict()
        train_fields.update({k: defaults[k] for k in SCHEDULE_FIELDS})
    for key, value in given.items():
        if key in _MODEL_FIELDS:
            model_fields[key] = value
        elif key in _TRAIN_FIELDS:
            train_fields[key] = value
        else:
            raise BytemtpError(f"unknown config field {key!r}")
    return ModelConfig.from_dict(model_fields), TrainConfig.from_dict(train_fields)


def saved_configs(meta: dict[str, Any], ckpt: Path) -> tuple[ModelConfig, TrainConfig]:
    """The (model, train) configs a training checkpoint's config.json recorded."""
    if not meta.get("train"):
        raise BytemtpError(f"{ckpt}: not a training checkpoint (no train config); cannot resume from it")
    where = f"{ckpt}/config.json"
    return load_config(ModelConfig, meta.get("model"), f"{where} model"), load_config(
        TrainConfig, meta["train"], f"{where} train"
    )


def merge_for_resume(
    saved: tuple[ModelConfig, TrainConfig], model: ModelConfig | None, train: TrainConfig, ckpt: Path
) -> tuple[ModelConfig, TrainConfig]:
    """The configs a resumed run uses: the saved ones, with only resumable changes taken
    from ``train``. ``model=None`` means "whatever the checkpoint has"."""
    saved_model, saved_train = saved
    if model is not None:
        _check_same(saved_model.to_dict(), model.to_dict(), ckpt, skip=frozenset())
    _check_same(saved_train.to_dict(), train.to_dict(), ckpt, skip=RESUMABLE_CHANGES)
    changes = {k: getattr(train, k) for k in RESUMABLE_CHANGES}
    return saved_model, dataclasses.replace(saved_train, **changes)


def _check_same(saved: dict[str, Any], given: dict[str, Any], ckpt: Path, skip: frozenset[str]) -> None:
    for key, value in given.items():
        if key in skip or (key in AUTO_ZERO and value == 0):
            continue
        if saved.get(key) != value:
            raise BytemtpError(
                f"--resume: {key}={value!r} contradicts the checkpoint's {key}={saved.get(key)!r} ({ckpt}); "
                "drop the flag or start a new run"
            )
