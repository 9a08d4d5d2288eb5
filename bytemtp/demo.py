"""``bytemtp demo``: the whole pipeline on the embedded corpus.

Prepare ``builtin:python-stdlib`` (reused when the cached copy is current), train
the ``tiny`` preset, sample a completion, and measure the self-speculative speedup.

By default training runs a fixed number of steps per device type
(``DEMO_STEPS``), so the same seed trains the same model on every machine with the
same CPU (another CPU rounds differently: a slightly different model) and only the
time it takes varies: a time budget made a slower or busier
machine train fewer steps and show a worse model and a smaller speedup (557 steps
and 2.86 bits per byte on one 2-core machine, 757 and 2.38 on a faster day).
``minutes`` is the explicit override: the step count is then calibrated from a
few timed steps of the step training will run (on a GPU compiled and in bf16, its
compilation time taken off the budget) so that the cosine schedule actually ends
inside the budget (a run cut off by a time budget mid-schedule would be worse
than a shorter run that finished).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from bytemtp import user_cache_dir
from bytemtp.compile import compile_model
from bytemtp.errors import BytemtpError
from bytemtp.model.config import ModelConfig, preset
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.checkpoint import load_model, save_checkpoint
from bytemtp.train.config import TRAIN_PRESETS, TrainConfig
from bytemtp.train.distill import DistillConfig, distill, training_prompts
from bytemtp.train.objective import resolve_loss_mode
from bytemtp.train.optim import build_optimizer
from bytemtp.train.precision import training_precision
from bytemtp.train.step_timing import timed, training_step

CORPUS = "builtin:python-stdlib"

# The demo's fixed schedule, by device type. CPU: about 7 minutes of training on an idle
# 2-core CPU: the plain AdamW step of 16 x 256 bytes took 0.58 s there, the tiny recipe's
# (Muon, ReLU², QK-norm) 1.15x that measured side by side, and the one evaluation of the
# val split at the end ~15 s; so the whole demo fits in 10 (a faster 2-core Xeon trains the
# 600 steps in 2 min 17 s). CUDA: not measured (no GPU
# was at hand); more steps, still under one pass over the corpus (5000 x 4096 bytes of
# its 31 MB).
DEMO_STEPS: dict[str, int] = {"cpu": 600, "cuda": 5000}


def default_cache_dir() -> Path:
    return user_cache_dir() / "python-stdlib"


@dataclass
class DemoConfig:
    minutes: float | None  # None: the fixed schedule of DEMO_STEPS; else a time budget
    data_dir: Path
    out: Path
    device: torch.device
    prompt: bytes = b"import os\n\n\ndef "
    sample_bytes: int = 300
    temperature: float = 0.7  # greedy text from a model this small soon repeats itself
    bench_prompts: int = 12  # a median over fewer moves by 0.3x from run to run
    bench_bytes: int = 192
    bench_tree: int = 15  # the bench's last row verifies a draft tree of this many bytes (bytemtp.decode.tree)
    # ``bytemtp distill`` at a quarter of its defaults: about a minute on a 2-core CPU, and on the
    # demo's model as many bytes per forward as the defaults (96 prompts at T = 0.7: 3.02 either way)
    distill_prompts: int = 256

    def __post_init__(self) -> None:
        if self.minutes is not None and not self.minutes > 0:
            raise BytemtpError(f"--minutes: must be positive, got {self.minutes}")


def ensure_dataset(data_dir: Path) -> bool:
    """Prepare the built-in corpus into ``data_dir`` unless it is already there; True if reused."""
    from bytemtp.data.prepare import is_up_to_date, prepare

    if is_up_to_date(data_dir, [CORPUS]):
        return True
    prepare([CORPUS], data_dir, overwrite=True)
    return False


def distilled_dir(out: Path) -> Path:
    """Where the demo writes its distilled run: beside the trained one (``runs/demo-distilled``), as
    ``bytemtp distill --out`` would, never inside it."""
    return out.with_name(out.name + "-distilled")


def distill_demo(cfg: DemoConfig) -> tuple[ByteMTP, Path, dict]:
    """Fit the trained run's draft heads to head 1's own text at the demo's temperature (and greedy
    drafts' coupling table to them), as ``bytemtp distill`` does with ``cfg.distill_prompts``
    prompts and text windows -> the distilled model, its checkpoint and distill's report."""
    model, meta = load_model(cfg.out, cfg.device)
    distill_cfg = DistillConfig(prompts=cfg.distill_prompts, text=cfg.distill_prompts, holdout=32,
                                temperature=cfg.temperature)
    prompts, windows = training_prompts(cfg.data_dir, distill_cfg)
    result = distill(model, prompts, distill_cfg, windows, progress=True)
    path = save_checkpoint(distilled_dir(cfg.out), meta["step"], model, train_config=meta.get("train"),
                           distill={"from": str(cfg.out), **vars(distill_cfg), **result})
    return model, path, result


def fresh_run_dir(out: Path) -> None:
    """Clear a previous demo run at ``out``; refuse to touch a directory that is not a run."""
    if not out.exists():
        return
    if not ((out / "checkpoints").is_dir() or (out / "metrics.jsonl").is_file() or not any(out.iterdir())):
        raise BytemtpError(f"--out: {out} exists and is not a bytemtp run directory; pick another --out")
    shutil.rmtree(out)


@dataclass
class StepCost:
    """What a training step of the demo's shape costs on its device."""

    per_step: float  # seconds, the median of a few steps after the first
    warmup: float  # seconds the first step takes beyond that: compilation, where the step is compiled


def measure_step(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, trials: int = 3) -> StepCost:
    """Time the step training will run, on random data: the same compile policy, precision,
    head schedule and optimizer (on CUDA: the compiled bf16 step, its compilation timed too;
    on the CPU: the eager fp32 step)."""
    model = ByteMTP(model_cfg).to(device)
    compiled = compile_model(model, train_cfg.compile)
    ids = torch.randint(0, 256, (train_cfg.batch_size, train_cfg.seq_len + model_cfg.n_future), device=device)
    mode = resolve_loss_mode(train_cfg.loss_mode, device)
    step = training_step(model, ids, mode, build_optimizer(model, train_cfg, device))
    with training_precision(device):
        times = [timed(step, device) for _ in range(trials + 1)]
    per_step = sorted(times[1:])[trials // 2]
    return StepCost(per_step, max(0.0, times[0] - per_step) if compiled else 0.0)


def plan_steps(cfg: DemoConfig) -> tuple[ModelConfig, TrainConfig]:
    """The tiny preset and the demo's TrainConfig: ``DEMO_STEPS`` of the device's type, or
    with ``cfg.minutes`` a schedule that fits that budget (eval/ckpt overhead included)."""
    model_cfg = preset("tiny")
    if cfg.minutes is None:
        return model_cfg, demo_schedule(model_cfg, fixed_steps(cfg.device), cfg.device)
    base = TrainConfig(**TRAIN_PRESETS["tiny"], device=str(cfg.device)).resolved(model_cfg)  # the recipe's optimizer
    cost = measure_step(model_cfg, base, cfg.device)
    steps = max(50, int(0.85 * (cfg.minutes * 60 - cost.warmup) / cost.per_step))
    return model_cfg, demo_schedule(model_cfg, steps, cfg.device, cfg.minutes)


def fixed_steps(device: torch.device) -> int:
    """The demo's step count on ``device``: a GPU of any kind trains the CUDA schedule, anything
    else the CPU's."""
    return DEMO_STEPS["cuda" if device.type == "cuda" else "cpu"]


def demo_schedule(model_cfg: ModelConfig, steps: int, device: torch.device, minutes: float = 0.0) -> TrainConfig:
    """``steps`` of the tiny preset's training recipe, evaluated once at the end (an evaluation
    of the val split costs as much as ~25 training steps) and saved five times, the newest
    kept; ``minutes`` > 0 also stops it at that time budget."""
    return TrainConfig(
        **TRAIN_PRESETS["tiny"],
        steps=steps,
        warmup_steps=min(100, steps // 10),
        eval_every=steps,
        ckpt_every=max(10, steps // 5),
        keep=1,
        time_budget=minutes,
        device=str(device),
    ).resolved(model_cfg)
