"""Hostile use of the command line itself: bad values of click-typed flags, NaN, huge seeds,
and standard output closed, full or cut short. Every case ends in one ``Error:`` line and
exit status 1 (or quietly, where the user asked for no output), never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bytemtp.cli import main
from bytemtp.data.shards import Dataset


def bytemtp(*args: str, stdout=subprocess.PIPE, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a child process: stdout here is a real file descriptor."""
    cmd = [sys.executable, "-m", "bytemtp", *map(str, args)]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd, timeout=120)


def verify_dataset(root: Path) -> None:
    ds = Dataset(root)
    assert ds.shards()
    for info in ds.shards():
        ds.verify(info)


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr


@pytest.mark.parametrize(
    "args, flag",
    [
        (["sample", "RUN", "--top-p", "0"], "--top-p"),
        (["sample", "RUN", "--temperature", "-1"], "--temperature"),
        (["sample", "RUN", "--prompt-file", "/nope"], "--prompt-file"),
        (["bench", "RUN", "--data", "RUN", "--prompts", "0"], "--prompts"),
        (["prepare", "-", "--out", "OUT", "--shard-bytes", "-5"], "--shard-bytes"),
        (["train", "--data", "RUN", "--out", "OUT", "--bogus"], "--bogus"),
        (["info"], "DIR"),
        (["sample", "RUN", "--temperature", "nan"], "--temperature"),
        (["sample", "RUN", "--top-p", "nan"], "--top-p"),
        (["train", "--data", "RUN", "--out", "OUT", "--lr", "nan"], "--lr"),
        (["train", "--data", "RUN", "--out", "OUT", "--time-budget", "inf"], "--time-budget"),
        (["sample", "RUN", "--seed", "99999999999999999999999"], "--seed"),
        (["bench", "RUN", "--data", "RUN", "--seed", "99999999999999999999999"], "--seed"),
        (["train", "--data", "RUN", "--out", "OUT", "--seed", "99999999999999999999999"], "--seed"),
        (["distill", "RUN", "--data", "RUN", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["sample", "RUN", "--draft-coupling", "-0.5"], "--draft-coupling"),
        (["bench", "RUN", "--data", "RUN", "--draft-coupling", "inf"], "--draft-coupling"),
        (["sample", "RUN", "--context-mixing", "-1"], "--context-mixing"),
        (["bench", "RUN", "--data", "RUN", "--context-mixing", "nan"], "--context-mixing"),
        (["bench", "RUN", "--data", "RUN", "--workload", "quotes"], "--workload"),
    ],
)
def test_flag_errors_are_one_line_with_status_1(tmp_path, args, flag):
    args = [str(tmp_path) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert_one_error_line(res.stderr, flag)
    assert not (tmp_path / "out").exists()


def test_plain_bytemtp_prints_the_help():
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0 and "Commands:" in res.stdout


def test_full_stdout_is_one_error_line():
    with open("/dev/full", "w") as full:
        res = bytemtp("--help", stdout=full)
    assert res.returncode == 1
    assert_one_error_line(res.stderr.decode(), "standard output", "No space left on device")


def test_prepare_into_full_stdout_keeps_a_complete_dataset(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"hello world\n" * 100)
    out = tmp_path / "ds"
    with open("/dev/full", "w") as full:
        res = bytemtp("prepare", tmp_path / "src", "--out", out, "--no-progress", stdout=full)
    assert res.returncode == 1
    assert_one_error_line(res.stderr.decode(), "standard output")
    verify_dataset(out)  # the report was lost; the dataset is whole


def test_sample_with_stdout_closed_runs_quietly(tmp_path):
    """``sample ... >&-``: Python starts with ``sys.stdout = None``, which the byte sink could
    not write to; the CLI puts /dev/null on descriptor 1 first (which also keeps the next
    ``open`` from being handed descriptor 1)."""
    import torch

    from bytemtp.model.config import ModelConfig
    from bytemtp.model.transformer import ByteMTP
    from bytemtp.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path, 1, ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=4, n_future=2,
                                                     max_seq_len=32)))
    cmd = [sys.executable, "-m", "bytemtp", "sample", str(tmp_path), "--prompt", "a", "--max-bytes", "8", "--seed", "0",
           "--stats"]
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 0, res.stderr.decode()
    # the random-weight model may end its document (a BOS) before 8 bytes: any byte count will do
    assert "Traceback" not in res.stderr.decode() and re.search(r"\d+ bytes in \d+ forwards", res.stderr.decode())


def test_train_refuses_an_out_inside_a_dataset(micro_data):
    res = CliRunner().invoke(main, ["train", "--data", str(micro_data), "--out", str(micro_data / "run"), "--steps", "1"])
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, "--out", "inside the prepared dataset")
    assert not (micro_data / "run").exists()


# -- issue 32, rows 18 and 19: distill writes apart from what it reads ------------------------------
@pytest.fixture
def source_run(tmp_path):
    import torch

    from bytemtp.model.config import ModelConfig
    from bytemtp.model.transformer import ByteMTP
    from bytemtp.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    run = tmp_path / "source"
    save_checkpoint(run, 30, ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=4, n_future=2, max_seq_len=32)))
    return run


def tree_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", ["RUN/checkpoints/step-0000030", "RUN/checkpoints/step-0000030/sub",
                                 "RUN/checkpoints", "RUN/distilled", "PARENT", "DATA/sub", "DATA"])
@pytest.mark.parametrize("given", ["run", "checkpoint"])
def test_distill_refuses_an_out_inside_or_around_what_it_reads(source_run, micro_data, out, given):
    """A checkpoint written into the source's checkpoints/ is deleted by that run's next --keep; one
    written into a dataset by its next prepare --overwrite (train already refused that)."""
    ckpt = source_run if given == "run" else source_run / "checkpoints" / "step-0000030"
    out_dir = out.replace("RUN", str(source_run)).replace("PARENT", str(source_run.parent))
    out_dir = Path(out_dir.replace("DATA", str(micro_data)))
    before, data_before = tree_of(source_run), tree_of(micro_data)
    res = CliRunner().invoke(main, ["distill", str(ckpt), "--data", str(micro_data), "--out", str(out_dir),
                                    "--prompts", "2", "--text", "0", "--holdout", "0", "--epochs", "1",
                                    "--new-bytes", "4", "--prompt-bytes", "4", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert_one_error_line(res.stderr, "--out", str(out_dir))
    assert tree_of(source_run) == before and tree_of(micro_data) == data_before


def test_distill_to_a_directory_beside_the_source_runs(source_run, micro_data, tmp_path):
    res = CliRunner().invoke(main, ["distill", str(source_run), "--data", str(micro_data), "--out",
                                    str(tmp_path / "distilled"), "--prompts", "2", "--text", "0", "--holdout", "0",
                                    "--epochs", "1", "--new-bytes", "4", "--prompt-bytes", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "distilled" / "checkpoints" / "step-0000030" / "model.safetensors").is_file()
