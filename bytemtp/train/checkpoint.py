"""Checkpoint directories: weights, configs and training state, written atomically.

Layout of ``RUN/checkpoints/step-NNNNNNN/``: ``model.safetensors`` (weights),
``config.json`` (model config, train config, step, package version),
``byte_trigrams.safetensors`` when the model knows its training data's byte-trigram counts
(``bytemtp.data.trigrams``; older checkpoints have none), ``draft_coupling.safetensors`` when
``distill`` fitted a coupling table to its draft heads (``bytemtp.train.couple``) and, for
training runs, ``train_state.pt`` (optimizer, scheduler, loader, RNG). Each is
built in a temporary directory and renamed into place, then ``latest`` (a
symlink) is switched to it, so a crash at any moment leaves the previous
checkpoint complete and ``latest`` pointing at a complete one. A write that fails
(a full disk) is reported as a ``BytemtpError`` naming the checkpoint, and leaves
the previous one and ``latest`` as they were.
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
from bytemtp.data.atomic import atomic_dir, fsync_dir
from bytemtp.data.shards import is_dataset_dir
from bytemtp.decode.coupling import FittedCoupling
from bytemtp.errors import BytemtpError
from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.config import load_config

WEIGHTS, CONFIG, TRAIN_STATE, LATEST = "model.safetensors", "config.json", "train_state.pt", "latest"
TRIGRAMS = "byte_trigrams.safetensors"
COUPLING = "draft_coupling.safetensors"
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
    weights: dict[str, torch.Tensor] | None = None,
    distill: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir``, point ``latest`` at it, keep the newest ``keep``.

    ``weights`` replaces ``model.state_dict()`` where the model's own parameters are
    shards (FSDP2) and the full weights were gathered elsewhere. ``distill``: how the draft
    heads were refitted (``bytemtp.train.distill``), recorded in config.json.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:07d}"
    if weights is None:
        weights = model.state_dict()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final, replace=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
            if model.byte_trigrams is not None:
                codes, counts = model.byte_trigrams.cpu()
                save_file({"codes": codes.clone(), "counts": counts.clone()}, str(tmp / TRIGRAMS))
            if model.fitted_coupling is not None:
                save_file({k: v.cpu().contiguous() for k, v in model.fitted_coupling._asdict().items()},
                          str(tmp / COUPLING))
            meta = {"bytemtp_version": __version__, "step": step, "model": model.cfg.to_dict(), "train": train_config}
            if distill is not None:
                meta["distill"] = distill
            (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
            if train_state is not None:
                torch.save(train_state, tmp / TRAIN_STATE)
        _point_latest(root, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap I/O errors in their own
        previous = latest_checkpoint(run_dir)
        kept = f"{previous} is intact" if previous is not None else "there is no earlier checkpoint"
        raise BytemtpError(f"{final}: checkpoint not written ({_reason(e)}); {kept}") from None
    if keep is not None and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points at (or the newest complete one), None if there is none."""
    latest = checkpoints_dir(run_dir) / LATEST
    if latest.exists():
        return latest.resolve()
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale(run_dir: str | os.PathLike) -> None:
    """Delete what an interrupted write left behind: temp dirs and the ``latest`` temp link.

    Only names that ``atomic_dir`` and ``_point_latest`` create (dot-prefixed) are
    touched; complete checkpoints never match.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name == f".{LATEST}.tmp":
            p.unlink()
        elif p.name.startswith(".step-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    path = Path(path)
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    raise BytemtpError(f"{path}: not a checkpoint or a run directory with checkpoints")


def check_out_dir(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse an ``--out`` run directory where its checkpoints would damage other data, or be damaged:
    inside a prepared dataset (a later ``prepare --overwrite`` of it deletes the run), or inside or
    around ``source``, the checkpoint (or run) being read: a checkpoint written into another run's
    ``checkpoints/`` is pruned by that run's ``--keep``, and one written inside a checkpoint goes
    with it."""
    out_dir = Path(out_dir)
    out = out_dir.resolve()
    inside = next((p for p in (out, *out.parents) if is_dataset_dir(p)), None)
    if inside is not None:
        raise BytemtpError(f"--out: {out_dir} is inside the prepared dataset {inside}; pick a directory outside it")
    if source is None:
        return
    ckpt = resolve_checkpoint(source).resolve()
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    for kept in (ckpt, run):
        if out == kept or kept in out.parents or out in kept.parents:
            raise BytemtpError(f"--out: {out_dir} is inside or holds {kept}, which is being read; "
                               "pick a directory apart from it")


def _reason(e: Exception) -> str:
    """The first line of an error's own description (torch's run to several)."""
    text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0]


def read_config(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's config.json: a JSON object (its parts are checked where they are used)."""
    try:
        meta = json.loads((ckpt / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BytemtpError(f"{ckpt / CONFIG}: unreadable checkpoint config ({e})") from None
    if not isinstance(meta, dict):
        raise BytemtpError(f"{ckpt / CONFIG}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_weights(model: ByteMTP, ckpt: Path) -> None:
    """Copy checkpoint ``ckpt``'s weights into ``model`` (same config), naming any mismatch."""
    try:
        weights = load_file(str(ckpt / WEIGHTS), device="cpu")
    except (OSError, SafetensorError) as e:
        raise BytemtpError(f"{ckpt / WEIGHTS}: unreadable weights ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of another shape: the config no longer describes these weights
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), _reason(e))
        raise BytemtpError(f"{ckpt / WEIGHTS}: weights do not match the config ({mismatch})") from None
    if missing or unexpected:
        name = (missing or unexpected)[0]
        what = "missing" if missing else "unexpected"
        raise BytemtpError(f"{ckpt / WEIGHTS}: weights do not match the config ({what} {name})")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ByteMTP, dict[str, Any]]:
    """The model of checkpoint (or run) ``path`` in eval mode, and its config.json."""
    ckpt = resolve_checkpoint(path)
    meta = read_config(ckpt)
    model = ByteMTP(load_config(ModelConfig, meta.get("model"), f"{ckpt / CONFIG} model"))
    load_weights(model, ckpt)
    model.byte_trigrams = load_byte_trigrams(ckpt, model.cfg.vocab)
    model.fitted_coupling = load_fitted_coupling(ckpt, model.cfg.vocab)
    return model.to(device).eval(), meta


def load_byte_trigrams(ckpt: Path, vocab: int) -> torch.Tensor | None:
    """Checkpoint ``ckpt``'s byte-trigram codes and counts [2, n] (int64), None if it has none."""
    path = ckpt / TRIGRAMS
    table = _side_tensors(path, "byte-trigram counts")
    if table is None:
        return None
    codes, counts = table.get("codes"), table.get("counts")
    ok = codes is not None and counts is not None and codes.dtype == counts.dtype == torch.int64
    ok = ok and codes.dim() == 1 and codes.shape == counts.shape
    ok = ok and bool((counts > 0).all()) and bool((codes.diff() > 0).all())
    ok = ok and (codes.numel() == 0 or 0 <= codes[0].item() and codes[-1].item() < vocab**3)
    if not ok:
        raise BytemtpError(
            f"{path}: expected int64 'codes' (ascending, below {vocab}^3) and positive int64 'counts' of one length"
        )
    return torch.stack((codes, counts))


def load_fitted_coupling(ckpt: Path, vocab: int) -> FittedCoupling | None:
    """Checkpoint ``ckpt``'s fitted coupling table, None if it has none."""
    path = ckpt / COUPLING
    tables = _side_tensors(path, "coupling table")
    if tables is None:
        return None
    index, table = tables.get("index"), tables.get("log_weights")
    ok = index is not None and table is not None and index.dtype == torch.int64 and index.shape == (vocab, vocab)
    ok = ok and table.dtype == torch.float32 and table.dim() == 2 and table.shape[1] == vocab
    ok = ok and bool(table.isfinite().all()) and 0 <= index.min().item() and index.max().item() < table.shape[0]
    if not ok:
        raise BytemtpError(f"{path}: expected an int64 'index' [{vocab}, {vocab}] of the rows of finite float32 "
                           f"'log_weights' [rows, {vocab}]")
    return FittedCoupling(index, table)


def _side_tensors(path: Path, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a checkpoint's optional safetensors file ``path`` (None: it has none)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise BytemtpError(f"{path}: unreadable {what} ({e})") from None


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    if not (ckpt / TRAIN_STATE).is_file():
        raise BytemtpError(f"{ckpt}: no {TRAIN_STATE} (not a training checkpoint)")
    path = ckpt / TRAIN_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling damaged bytes can fail in any way at all: every one means damaged
        raise BytemtpError(f"{path}: damaged training state ({type(e).__name__}: {_reason(e)}); "
                           "resume from an earlier checkpoint or start a new run") from None
    if not isinstance(state, dict):
        raise BytemtpError(f"{path}: damaged training state (a {type(state).__name__}, not a dictionary)")
    return state
