"""Which files of a directory ``prepare`` reads, in which order.

Every file under the directory picked by the ``--include``/``--exclude`` globs, in
sorted relative-path order, with one exception: a saved Hugging Face dataset
(``datasets.save_to_disk``: ``state.json`` and ``dataset_info.json`` next to Arrow
files) contributes exactly the data files its ``state.json`` lists, in that order, and
not its JSON metadata, which is not text of the corpus.

Two layouts that look like one are refused rather than read as plain files, since
their metadata would be trained on as text: Hugging Face metadata beside Arrow files
without the other half of the pair (a copy that lost ``state.json``, or the library's
cache, whose files hold every split), and a saved ``DatasetDict``
(``dataset_dict.json``), whose test split would land in the training data. The message
says what to give instead; globs that leave the metadata file out read the rest as it is.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Iterator

from bytemtp.errors import BytemtpError

HF_STATE, HF_INFO, HF_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
_SHOWN = 5  # files named in the message when the globs pick none


def _glob_match(rel: str, name: str, pattern: str) -> bool:
    """A pattern with a ``/`` matches the relative path, one without matches the name at any depth."""
    return fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern)


class DirectoryWalk:
    """The files of ``root`` picked by the globs: ``(relative path, path)`` in a fixed order."""

    def __init__(self, root: Path, include: tuple[str, ...], exclude: tuple[str, ...]):
        self.root = root
        self.include = include
        self.exclude = exclude
        self._passed_over: list[str] = []  # files the globs did not pick, for the message when none is

    def __iter__(self) -> Iterator[tuple[str, Path]]:
        """Each directory is listed and sorted on its own, with sub-directories keyed as
        ``name/``, which yields exactly the global sort order without ever holding the
        whole tree's listing. Symlinked directories are not followed (no cycles).

        Globs that pick none of the files present are an error naming what is there: an
        empty result would otherwise read as an empty corpus.
        """
        self._passed_over = []
        picked = False
        for item in self._visit(self.root, ""):
            picked = True
            yield item
        if not picked and self._passed_over and (self.include or self.exclude):
            shown = ", ".join(self._passed_over[:_SHOWN])
            more = f" and {len(self._passed_over) - _SHOWN} more" if len(self._passed_over) > _SHOWN else ""
            globs = " ".join([f"--include {g!r}" for g in self.include] + [f"--exclude {g!r}" for g in self.exclude])
            raise BytemtpError(f"{self.root}: no file matches {globs} (the directory holds {shown}{more})")

    def _visit(self, directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        try:
            with os.scandir(directory) as it:
                listing = {e.name: e for e in it}
        except OSError as e:
            raise BytemtpError(f"{directory}: cannot list directory ({e.strerror})") from None
        if HF_STATE in listing and HF_INFO in listing:
            yield from self._saved_dataset(directory, prefix)
            return
        self._refuse_lookalike(directory, prefix, listing)
        keyed = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in listing.values()]
        for key, entry in sorted(keyed, key=lambda item: item[0]):
            rel = prefix + entry.name
            if any(_glob_match(rel, entry.name, g) for g in self.exclude):
                continue
            if key.endswith("/"):
                yield from self._visit(Path(entry.path), rel + "/")
            elif self._is_file(entry):
                if self._picked(rel, entry.name):
                    yield rel, Path(entry.path)
                else:
                    self._passed_over.append(rel)

    def _picked(self, rel: str, name: str) -> bool:
        return not self.include or any(_glob_match(rel, name, g) for g in self.include)

    def _read(self, rel: str, name: str) -> bool:
        """Whether the globs let the file at ``rel`` be read."""
        return not any(_glob_match(rel, name, g) for g in self.exclude) and self._picked(rel, name)

    def _refuse_lookalike(self, directory: Path, prefix: str, listing: dict[str, os.DirEntry]) -> None:
        """Refuse Hugging Face metadata the globs would read as text: a ``DatasetDict``'s, or
        one half of a saved dataset's pair beside Arrow files."""
        if HF_DICT in listing and self._read(prefix + HF_DICT, HF_DICT):
            splits = _dict_splits(directory, listing)
            example = directory / ("train" if "train" in splits else splits[0])
            raise BytemtpError(
                f"{directory}: a saved Hugging Face DatasetDict (splits: {', '.join(splits)}); give the split "
                f"to prepare, e.g. {example}, so that no other split's text lands in the training data"
            )
        present = [n for n in (HF_STATE, HF_INFO) if n in listing and self._read(prefix + n, n)]
        if present and any(n.endswith(".arrow") for n in listing):
            missing = HF_INFO if present == [HF_STATE] else HF_STATE
            raise BytemtpError(
                f"{directory}: Hugging Face metadata ({present[0]}) beside Arrow files, but no {missing}: not a "
                f"complete saved dataset; restore {missing}, or pick the data files (--include '*.arrow')"
            )

    @staticmethod
    def _is_file(entry: os.DirEntry) -> bool:
        try:
            return entry.is_file()
        except OSError as e:  # a symlink loop, or one into a directory we may not enter
            raise BytemtpError(f"{entry.path}: cannot read ({e.strerror})") from None

    def _saved_dataset(self, directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        """The data files a saved Hugging Face dataset's ``state.json`` lists."""
        state_path = directory / HF_STATE
        try:
            files = [f["filename"] for f in json.loads(state_path.read_bytes())["_data_files"]]
        except OSError as e:
            raise BytemtpError(f"{state_path}: cannot read ({e.strerror})") from None
        except (ValueError, KeyError, TypeError):
            raise BytemtpError(f"{state_path}: not a saved dataset's state (no list of _data_files)") from None
        seen: set[str] = set()
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise BytemtpError(f"{state_path}: data file {name!r} is not a file name in {directory}")
            if name in seen:  # its rows would be read twice
                raise BytemtpError(f"{state_path}: lists data file {name!r} more than once")
            seen.add(name)
        for name in files:
            rel = prefix + name
            if any(_glob_match(rel, name, g) for g in self.exclude):
                continue
            if self._picked(rel, name):
                yield rel, directory / name
            else:
                self._passed_over.append(rel)


def _dict_splits(directory: Path, listing: dict[str, os.DirEntry]) -> list[str]:
    """The split names a ``dataset_dict.json`` lists, else the sub-directories (it may be damaged)."""
    try:
        splits = json.loads((directory / HF_DICT).read_bytes())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        splits = None
    if isinstance(splits, list) and splits and all(isinstance(n, str) for n in splits):
        return splits
    return sorted(n for n, e in listing.items() if e.is_dir(follow_symlinks=False)) or ["train"]
