"""Hostile datasets and inputs: damaged manifests, destructive overwrites, stale temporaries,
symlink loops, globs that pick nothing, broken JSON Lines. Every case is a one-line ``Error:``
with exit status 1 naming the file or flag, and nothing that is not ours is touched."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prepare import fails, leftovers, ok, read_back, run

from bytemtp.data.shards import MANIFEST, Dataset

# --- row 1: one validated manifest loader -------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    for i in range(8):
        (root / f"{i}.txt").write_text(f"document {i} " * 40)
    ok("prepare", root, "--out", root.parent / "hostile-ds", "--val-fraction", "0.3", "--no-progress")
    return root.parent / "hostile-ds"


def damaged_copy(dataset: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``dataset`` whose manifest is ``edit(manifest)`` (returned, or edited in place)."""
    out = tmp_path / "ds"
    out.mkdir()
    for p in dataset.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((dataset / MANIFEST).read_text())
    edited = edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest if edited is None else edited))
    return out


def _set(path: tuple, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


MANIFEST_CASES = {
    "shards-a-string": (_set(("shards",), "x"), "'shards' is not a list"),
    "manifest-a-list": (lambda m: [m], "not a bytemtp manifest"),
    "shard-entry-a-list": (_set(("shards", 0), ["train-00000.zst"]), "shard entry 0 is not a JSON object"),
    "no-sha256": (lambda m: m["shards"][0].pop("sha256") and None, "shard entry 0: 'sha256' must be a string"),
    "n-bytes-many": (_set(("shards", 0, "n_bytes"), "many"), "shard entry 0: 'n_bytes' must be a count"),
    "negative-docs": (_set(("shards", 1, "n_docs"), -3), "shard entry 1: 'n_docs' must be a count"),
    "bool-bytes": (_set(("shards", 0, "compressed_bytes"), True), "'compressed_bytes' must be a count"),
    "version-99": (_set(("version",), 99), "format version 99 is not supported"),
    "escaping-file": (_set(("shards", 0, "file"), "../../elsewhere.zst"), "is not a file name inside the dataset"),
    "absolute-file": (_set(("shards", 0, "file"), "/etc/passwd"), "is not a file name inside the dataset"),
    "bad-split": (_set(("shards", 0, "split"), "test"), "split 'test' is not one of train, val"),
    "params-a-list": (_set(("params",), [1, 2]), "'params' is not a JSON object"),
    "not-json": (lambda m: None, "unreadable manifest"),  # replaced by bytes below
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_damaged_manifest_is_one_error_line_in_info_verify(dataset, tmp_path, case):
    edit, message = MANIFEST_CASES[case]
    ds = damaged_copy(dataset, tmp_path, edit)
    if case == "not-json":
        (ds / MANIFEST).write_bytes(b'{"format": "bytemtp-shards", "shards": [')
    fails("info", ds, "--verify", "--no-progress", match=f"{MANIFEST}: .*{message}")


def test_a_shard_file_outside_the_dataset_is_never_read(dataset, tmp_path):
    """The shard the manifest points to exists, and is intact: it is refused all the same."""
    first = Dataset(dataset).shards()[0].file
    (tmp_path / "elsewhere.zst").write_bytes((dataset / first).read_bytes())
    ds = damaged_copy(dataset, tmp_path, _set(("shards", 0, "file"), "../elsewhere.zst"))
    fails("info", ds, "--verify", match="'../elsewhere.zst' is not a file name inside the dataset")


@pytest.mark.parametrize("case", ["shards-a-string", "n-bytes-many", "version-99", "escaping-file"])
def test_damaged_manifest_is_one_error_line_in_train(dataset, tmp_path, case):
    edit, message = MANIFEST_CASES[case]
    ds = damaged_copy(dataset, tmp_path, edit)
    fails("train", "--data", ds, "--out", tmp_path / "run", "--steps", "1", match=f"{MANIFEST}: .*{message}")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON value that can be replaced (the root excluded)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    out = []
    for key, child in items:
        out.append(prefix + (key,))
        out += _paths(child, prefix + (key,))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_manifest_shape_is_a_clean_verdict(dataset, tmp_path_factory, data):
    """Replace or delete any part of a valid manifest: ``info --verify`` succeeds or fails with
    one error line, never a traceback."""
    manifest = json.loads((dataset / MANIFEST).read_text())
    damaged = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        places = _paths(damaged)
        if not places:
            break
        place = data.draw(st.sampled_from(places))
        parent = damaged
        for key in place[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[place[-1]]
        else:
            parent[place[-1]] = data.draw(_JSON)
    ds = damaged_copy(dataset, tmp_path_factory.mktemp("shape"), lambda m: damaged)
    result = run("info", ds, "--verify", "--no-progress")
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError, ValueError))
    if result.exit_code:
        errors = result.stderr.strip().splitlines()
        assert errors[-1].startswith("Error: ") and sum(e.startswith("Error: ") for e in errors) == 1, result.stderr


# --- row 9: overwrite only what prepare wrote -----------------------------------------------


def test_overwrite_refuses_a_dataset_with_other_files_in_it(dataset, tmp_path):
    ds = damaged_copy(dataset, tmp_path, lambda m: None)
    (ds / "notes.txt").write_text("my notes")
    (ds / "sub").mkdir()
    (ds / "sub" / "run.log").write_text("training log")
    (tmp_path / "new.txt").write_text("new data")
    fails("prepare", tmp_path / "new.txt", "--out", ds, "--overwrite", match=r"holds notes\.txt, sub/ besides the data")
    assert (ds / "notes.txt").read_text() == "my notes" and (ds / "sub" / "run.log").is_file()
    assert read_back(ds) == read_back(dataset)


def test_output_equal_to_or_inside_an_input_is_refused(dataset, tmp_path):
    before = read_back(dataset)
    fails("prepare", dataset, "--out", dataset, "--overwrite", match=f"--out {dataset}: lies inside the input")
    assert read_back(dataset) == before
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("text")
    fails("prepare", src, "--out", src / "ds", match="lies inside the input")
    assert sorted(os.listdir(src)) == ["a.txt"]


# --- row 11: stale temporaries of a killed prepare ------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_later_prepare_removes_stale_temporaries_of_its_own_name(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    stale = tmp_path / f".ds.{_dead_pid()}.k1ll3d_x.tmp"
    live = tmp_path / f".ds.{os.getpid()}.inflight.tmp"  # this process is alive: a write in progress
    other = tmp_path / f".other.{_dead_pid()}.k1ll3d_y.tmp"  # another output's: not ours to judge
    for d in (stale, live, other):
        d.mkdir()
        (d / "train-00000.zst").write_bytes(b"\0" * 1000)
    ok("prepare", tmp_path / "a.txt", "--out", tmp_path / "ds", "--no-progress")
    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert leftovers(tmp_path, "ds") == sorted(["ds", live.name])


# --- row 14: messages that name the right thing ---------------------------------------------


def test_a_symlink_loop_in_an_input_directory_is_blamed_on_the_input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("text")
    (src / "loop").symlink_to("loop")
    fails("prepare", src, "--out", tmp_path / "ds", match=f"{src / 'loop'}: cannot read")
    assert leftovers(tmp_path, "ds") == []


def test_include_that_matches_nothing_says_so_and_what_is_there(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.md", "sub/c.py"):
        (src / name).write_text("text")
    fails("prepare", src, "--include", "*.jsonl", "--out", tmp_path / "ds",
          match=r"src: no file matches --include '\*\.jsonl' \(the directory holds a\.txt, b\.md, sub/c\.py\)")


def test_bad_json_lines_record_gives_file_line_and_column(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n\n{"text": "tab\there"}\n')
    fails("prepare", tmp_path / "d.jsonl", "--out", tmp_path / "ds",
          match=r"d\.jsonl:3: malformed JSON at column 14 \(Invalid control character\)")


# --- compiled kernels are cached under the user's cache directory ----------------------------


def _inductor_cache_dirs(env: dict[str, str]) -> list[str]:
    """Where inductor and Triton would cache kernels in a process with ``env``, once bytemtp
    has made a step ready to compile (inductor reads the place when it first needs it)."""
    script = (
        "import torch\n"
        "from bytemtp.compile import compile_decode_step\n"
        "assert compile_decode_step(torch.neg, torch.device('cpu'), enabled=True) is not None\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir\n"
        "print(cache_dir()); print(triton_cache_dir(0))\n"
    )
    keep = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    result = subprocess.run([sys.executable, "-c", script], env={**keep, **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_compiled_kernels_are_cached_under_the_users_cache_directory(tmp_path):
    """Inductor's default is /tmp/torchinductor_USER whatever XDG_CACHE_HOME says; a place the
    user chose is kept."""
    cache = tmp_path / "cache"
    assert _inductor_cache_dirs({"XDG_CACHE_HOME": str(cache)}) == [
        str(cache / "bytemtp" / "torchinductor"), str(cache / "bytemtp" / "triton")
    ]
    chosen = tmp_path / "mine"
    assert _inductor_cache_dirs({"XDG_CACHE_HOME": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(chosen)}) == [
        str(chosen), str(chosen / "triton" / "0")
    ]
