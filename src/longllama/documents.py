"""Text documents of local files (.jsonl / .txt / .parquet) as resumable iterators, for training and evaluation.

`iter_documents(paths)` reads .jsonl / .txt / .parquet files in order (`ListDocuments` wraps an in-memory list);
`loop=True` wraps around forever, as the reference JSON dataset does. A state dict (`state_dict()` /
`load_state_dict()`) is plain JSON, so it can live in a training checkpoint. Parquet needs the optional `pyarrow`
package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from longllama.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # all read as JSON lines, one object per line
TEXT_SUFFIXES = (".txt", ".text", ".md")  # a whole file is one document
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES


class Resumable(Protocol):
    """An iterator whose position can be saved as JSON and restored."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _field_names(spec: str) -> list[str]:
    """docs/training.md#documents-and-tokens: "a+b" reads fields a and b and joins their texts with a space."""
    names = [name.strip() for name in spec.split("+")] if isinstance(spec, str) else []
    if not names or not all(names):
        raise InputError(f"field {spec!r} is not a field name (or names joined by '+'); pass e.g. field='text'")
    return names


def _join_fields(record: Any, names: Sequence[str], where: str) -> str:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}; write one object per line")
    texts = []
    for name in names:
        if name not in record:
            keys = ", ".join(sorted(map(str, record))[:8]) or "none"
            raise InputError(f"{where}: no field {name!r} (fields: {keys}); pass the right field=")
        value = record[name]
        if not isinstance(value, str):
            raise InputError(f"{where}: field {name!r} is {type(value).__name__}, not text; fix or drop this record")
        texts.append(value)
    return " ".join(texts)


def expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files in the order given; a folder stands for its supported files, sorted by name."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise InputError("no data files given; pass at least one .jsonl, .txt or .parquet file")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise InputError(f"folder {item} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
        elif not item.is_file():
            raise InputError(f"data file {item} does not exist; check the path")
        elif item.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise InputError(f"{item}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        else:
            files.append(item)
    return files


def parse_json_line(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:60]})") from exc


def _jsonl_texts(path: Path, names: Sequence[str], offset: int, line: int) -> Iterator[tuple[str, int, int]]:
    """(text, byte offset after it, lines read) for each non-blank line from byte `offset` on."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while raw := handle.readline():
            line += 1
            offset += len(raw)
            if raw.strip():  # blank lines (a trailing newline, say) hold no document
                where = f"{path} line {line}"
                yield _join_fields(parse_json_line(raw, where), names, where), offset, line


def _text_file(path: Path, offset: int) -> Iterator[tuple[str, int, int]]:
    """The whole file is one document (no splitting on blank lines: a book or a source file stays in one piece)."""
    if offset == 0:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it") from exc
        yield text, 1, 1


def _parquet_module(path: Path) -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise InputError(f"reading {path} needs the pyarrow package; pip install pyarrow") from exc
    return parquet


def open_parquet(path: Path, columns: Sequence[str]) -> Any:
    parquet = _parquet_module(path)
    try:
        opened = parquet.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise InputError(f"{path} is not a readable parquet file ({str(exc)[:80]})") from exc
    missing = [name for name in columns if name not in opened.schema_arrow.names]
    if missing:
        present = ", ".join(opened.schema_arrow.names[:8])
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {present}); pass the right field=")
    return opened


def _parquet_texts(path: Path, names: Sequence[str], start: int) -> Iterator[tuple[str, int, int]]:
    """(text, rows read, rows read) for each row from row `start` on, one row group in memory at a time."""
    opened = open_parquet(path, names)
    columns = list(dict.fromkeys(names))
    first = 0
    for group in range(opened.num_row_groups):
        size = opened.metadata.row_group(group).num_rows
        if first + size > start:  # skip whole groups before the resume point without reading them
            table = opened.read_row_group(group, columns=columns)
            values = {name: table.column(name).to_pylist() for name in columns}
            for index in range(max(start - first, 0), size):
                record = {name: values[name][index] for name in columns}
                row = first + index
                yield _join_fields(record, names, f"{path} row {row}"), row + 1, row + 1
        first += size


def _epoch_order(size: int, seed: int | None, epoch: int) -> list[int]:
    """Item order for one epoch: as given, or a permutation drawn from (seed, epoch) so it can be recomputed."""
    if seed is None:
        return list(range(size))
    return np.random.default_rng([seed, epoch]).permutation(size).tolist()


def check_state(state: Mapping[str, Any], kind: str, expected: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
        raise InputError(f"state dict is for {got!r}, not {kind!r}; restore it into the same kind of object")
    for key, value in expected.items():
        if state.get(key) != value:
            raise InputError(f"state dict has {key}={state.get(key)!r} but this {kind} has {value!r}; use the same")


class _EpochGuard:
    """Stops an endless loop over data that holds no (accepted) document at all."""

    def __init__(self) -> None:
        self.seen = True  # unknown after a restore: allow one full pass before complaining

    def wrap(self, what: str) -> None:
        if not self.seen:
            raise InputError(f"{what} holds no documents; a looping source would never yield one")
        self.seen = False


class DocumentReader:
    """Texts of local data files, one per document, in file order; an iterator that can be saved and resumed.

    .jsonl / .ndjson / .json: one JSON object per line, text in `field` ("a+b" joins fields a and b with a space);
    blank lines are skipped. .txt / .text / .md: the whole file is one document. .parquet: column `field`, one row
    per document (needs pyarrow). With `loop=True` the files repeat forever (epochs); with `shuffle_seed` the order of
    the *files* is shuffled anew each epoch (documents inside a file keep their order: pre-shuffle large files).
    The position (epoch, file, byte offset or row) is kept, so resuming costs a seek, not a re-read.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        field: str = "text",
        loop: bool = False,
        shuffle_seed: int | None = None,
    ) -> None:
        self.paths = expand_paths(paths)
        self.field = field
        self._names = _field_names(field)
        self.loop = loop
        self.shuffle_seed = shuffle_seed
        self.epoch, self._file, self._offset, self._line = 0, 0, 0, 0
        self._texts: Iterator[tuple[str, int, int]] | None = None
        self._guard = _EpochGuard()

    def __iter__(self) -> DocumentReader:
        return self

    def __next__(self) -> str:
        while True:
            if self._texts is None:
                if self._file == len(self.paths):
                    if not self.loop:
                        raise StopIteration
                    self._guard.wrap(", ".join(map(str, self.paths)))
                    self.epoch, self._file, self._offset, self._line = self.epoch + 1, 0, 0, 0
                self._texts = self._open(self.paths[self._order()[self._file]])
            item = next(self._texts, None)
            if item is None:
                self._texts, self._file, self._offset, self._line = None, self._file + 1, 0, 0
                continue
            text, self._offset, self._line = item
            self._guard.seen = True
            return text

    def _order(self) -> list[int]:
        return _epoch_order(len(self.paths), self.shuffle_seed, self.epoch)

    def _open(self, path: Path) -> Iterator[tuple[str, int, int]]:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return _jsonl_texts(path, self._names, self._offset, self._line)
        if suffix in PARQUET_SUFFIXES:
            return _parquet_texts(path, self._names, self._offset)
        return _text_file(path, self._offset)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "files",
            # Names only: a checkpoint moved to another machine may find the same files under another folder.
            "files": [path.name for path in self.paths],
            "field": self.field,
            "shuffle_seed": self.shuffle_seed,
            "epoch": self.epoch,
            "file": self._file,
            "offset": self._offset,
            "line": self._line,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"files": [p.name for p in self.paths], "field": self.field, "shuffle_seed": self.shuffle_seed}
        check_state(state, "files", expected)
        self.epoch, self._file = int(state["epoch"]), int(state["file"])
        self._offset, self._line = int(state["offset"]), int(state["line"])
        self._texts = None
        self._guard = _EpochGuard()


def iter_documents(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    field: str = "text",
    loop: bool = False,
    shuffle_seed: int | None = None,
) -> DocumentReader:
    """The documents of local .jsonl / .txt / .parquet files, as a resumable iterator (see `DocumentReader`)."""
    return DocumentReader(paths, field=field, loop=loop, shuffle_seed=shuffle_seed)


class ListDocuments:
    """An in-memory sequence of documents (texts, or token-id lists) as a resumable iterator.

    With `shuffle_seed` each epoch visits the items in a fresh permutation drawn from (seed, epoch).
    """

    def __init__(self, items: Sequence[Any], *, loop: bool = False, shuffle_seed: int | None = None) -> None:
        self.items = items
        self.loop = loop
        self.shuffle_seed = shuffle_seed
        self.epoch, self._index = 0, 0
        self._order = _epoch_order(len(items), shuffle_seed, 0)

    def __iter__(self) -> ListDocuments:
        return self

    def __next__(self) -> Any:
        if self._index == len(self.items):
            if not self.loop:
                raise StopIteration
            if not self.items:
                raise InputError("the document list is empty; a looping source would never yield one")
            self.epoch, self._index = self.epoch + 1, 0
            self._order = _epoch_order(len(self.items), self.shuffle_seed, self.epoch)
        item = self.items[self._order[self._index]]
        self._index += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "list",
            "size": len(self.items),
            "shuffle_seed": self.shuffle_seed,
            "epoch": self.epoch,
            "index": self._index,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state, "list", {"size": len(self.items), "shuffle_seed": self.shuffle_seed})
        self.epoch, self._index = int(state["epoch"]), int(state["index"])
        self._order = _epoch_order(len(self.items), self.shuffle_seed, self.epoch)
