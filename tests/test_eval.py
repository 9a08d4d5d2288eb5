"""Bits per byte on the val split: exact per-byte averaging, and agreement with training's log."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from bytemtp import BOS
from bytemtp.cli import main
from bytemtp.data.shards import Dataset
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.evaluate import evaluate
from bytemtp.train.loop import train
from bytemtp.train.parallel import MTPObjective
from train_support import MICRO, metrics, micro_train


def micro_objective(seed: int = 0) -> MTPObjective:
    torch.manual_seed(seed)
    return MTPObjective(ByteMTP(MICRO))


# A batch's loss is a float32 mean of up to 7 x 32 cross-entropies (summed in float64 across
# batches): (n - 1) eps relative for a sum of n positive terms in whatever order batch size and
# SIMD width give, so batches of 1 and of 7 rows agree to 7 * 32 eps.
BATCH_RTOL = 7 * 32 * torch.finfo(torch.float32).eps


def test_matches_a_direct_computation_on_one_row(make_dataset):
    docs = [b"def f(x):\n", b"return x\n"]
    data = make_dataset({"train": [docs], "val": [docs]})
    stream = torch.tensor([i for d in docs for i in (BOS, *d)])  # 21 ids: fits one 32-byte row
    objective = micro_objective()
    got = evaluate(objective, data, n_future=2, batch_size=4, seq_len=32, device=torch.device("cpu"))

    with torch.no_grad():
        logits = objective.model(stream[None])[0]  # [L, n, vocab]
    L = len(stream)
    for k in range(2):  # head k+1 predicts stream[t + k + 1] from position t
        nll = F.cross_entropy(logits[: L - k - 1, k], stream[k + 1 :])
        assert got.bpb_heads[k] == pytest.approx(nll.item() / math.log(2), rel=1e-5)
    assert got.n_bytes == L - 1 and got.bpb == got.bpb_heads[0]


def test_independent_of_batch_size(micro_data):
    objective = micro_objective()
    results = [
        evaluate(objective, micro_data, n_future=2, batch_size=b, seq_len=32, device=torch.device("cpu"))
        for b in (1, 7)
    ]
    ds = Dataset(micro_data)
    assert results[0].n_bytes == results[1].n_bytes == ds.n_bytes("val") + ds.n_docs("val") - 1
    assert results[0].bpb_heads == pytest.approx(results[1].bpb_heads, rel=BATCH_RTOL)
    assert 7.0 < results[0].bpb < 9.0  # an untrained model is near uniform (log2 257 = 8.006)


def test_eval_command_agrees_with_the_runs_last_logged_val(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=6, eval_every=3), MICRO, micro_data, run, progress=False)
    logged = metrics(run)[-1]

    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(micro_data), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["step"] == 6 and report["seq_len"] == 32 and report["batch_size"] == 4
    assert report["val_bpb_heads"] == pytest.approx(logged["val_bpb_heads"], rel=1e-9)
    assert report["val_bpb"] == report["val_bpb_heads"][0]

    table = CliRunner().invoke(main, ["eval", str(run / "checkpoints" / "step-0000006"), "--data", str(micro_data),
                                      "--batch-size", "5", "--no-progress"])
    assert table.exit_code == 0, table.output
    heads = [line for line in table.stdout.splitlines() if line.startswith("head")]
    assert len(heads) == 2 and heads[0].startswith("head  1") and "next byte" in heads[0]
    assert float(heads[0].split()[2]) == pytest.approx(logged["val_bpb"], abs=1e-4)


def test_eval_errors(make_dataset, micro_data, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "nothing"), "--data", str(micro_data)])
    assert result.exit_code == 1 and "not a checkpoint" in result.stderr
    run = tmp_path / "run"
    train(micro_train(steps=1), MICRO, micro_data, run, progress=False)
    no_val = make_dataset({"train": [[b"x = 1\n"]]})
    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(no_val)])
    assert result.exit_code == 1 and "no val split" in result.stderr
    result = CliRunner().invoke(main, ["eval", str(run), "--data", str(micro_data), "--seq-len", "64"])
    assert result.exit_code == 1 and "--seq-len" in result.stderr and "max_seq_len=32" in result.stderr


def test_every_batch_has_the_same_shape(micro_data, monkeypatch):
    """The last batch is padded to full size, so a compiled model never meets a second shape;
    the padding rows carry no targets and change no figure."""
    objective = micro_objective()
    shapes = []
    real_forward = MTPObjective.forward

    def forward(self, ids):
        shapes.append(tuple(ids.shape))
        return real_forward(self, ids)

    monkeypatch.setattr(MTPObjective, "forward", forward)
    ds = Dataset(micro_data)
    rows = -(-(ds.n_bytes("val") + ds.n_docs("val")) // 32)
    assert rows % 7  # the split does not fill its last batch of 7 rows
    padded = evaluate(objective, micro_data, n_future=2, batch_size=7, seq_len=32, device=torch.device("cpu"))
    assert set(shapes) == {(7, 32 + 2)} and len(shapes) == -(-rows // 7)
    one_row = evaluate(objective, micro_data, n_future=2, batch_size=1, seq_len=32, device=torch.device("cpu"))
    assert padded.n_bytes == one_row.n_bytes and padded.bpb_heads == pytest.approx(one_row.bpb_heads, rel=BATCH_RTOL)
