"""Hostile and careless use of ``bytemtp sample``: prompts files that are odd but valid (blank
lines, one line, plain text starting with ``{``, escaped bytes), malformed ones, flags that cannot
apply, outputs beyond memory, and a reader that leaves early. Every output maps to its prompt,
every refusal is one ``Error:`` line with exit status 1, and nothing is silently ignored."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import bytemtp.memory
from bytemtp import MAX_SEED
from bytemtp.cli import main
from bytemtp.decode.generate import GenerationConfig, generate
from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.checkpoint import save_checkpoint
from test_hostile_cli import assert_one_error_line


def random_checkpoint(root, n_future: int):
    torch.manual_seed(0)
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=4, n_future=n_future, max_seq_len=32)).eval()
    save_checkpoint(root, 1, model)
    return root, model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A random-weight model with three draft heads: its outputs are arbitrary bytes."""
    return random_checkpoint(tmp_path_factory.mktemp("run"), n_future=4)


@pytest.fixture(scope="module")
def next_byte_run(tmp_path_factory):
    """A model with head 1 alone (n_future=1): nothing to draft with."""
    return random_checkpoint(tmp_path_factory.mktemp("run1"), n_future=1)[0]


def sample(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def records(res) -> list[dict]:
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout_bytes.decode("utf-8").splitlines()]


def exact_bytes(record: dict) -> bytes:
    return base64.b64decode(record["base64"]) if "base64" in record else record["text"].encode("utf-8")


def alone(model, prompt: bytes, **kw) -> bytes:
    """What the model generates for ``prompt`` by itself: the reference a batched output must equal."""
    return generate(model, GenerationConfig(prompt=prompt, max_new_bytes=12, **kw)).read()


# -- row 16: every line of a plain prompts file is a prompt, so prompt_index is the line ----------
def test_blank_and_space_lines_keep_their_place(run, tmp_path):
    root, model = run
    lines = [b"a", b" ", b"", b"  \t", b"b"]
    (tmp_path / "prompts.txt").write_bytes(b"\n".join(lines) + b"\n")
    out = records(sample(root, "--prompts-file", tmp_path / "prompts.txt", "--temperature", "0",
                         "--max-bytes", "12", "--batch", "2"))
    assert [r["prompt_index"] for r in out] == list(range(len(lines)))
    for prompt, record in zip(lines, out):
        assert exact_bytes(record) == alone(model, prompt)


def test_blank_lines_between_json_records_do_not_count(run, tmp_path):
    root, model = run
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n   \n\n{"prompt": "b"}\n')
    out = records(sample(root, "--prompts-file", tmp_path / "p.jsonl", "--temperature", "0", "--max-bytes", "12"))
    assert [r["prompt_index"] for r in out] == [0, 1]
    assert [exact_bytes(r) for r in out] == [alone(model, b"a"), alone(model, b"b")]


# -- row 21: the output format follows the flags, not the number of outputs ------------------------
@pytest.mark.parametrize("jsonl", [True, False])
def test_a_one_prompt_file_is_json_lines(run, tmp_path, jsonl):
    root, model = run
    (tmp_path / "p").write_text('{"prompt": "x"}\n' if jsonl else "x\n")
    out = records(sample(root, "--prompts-file", tmp_path / "p", "--temperature", "0", "--max-bytes", "12"))
    assert len(out) == 1 and out[0]["prompt_index"] == 0 and exact_bytes(out[0]) == alone(model, b"x")


def test_num_samples_given_as_one_is_json_lines(run):
    root, model = run
    out = records(sample(root, "--prompt", "x", "--num-samples", "1", "--temperature", "0", "--max-bytes", "12"))
    assert len(out) == 1 and exact_bytes(out[0]) == alone(model, b"x")


# -- row 22: a plain-text file whose first line starts with '{' ------------------------------------
def test_prompts_format_lines_reads_braces_as_text(run, tmp_path):
    root, model = run
    lines = [b'{"prompt": "not a record"}', b"{ code", b"plain"]
    (tmp_path / "code.txt").write_bytes(b"\n".join(lines) + b"\n")
    out = records(sample(root, "--prompts-file", tmp_path / "code.txt", "--prompts-format", "lines",
                         "--temperature", "0", "--max-bytes", "12"))
    assert [exact_bytes(r) for r in out] == [alone(model, p) for p in lines]
    guessed = sample(root, "--prompts-file", tmp_path / "code.txt", "--temperature", "0")
    assert guessed.exit_code == 1
    assert_one_error_line(guessed.stderr, str(tmp_path / "code.txt"), "line 2", "--prompts-format lines")


def test_prompts_format_jsonl_refuses_plain_text(run, tmp_path):
    (tmp_path / "plain.txt").write_text("hello\n")
    res = sample(run[0], "--prompts-file", tmp_path / "plain.txt", "--prompts-format", "jsonl")
    assert res.exit_code == 1
    assert_one_error_line(res.stderr, str(tmp_path / "plain.txt"), "line 1 is not JSON")


# -- row 7: a lone surrogate is no text; escaped bytes are bytes -----------------------------------
def test_a_lone_surrogate_is_one_error_line(run, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "\\ud800"}\n')
    res = sample(run[0], "--prompts-file", tmp_path / "p.jsonl", "--max-bytes", "4")
    assert res.exit_code == 1 and not res.stdout_bytes
    assert_one_error_line(res.stderr, str(tmp_path / "p.jsonl"), "line 2", "lone surrogate")


def test_escaped_bytes_are_the_bytes(run, tmp_path):
    """``\\udc80``..``\\udcff`` are the raw bytes 0x80..0xff (surrogateescape), not an error."""
    root, model = run
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\udcff"}\n')
    out = records(sample(root, "--prompts-file", tmp_path / "p.jsonl", "--temperature", "0", "--max-bytes", "12"))
    assert exact_bytes(out[0]) == alone(model, b"a\xff")


# -- row 17: a flag that cannot apply is an error, whichever it is ---------------------------------
@pytest.mark.parametrize(
    "args, flag",
    [
        (["--tree", "3", "--no-speculative"], "--tree"),
        (["--draft-heads", "2", "--no-speculative"], "--draft-heads"),
        (["--adaptive", "--no-speculative"], "--adaptive"),
        (["--draft-coupling", "0.5", "--no-speculative"], "--draft-coupling"),
        (["--draft-temperature", "0.5", "--no-speculative", "--temperature", "1"], "--draft-temperature"),
        (["--draft-temperature", "0.5", "--temperature", "0"], "--draft-temperature"),
        (["--echo", "--num-samples", "2"], "--echo"),
        (["--prompts-format", "lines"], "--prompts-format"),
        (["--draft-heads", "99"], "--draft-heads"),
    ],
)
def test_flags_that_cannot_apply_are_errors(run, args, flag):
    res = sample(run[0], "--prompt", "x", "--max-bytes", "4", *args)
    assert res.exit_code == 1 and not res.stdout_bytes, res.output
    assert_one_error_line(res.stderr, flag)


@pytest.mark.parametrize("args, flag", [(["--draft-heads", "1"], "--draft-heads"), (["--tree", "2"], "--tree"),
                                        (["--adaptive"], "--adaptive"), (["--speculative"], "--speculative")])
def test_drafting_flags_on_a_model_without_draft_heads(next_byte_run, args, flag):
    res = sample(next_byte_run, "--prompt", "x", "--max-bytes", "4", *args)
    assert res.exit_code == 1 and not res.stdout_bytes, res.output
    assert_one_error_line(res.stderr, flag, "n_future=1")


def test_echo_with_a_prompts_file_is_an_error(run, tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n")
    res = sample(run[0], "--prompts-file", tmp_path / "p.txt", "--echo")
    assert res.exit_code == 1 and not res.stdout_bytes
    assert_one_error_line(res.stderr, "--echo", "JSON Lines")


# -- row 20: a drawn seed is one --seed takes, and reproduces the sample ---------------------------
def test_drawn_seeds_are_accepted_by_seed_and_reproduce(run):
    root, _ = run
    drawn = records(sample(root, "--prompt", "x", "--temperature", "1", "--max-bytes", "12", "--num-samples", "8"))
    assert all(0 <= r["seed"] <= MAX_SEED for r in drawn)
    for r in drawn[:2]:
        again = records(sample(root, "--prompt", "x", "--temperature", "1", "--max-bytes", "12",
                               "--num-samples", "1", "--seed", r["seed"]))
        assert again[0]["seed"] == r["seed"] and exact_bytes(again[0]) == exact_bytes(r)


# -- rows 5 and 23: outputs stream, and a reader that leaves early ends the command quietly --------
def first_line_then_leave(args: list[str], memory_limit: int | None = None) -> tuple[bytes, int, str]:
    """Run ``bytemtp sample`` with stdout a pipe; read one line, close the pipe (``| head -n1``)."""
    def limit():
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    cmd = [sys.executable, "-m", "bytemtp", "sample", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    line = proc.stdout.readline()
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return line, proc.returncode, err


@pytest.mark.parametrize("mode", [["--num-samples", "50"], ["--max-bytes", "100000"]])
def test_a_reader_that_leaves_ends_sample_quietly(run, mode):
    # seeded: drawn fresh, one run in a few hundred ended its document (BOS) at the first byte and
    # printed nothing at all
    line, code, err = first_line_then_leave([run[0], "--prompt", "x", "--seed", "1", "--max-bytes", "8", *mode])
    assert line and code == 0 and err == "", (line[:80], code, err)


def test_outputs_stream_beyond_memory(run):
    """10^8 outputs under a 1.5 GB address-space limit: the first arrives at once (the jobs are
    drawn lazily, never listed: a list of 10^8 would need gigabytes)."""
    line, code, err = first_line_then_leave(
        [run[0], "--prompt", "x", "--max-bytes", "2", "--num-samples", "100000000"], memory_limit=1500 << 20
    )
    assert code == 0 and err == "", err
    assert json.loads(line)["prompt_index"] == 0


# -- rows 1 and 4: batches are capped at the work there is and checked against memory ------------
def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating(run, monkeypatch):
    monkeypatch.setattr(bytemtp.memory, "available_memory", lambda device="cpu": 1 << 20)  # 1 MiB
    res = sample(run[0], "--prompt", "x", "--max-bytes", "1", "--num-samples", "1000", "--batch", "1000")
    assert res.exit_code == 1 and not res.stdout_bytes
    assert_one_error_line(res.stderr, "--batch", "1,000 rows", "needs at least", "0.0 GiB is available")


def test_bench_caps_the_batch_at_the_prompts(run, micro_data, monkeypatch):
    """``--prompts 2 --batch 100000`` decodes 2 rows (it grew to 100000 copies of the prompts, until
    the kernel killed it); the memory is forced to 64 MiB, far below 100000 rows' cache."""
    monkeypatch.setattr(bytemtp.memory, "available_memory", lambda device="cpu": 64 << 20)
    res = CliRunner().invoke(main, ["bench", str(run[0]), "--data", str(micro_data), "--prompts", "2",
                                    "--batch", "100000", "--batch", "1", "--prompt-bytes", "8", "--max-bytes", "8",
                                    "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert sorted({row["batch"] for row in json.loads(res.stdout)["rows"]}) == [1, 2]
