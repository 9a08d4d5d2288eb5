"""The training loop behind ``bytemtp train`` (and ``bytemtp demo``, through ``train()``).

One optimizer step takes ``grad_accum`` micro-batches from the loader; each goes
forward through the (DDP- or FSDP2-wrapped) objective and backward, with gradient
synchronisation only on the last; then clipping, AdamW and the lr schedule. No
step reads anything back from the device: the host queues steps ahead of it, and
looks at the device only at logged, evaluated or saved steps and every
``CHECK_EVERY`` steps. There the ranks agree on whether to stop (a signal arrived,
the time budget is spent, a loss or gradient went non-finite) with one tiny
all-reduce, so all ranks always take the same branch and no collective is left
waiting.

Exact resume: a checkpoint holds everything the next step depends on (weights,
optimizer moments, the schedule, the loader's stream position, every rank's RNGs),
so continuing from step k replays steps k+1, k+2, ... as an uninterrupted run
would, bitwise in fp32 on the CPU, and ``metrics.jsonl`` is cut back to step k so
the log reads as one run. SIGINT and SIGTERM finish the current step, save a
checkpoint and end the run with status 128 + signal; SIGKILL loses at most the
steps since the last periodic checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bytemtp.compile import compile_model
from bytemtp.data.loader import BatchLoader, LoaderConfig
from bytemtp.data.trigrams import count_byte_trigrams
from bytemtp.errors import BytemtpError
from bytemtp.model.config import ModelConfig
from bytemtp.model.size import require_training_memory
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.checkpoint import (
    check_out_dir,
    latest_checkpoint,
    list_checkpoints,
    load_train_state,
    load_weights,
    read_config,
    remove_stale,
    save_checkpoint,
)
from bytemtp.train.config import TrainConfig, merge_for_resume, saved_configs
from bytemtp.train.distributed import (
    DistEnv,
    all_reduce,
    broadcast_from_main,
    gather_to_main,
    init_distributed,
    shutdown,
)
from bytemtp.train.evaluate import EvalResult, evaluate, require_split
from bytemtp.train.flops import mean_flops_per_byte, peak_flops
from bytemtp.train.full_state import full_model_state, full_optimizer_state, load_optimizer_state
from bytemtp.train.metrics import METRICS, MetricsLog, progress_text
from bytemtp.train.nonfinite import NonFiniteWatch, refuse_nonfinite_weights
from bytemtp.train.objective import LN2, resolve_loss_mode, trained_heads
from bytemtp.train.objective_schedule import draft_weights, logged_weights
from bytemtp.train.optim import MuonAdamW, build_optimizer, build_scheduler
from bytemtp.train.parallel import MTPObjective, as_local, gradient_sync, unwrap, wrap
from bytemtp.train.precision import autocast, training_precision
from bytemtp.train.rng import rng_state, set_rng_state
from bytemtp.train.signals import FINISHING_STEP, StopSignals, stop_reason

# The most steps the host queues ahead before it reads the device's non-finite flag
# (and, under torchrun, before the ranks agree on signals and the time budget).
CHECK_EVERY = 16


@dataclass
class TrainResult:
    step: int  # optimizer steps completed by the run so far
    stop_reason: str  # "done", "time budget", "SIGINT", "SIGTERM" or "already done"
    checkpoint: Path | None  # the newest checkpoint of the run
    val_bpb_heads: list[float] | None = None  # the last eval of this invocation, head 1 first
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """0, or 128 + signal number for a run stopped by SIGINT (130) / SIGTERM (143)."""
        return 128 + self.signal if self.signal else 0


def train(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig | None,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or with ``resume``, continue) the run in ``out_dir`` on the dataset ``data_dir``.

    ``model_cfg=None`` means the default ``ModelConfig`` for a new run and the
    checkpoint's for a resumed one. A resumed run keeps the checkpoint's configs;
    only the fields in ``train_config.RESUMABLE_CHANGES`` are taken from
    ``train_cfg``, anything else that differs is an error naming the field. Under
    torchrun every rank calls this.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_out_dir(out_dir)
    require_split(data_dir, "train")
    if train_cfg.eval_every:
        require_split(data_dir, "val", " (needed for eval; pass --eval-every 0 to train without it)")
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise BytemtpError(f"--resume: {out_dir} has no checkpoint to resume from")
        model_cfg, train_cfg = merge_for_resume(saved_configs(read_config(ckpt), ckpt), model_cfg, train_cfg, ckpt)
    else:
        if list_checkpoints(out_dir):
            raise BytemtpError(
                f"--out: {out_dir} already holds checkpoints; pass --resume to continue, or pick another --out"
            )
        ckpt, model_cfg = None, model_cfg or ModelConfig()
        train_cfg = train_cfg.resolved(model_cfg)
    env = init_distributed(train_cfg.device)
    try:
        with training_precision(env.device):
            return _Run(env, train_cfg, model_cfg, data_dir, out_dir, ckpt, progress).run()
    finally:
        shutdown(env)


class _Run:
    """The state of one training invocation on one rank."""

    def __init__(
        self,
        env: DistEnv,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        data_dir: Path,
        out_dir: Path,
        ckpt: Path | None,
        progress: bool,
    ):
        self.env, self.cfg, self.data_dir, self.out_dir, self.progress = env, cfg, data_dir, out_dir, progress
        require_training_memory(model_cfg, cfg.batch_size, cfg.seq_len, env.device, env.world_size if cfg.fsdp else 1)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = ByteMTP(model_cfg)
        if ckpt is not None:
            load_weights(self.model, ckpt)
            refuse_nonfinite_weights(self.model.state_dict(), f"--resume: {ckpt}",
                                     "it is no checkpoint to continue from (resume from an earlier one)")
        self.model.to(env.device)
        compile_model(self.model, cfg.compile)
        mode = resolve_loss_mode(cfg.loss_mode, env.device)
        self.wrapped = wrap(MTPObjective(self.model, mode, cfg.draft_loss_weight, cfg.draft_detach), env, cfg.fsdp)
        self.objective = unwrap(self.wrapped)
        # Saved with every checkpoint, so counted where checkpoints are written: on the main rank,
        # after wrapping, so no process group syncs it, and on the host.
        if env.is_main:
            self.model.byte_trigrams = torch.from_numpy(count_byte_trigrams(data_dir))
        self.optimizer = build_optimizer(self.model, cfg, env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.muon = self.optimizer.muon if isinstance(self.optimizer, MuonAdamW) else None
        loader_cfg = LoaderConfig(cfg.batch_size, cfg.seq_len, model_cfg.n_future, cfg.loader_mode, cfg.seed)
        self.loader = BatchLoader(data_dir, loader_cfg, "train", rank=env.rank, world_size=env.world_size,
                                  device=env.device)
        self.bytes_per_step = env.world_size * cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.step = 0
        self.last_ckpt = ckpt
        self.metrics: MetricsLog | None = None
        self.start = 0.0  # when this invocation's loop began (the time budget counts from here)
        self.last: tuple[torch.Tensor, torch.Tensor, float] | None = None  # head losses, grad norm, lr
        self._mark = (0.0, 0)  # (time, step) that bytes/s is measured from
        self.flops_per_byte = mean_flops_per_byte(model_cfg, cfg)  # over the run: a head schedule varies it
        self.peak_flops = peak_flops(env.device, cfg.peak_tflops)
        if ckpt is not None:
            self._restore(ckpt)
        self.watch = NonFiniteWatch(env.device, self.step)
        self.stop_signal = 0  # the signal the ranks agreed to stop for

    # -- resume ------------------------------------------------------------------
    def _restore(self, ckpt: Path) -> None:
        state = load_train_state(ckpt)
        if state["world_size"] != self.env.world_size:
            raise BytemtpError(
                f"--resume: {ckpt} was written by {state['world_size']} processes, this run has "
                f"{self.env.world_size}; that would change the global batch (processes x batch size x grad accum)"
            )
        load_optimizer_state(self.objective, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"][self.env.rank], self.env.device)
        self.step = state["step"]

    # -- the loop ----------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        if self.step >= cfg.steps:
            self._say(f"{self.out_dir} is already at step {self.step} of {cfg.steps}; nothing to do")
            return TrainResult(self.step, "already done", self.last_ckpt)
        if env.is_main:
            remove_stale(self.out_dir)
            self.metrics = MetricsLog(self.out_dir / METRICS, keep_upto=self.step if self.last_ckpt else None)
        if self.last_ckpt is not None:
            self._say(f"resuming from {self.last_ckpt}")
        if self.muon is not None:
            self._say(self.muon.describe())
        self.start = time.monotonic()
        self._reset_throughput()
        val: EvalResult | None = None
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                   disable=not (self.progress and env.is_main))
        try:
            with StopSignals(announce=env.is_main) as signals:
                reason = None
                while reason is None:
                    self._step()
                    bar.update(1)
                    reason = self._check(signals)
                    val = self._after_step(reason, signals, bar) or val
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if self.stop_signal:
            self._say(f"{reason}: saved {self.last_ckpt}; continue with --resume")
        return TrainResult(self.step, reason, self.last_ckpt, val.bpb_heads if val else None, self.stop_signal or None)

    def _step(self) -> None:
        """One optimizer step, queued without waiting for the device."""
        self.objective.draft_loss_weight = draft_weights(self.cfg, self.step + 1, self.model.cfg.n_future)
        head_losses, grad_norm = self._accumulate()
        self.watch.observe(head_losses, grad_norm)
        self.last = (head_losses, grad_norm, self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _accumulate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward ``grad_accum`` micro-batches, clip; -> (mean head losses [n], grad norm)."""
        accum = self.cfg.grad_accum
        total = None
        for i in range(accum):
            ids = next(self.loader)
            with gradient_sync(self.wrapped, i == accum - 1):
                with autocast(self.env.device):
                    loss, head_losses = self.wrapped(ids)
                (loss / accum).backward()
            total = head_losses if total is None else total + head_losses
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return total / accum, as_local(grad_norm)

    def _check(self, signals: StopSignals) -> str | None:
        """Why to stop after the step just taken, or None; raises if a step went non-finite.

        Signals and the time budget are host facts, so a single process acts on them
        at once. The device is read (and ranks agree) only at steps that synchronise
        anyway or must (logs, evals, checkpoints, the end) and every ``CHECK_EVERY``
        steps otherwise: the host runs ahead of the device in between.
        """
        finished = self.step >= self.cfg.steps
        signum = signals.received or 0
        over = bool(self.cfg.time_budget) and time.monotonic() - self.start > self.cfg.time_budget * 60
        local_stop = not self.env.distributed and (signum or over)
        if not (finished or local_stop or self._scheduled()):
            return None
        self.stop_signal, over, bad = self._agree(signum, over)
        if bad:
            raise self.watch.error(self.last_ckpt)
        return stop_reason(self.stop_signal, finished, over)

    def _scheduled(self) -> bool:
        """Steps whose number alone makes them read the device: logged, evaluated, saved, or due a check."""
        cfg, step = self.cfg, self.step
        return step == 1 or any(every and step % every == 0
                                for every in (cfg.log_every, cfg.eval_every, cfg.ckpt_every, CHECK_EVERY))

    def _agree(self, signum: int, over_budget: bool) -> tuple[int, bool, bool]:
        """(signal number or 0, time budget spent, a step went non-finite), the max over ranks."""
        host = torch.tensor([float(signum), float(over_budget)]).to(self.env.device, non_blocking=True)
        flags = torch.cat([host, self.watch.flag[None]])
        sig, over, bad = all_reduce(flags, self.env, "max").tolist()
        return int(sig), bool(over), bool(bad)

    def _after_step(self, reason: str | None, signals: StopSignals, bar: tqdm) -> EvalResult | None:
        """Log, save and evaluate as due after the step just taken; -> the eval, if any.

        Which steps are logged and evaluated depends only on the step number and the
        config (plus a clean end of the run), so a resumed run logs what an
        uninterrupted one would; every rank takes part in the reductions. The
        checkpoint comes before the evaluation, so a run stopped during its final
        evaluation has already saved its last step.
        """
        cfg = self.cfg
        clean_end = reason in ("done", "time budget")
        evaluating = bool(cfg.eval_every) and (self.step % cfg.eval_every == 0 or clean_end)
        logging = evaluating or clean_end or self.step == 1 or self.step % cfg.log_every == 0
        saving = reason is not None or bool(cfg.ckpt_every and self.step % cfg.ckpt_every == 0)
        record = self._train_record() if logging else None
        if saving:
            self._save()
        val = None
        if evaluating:
            signals.status = (f"step {self.step} is saved in {self.last_ckpt}; finishing the final evaluation"
                              if reason is not None else "finishing the evaluation, then one step and a checkpoint")
            val = self._evaluate()
            signals.status = FINISHING_STEP
        if record is not None:
            if val is not None:
                record.update(val_bpb=val.bpb, val_bpb_heads=val.bpb_heads)
            self._log(record, bar)
        if logging or saving:
            self._reset_throughput()
        return val

    def _train_record(self) -> dict[str, Any]:
        """The metrics of the step just taken and the throughput since the last mark."""
        head_losses, grad_norm, lr = self.last
        trained = trained_heads(self.model.cfg.n_future, self.objective.draft_loss_weight)  # the others: not computed
        losses = all_reduce(head_losses, self.env).tolist()  # waits for the device
        bpb_heads = [x / LN2 if k in trained else None for k, x in enumerate(losses)]
        seconds = max(time.monotonic() - self._mark[0], 1e-9)
        bytes_per_s = (self.step - self._mark[1]) * self.bytes_per_step / seconds
        record = {
            "step": self.step,
            "loss": sum(bpb_heads[k] for k in trained) / len(trained),
            "bpb_heads": bpb_heads,
            "head_weights": logged_weights(self.objective.draft_loss_weight),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "bytes": self.step * self.bytes_per_step,
            "bytes_per_s": bytes_per_s,
        }
        if self.muon is not None:
            record["muon_dtype"] = self.muon.dtype_name
        if self.env.device.type == "cuda":
            per_gpu = bytes_per_s / self.env.world_size
            record["bytes_per_s_per_gpu"] = per_gpu
            if self.peak_flops:
                record["mfu"] = self.flops_per_byte * per_gpu / self.peak_flops
        return record

    def _reset_throughput(self) -> None:
        """Measure bytes/s from now on, so eval and checkpoint time do not count as training."""
        self._mark = (time.monotonic(), self.step)

    def _evaluate(self) -> EvalResult:
        return evaluate(
            self.objective,
            self.data_dir,
            n_future=self.model.cfg.n_future,
            batch_size=self.cfg.batch_size,
            seq_len=self.cfg.seq_len,
            device=self.env.device,
        )

    def _log(self, record: dict[str, Any], bar: tqdm) -> None:
        if self.metrics is None:
            return
        self.metrics.write(record)
        bar.set_postfix_str(progress_text(record), refresh=False)

    def _say(self, text: str) -> None:
        if self.env.is_main and self.progress:
            tqdm.write(text)

    # -- checkpoints -------------------------------------------------------------
    def _save(self) -> None:
        """Gather the full state onto rank 0, which writes it; every rank learns the outcome."""
        env = self.env
        weights = full_model_state(self.objective)
        optimizer = full_optimizer_state(self.objective, self.optimizer)
        rngs = gather_to_main(rng_state(env.device), env)
        outcome: tuple[Path | None, str | None] = (None, None)
        if env.is_main:
            state = {
                "step": self.step,
                "world_size": env.world_size,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(),  # a stream position, the same on every rank
                "rng": rngs,
            }
            try:
                kept = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "none was written"
                refuse_nonfinite_weights(weights, f"step {self.step}: not saved", f"stopped; {kept}")
                path = save_checkpoint(
                    self.out_dir, self.step, self.model, train_config=self.cfg.to_dict(),
                    train_state=state, keep=self.cfg.keep, weights=weights,
                )
                outcome = (path, None)
            except BytemtpError as e:
                outcome = (None, str(e))
        path, error = broadcast_from_main(outcome, env)
        if error is not None:
            raise BytemtpError(error)
        self.last_ckpt = path
