"""Checkpoint directories: weights, configs and training state, written atomically.

Layout of ``RUN/checkpoints/step-NNNNNNN/``: ``model.safetensors`` (weights),
``config.json`` (model config, train config, step, package version) and, for
training runs, ``train_state.pt`` (optimizer, scheduler, loader, RNG). Each is
built in a temporary directory and renamed into place, then ``latest`` (a
symlink) is switched to it, so a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bytemtp import __version__
from bytemtp.atomic import atomic_dir, fsync_dir
from bytemtp.config import ModelConfig
from bytemtp.errors import BytemtpError
from bytemtp.model import ByteMTP

WEIGHTS, CONFIG, TRAIN_STATE, LATEST = "model.safetensors", "config.json", "train_state.pt", "latest"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs never match the name pattern)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / CONFIG).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _point_latest(root: Path, target: Path) -> None:
    tmp = root / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: ByteMTP,
    *,
    train_config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir``, point ``latest`` at it, keep the newest ``keep``."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_dir(final, replace=True) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS))
        meta = {"bytemtp_version": __version__, "step": step, "model": model.cfg.to_dict(), "train": train_config}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    _point_latest(root, final)
    if keep is not None and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    path = Path(path)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    latest = checkpoints_dir(path) / LATEST
    if latest.exists():
        return latest.resolve()
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    raise BytemtpError(f"{path}: not a checkpoint or a run directory with checkpoints")


def read_config(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BytemtpError(f"{ckpt / CONFIG}: unreadable checkpoint config ({e})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ByteMTP, dict[str, Any]]:
    """The model of checkpoint (or run) ``path`` in eval mode, and its config.json."""
    ckpt = resolve_checkpoint(path)
    meta = read_config(ckpt)
    model = ByteMTP(ModelConfig.from_dict(meta["model"]))
    try:
        weights = load_file(str(ckpt / WEIGHTS), device=str(device))
    except (OSError, SafetensorError) as e:
        raise BytemtpError(f"{ckpt / WEIGHTS}: unreadable weights ({e})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise BytemtpError(f"{ckpt / WEIGHTS}: weights do not match the config ({'missing' if missing else 'unexpected'} {name})")
    return model.to(device).eval(), meta


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    if not (ckpt / TRAIN_STATE).is_file():
        raise BytemtpError(f"{ckpt}: no {TRAIN_STATE} (not a training checkpoint)")
    return torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=False)
