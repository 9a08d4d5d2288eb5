"""Hostile inputs to ``prepare`` and ``merge``: absurd or empty ``--part`` values, inputs that
change or are named twice, Hugging Face layouts that are not what they seem, columnar data
that is valid but unusual, and a scheduler's SIGTERM. Each is a one-line ``Error:`` naming the
file or flag (exit 1), or the right dataset; never a traceback, never duplicated or foreign
text in the training data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_merge import CONFIG, contents, expected, make_inputs
from test_parquet import expected_docs, read, save_to_disk_layout, texts, write_arrow
from test_prepare import fails, leftovers, ok, read_back

from bytemtp.data.shards import MANIFEST

PART_ARGS = ["--shard-bytes", CONFIG.shard_bytes, "--val-fraction", CONFIG.val_fraction,
             "--max-doc-bytes", CONFIG.read.max_doc_bytes, "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path_factory.mktemp("hostile-prepare") / "src"
    return src, make_inputs(src)


# --- --part: bounded, never empty -----------------------------------------------------------


def test_a_part_count_beyond_any_scheduler_is_refused(corpus, tmp_path):
    src, _ = corpus
    fails("prepare", src, "--out", tmp_path / "p", "--part", "0/99999999999999999999999", *PART_ARGS,
          match=r"--part: 0/99999999999999999999999: at most 1,048,576 parts")
    assert leftovers(tmp_path, "p") == []


def test_merge_names_missing_parts_as_ranges_whatever_the_count(corpus, tmp_path):
    """A manifest claiming 10**23 parts, or 100,000 parts of which two are given: the message is
    one short line, built from the parts given (not a list of every missing index)."""
    src, _ = corpus
    ok("prepare", src, "--out", tmp_path / "a", "--part", "0/100000", *PART_ARGS)
    ok("prepare", src, "--out", tmp_path / "b", "--part", "7/100000", *PART_ARGS)
    result = fails("merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m", "--no-progress",
                   match=r"PART: part 1-6, 8-99999 of 100000 missing \(given: 0 in .*a, 7 in .*b\)$")
    assert len(result.stderr) < 400
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    manifest["source"]["part"]["count"] = 10**23
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(manifest))
    fails("merge", tmp_path / "a", "--out", tmp_path / "m", "--no-progress",
          match=r"a: a part of 100,000,000,000,000,000,000,000, more than the 1,048,576 parts allowed")
    assert leftovers(tmp_path, "m") == []


def test_an_empty_part_flag_is_an_error_not_the_whole_dataset(corpus, tmp_path):
    """``--part "$TASK/$N"`` with both unset is ``--part /``; with a variable that holds the whole
    value unset, ``--part ''``: either must fail, not prepare every input in every task."""
    src, _ = corpus
    for value in ("", "/"):
        fails("prepare", src, "--out", tmp_path / "p", "--part", value, *PART_ARGS,
              match=rf"--part: '{value}' is not I/N")
    assert leftovers(tmp_path, "p") == []


# --- merge: the same inputs, however they were named; changed inputs refused ---------------


def test_a_file_edited_between_part_runs_keeping_its_size_is_refused(tmp_path):
    src = tmp_path / "src"
    docs = make_inputs(src)
    ok("prepare", src, "--out", tmp_path / "p0", "--part", "0/2", *PART_ARGS)
    edited = src / "notes" / "03.txt"
    text = edited.read_bytes()
    edited.write_bytes(text.upper())  # the same size, other text
    assert len(edited.read_bytes()) == len(docs["notes/03.txt"])
    ok("prepare", src, "--out", tmp_path / "p1", "--part", "1/2", *PART_ARGS)
    fails("merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m", "--no-progress",
          match=r"p1: the input files differ from those .*p0 was prepared from")
    assert leftovers(tmp_path, "m") == []


def test_parts_naming_the_same_input_by_other_paths_merge(tmp_path, monkeypatch):
    """One part run from the input's parent as ``mix``, the other from a sibling directory as
    ``../w/mix`` and through a symlink: the same input, so merge accepts them."""
    (tmp_path / "w").mkdir()
    docs = make_inputs(tmp_path / "w" / "mix")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    ok("prepare", "mix", "--out", tmp_path / "p0", "--part", "0/3", *PART_ARGS)
    monkeypatch.chdir(tmp_path / "elsewhere")
    ok("prepare", "../w/mix", "--out", tmp_path / "p1", "--part", "1/3", *PART_ARGS)
    ok("prepare", tmp_path / "link" / "mix", "--out", tmp_path / "p2", "--part", "2/3", *PART_ARGS)
    ok("merge", tmp_path / "p0", tmp_path / "p1", tmp_path / "p2", "--out", tmp_path / "m", "--no-progress")
    assert contents(tmp_path / "m") == expected(docs)


@pytest.mark.parametrize(
    "case",
    ["dir-twice", "file-twice", "file-in-dir", "dir-in-dir", "other-spelling", "symlink"],
)
def test_an_input_given_twice_by_any_path_is_refused(corpus, tmp_path, monkeypatch, case):
    src, _ = corpus
    monkeypatch.chdir(src.parent)
    (tmp_path / "link").symlink_to(src)
    args, match = {
        "dir-twice": (["src", "src"], r"SOURCE src: the same as SOURCE src \(its documents would be read twice\)"),
        "file-twice": (["src/dump.jsonl.gz", f"{src}/dump.jsonl.gz"], r"the same as SOURCE src/dump\.jsonl\.gz"),
        "file-in-dir": (["src", "src/web-1.parquet"], r"SOURCE src/web-1\.parquet: inside SOURCE src, which reads"),
        "dir-in-dir": (["src/notes", "src"], r"SOURCE src/notes: inside SOURCE src"),
        "other-spelling": (["src", "src/notes/../"], r"SOURCE src/notes/\.\./: the same as SOURCE src"),
        "symlink": (["src", str(tmp_path / "link")], r"link: the same as SOURCE src"),
    }[case]
    fails("prepare", *args, "--out", tmp_path / "ds", "--no-progress", match=match)
    assert leftovers(tmp_path, "ds") == []


# --- Hugging Face layouts: their metadata is never training text ----------------------------


def arrow_rows(path: Path) -> list[bytes]:
    """The non-empty texts of an Arrow stream file (the documents ``prepare`` makes of it)."""
    values = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().column("text").to_pylist()
    return [v.encode() for v in values if v]


def test_a_saved_dataset_without_state_json_is_refused_not_read_with_its_metadata(tmp_path):
    names = save_to_disk_layout(tmp_path / "saved", [texts(50, 1), texts(40, 2)])
    (tmp_path / "saved" / "state.json").unlink()
    fails("prepare", tmp_path / "saved", "--out", tmp_path / "ds", "--no-progress",
          match=r"saved: Hugging Face metadata \(dataset_info\.json\) beside Arrow files, but no state\.json")
    assert leftovers(tmp_path, "ds") == []
    ok("prepare", tmp_path / "saved", "--include", "*.arrow", "--out", tmp_path / "ds", "--no-progress")
    rows = [r for name in names for r in arrow_rows(tmp_path / "saved" / name)]
    assert sorted(read_back(tmp_path / "ds")["train"] + read_back(tmp_path / "ds")["val"]) == sorted(rows)


def test_a_saved_dataset_dict_is_refused_and_one_split_reads_only_its_rows(tmp_path):
    train, test = texts(40, 7), texts(30, 8)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    save_to_disk_layout(tmp_path / "dd" / "test", [test])
    [train_file] = save_to_disk_layout(tmp_path / "dd" / "train", [train])
    fails("prepare", tmp_path / "dd", "--out", tmp_path / "ds", "--no-progress",
          match=r"dd: a saved Hugging Face DatasetDict \(splits: test, train\); give the split to prepare, "
          r"e\.g\. .*dd/train,")
    fails("prepare", tmp_path, "--out", tmp_path.parent / "ds", "--no-progress", match=r"dd: a saved .*DatasetDict")
    assert leftovers(tmp_path, "ds") == [] and leftovers(tmp_path.parent, "ds") == []
    ok("prepare", tmp_path / "dd" / "train", "--out", tmp_path / "ds", "--no-progress")
    got = read_back(tmp_path / "ds")
    assert sorted(got["train"] + got["val"]) == sorted(arrow_rows(tmp_path / "dd" / "train" / train_file))


def test_state_json_listing_a_file_twice_is_refused(tmp_path):
    [name, _] = save_to_disk_layout(tmp_path / "saved", [texts(50, 1), texts(40, 2)])
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    state["_data_files"].append({"filename": name})
    (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
    fails("prepare", tmp_path / "saved", "--out", tmp_path / "ds", "--no-progress",
          match=rf"saved/state\.json: lists data file '{name}' more than once")
    assert leftovers(tmp_path, "ds") == []


# --- columnar data: valid but unusual encodings; memory is not corruption -------------------


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
@pytest.mark.parametrize("values", ["string", "binary"])
def test_a_dictionary_encoded_text_column_is_read_as_its_values(tmp_path, kind, values):
    """Repeated texts (a categorical column) with nulls: the same documents as a plain column."""
    rows = [row if i % 5 else texts(40, 3)[i % 7] for i, row in enumerate(texts(200, 2))]
    column = pa.array(rows if values == "string" else [r.encode() if r is not None else None for r in rows])
    table = pa.table({"text": column.dictionary_encode()})
    path = tmp_path / f"cat.{kind}"
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=64)
        assert pa.types.is_dictionary(pq.ParquetFile(path).schema_arrow.field("text").type)
    else:
        write_arrow(path, table, batch_rows=64)
    docs, stats = read([str(path)])
    assert docs == expected_docs(path.name, rows)
    assert stats.null_values == rows.count(None) > 0


def test_a_row_group_too_big_for_memory_is_reported_as_out_of_memory_not_corrupt(tmp_path):
    """One row group decoding to about 100 MB, read under an address-space limit of 64 MB above
    what the process holds once it has imported everything: pyarrow's allocation fails."""
    path = tmp_path / "big.parquet"
    table = pa.table({"text": pa.repeat(pa.scalar("x" * 2000), 50_000)})
    pq.write_table(table, path, row_group_size=50_000, compression="zstd", use_dictionary=False)
    script = (
        "import resource, sys\n"
        "from bytemtp.cli import main\n"
        "import bytemtp.cli.prepare_cmd, bytemtp.data.columnar\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20),) * 2)\n"
        "main(sys.argv[1:])\n"
    )
    args = ["prepare", str(path), "--out", str(tmp_path / "ds"), "--threads", "0", "--no-progress"]
    # one malloc arena: glibc reserves 64 MiB of address space for each thread's own arena
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: {path}: out of memory reading row group 0 (its text column is 100 MB, decoded whole at 3-4 "
        "times that); give the process more memory, or rewrite the file with smaller row groups"
    ]
    assert leftovers(tmp_path, "ds") == []


# --- SIGTERM (a scheduler's time limit or cancel): a message, and nothing left behind ---------


def _terminated(args: list, tmp_path: Path, out: str) -> subprocess.CompletedProcess:
    """Run ``bytemtp ARGS``, which blocks reading a FIFO once its temporary output directory
    exists, send it SIGTERM there, and return what it did."""
    proc = subprocess.Popen([sys.executable, "-m", "bytemtp", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not [p for p in leftovers(tmp_path, out) if p.endswith(".tmp")] and proc.poll() is None:
        assert time.monotonic() < deadline, "no temporary directory appeared"
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the blocking read
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigterm_during_prepare_part_says_so_and_removes_its_temporaries(tmp_path):
    src = tmp_path / "src"
    make_inputs(src)
    os.mkfifo(src / "zz-slow.txt")  # read last: the shards of the files before it are in the temporary
    result = _terminated(["prepare", src, "--out", tmp_path / "p0", "--part", "0/1", *PART_ARGS], tmp_path, "p0")
    assert result.returncode == 1, result.stderr
    message = f"Error: {tmp_path / 'p0'}: stopped by SIGTERM; nothing half-written is left behind"
    assert result.stderr.strip().splitlines()[-1] == message  # after the progress of the parts before
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path, "p0") == []


def test_sigterm_during_merge_says_so_and_removes_its_temporaries(corpus, tmp_path):
    """The last shard of the last part is made a FIFO (an empty file to the manifest), so merge
    blocks checking its sha256 once the shards before it are linked into the temporary."""
    src, _ = corpus
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"p{i}")
        ok("prepare", src, "--out", parts[-1], "--part", f"{i}/2", *PART_ARGS)
    manifest = json.loads((parts[1] / MANIFEST).read_text())
    last = manifest["shards"][-1]
    (parts[1] / last["file"]).unlink()
    os.mkfifo(parts[1] / last["file"])
    last["compressed_bytes"] = 0
    (parts[1] / MANIFEST).write_text(json.dumps(manifest))
    result = _terminated(["merge", *parts, "--out", tmp_path / "m", "--no-progress"], tmp_path, "m")
    assert result.returncode == 1, result.stderr
    message = f"Error: {tmp_path / 'm'}: stopped by SIGTERM; nothing half-written is left behind"
    assert result.stderr.strip().splitlines() == [message]
    assert leftovers(tmp_path, "m") == []
