"""Training data: turn local files into the token batches of FoT pre-training (SPEC C.1, C.2) and the padded examples
of instruction / chat fine-tuning (SPEC D.1, D.2).

Pre-training, in three resumable stages (each is an iterator with `state_dict()` / `load_state_dict()`):

* text documents: `iter_documents(paths)` reads .jsonl / .txt / .parquet files in order (`ListDocuments` wraps an
  in-memory list); `loop=True` wraps around forever, as the reference JSON dataset does;
* `TokenizedDocs`: each document becomes [BOS] + ids + [EOS] with loss mask [0] + [1]*n + [1];
* `LinearPipeline`, `DocAwarePipeline`, `KPackingPipeline` (`build_pipeline("doc_aware_k4", ...)`): batches of
  `input_ids`, `targets` (inputs shifted by one: already the next token, unlike HF `labels`) and `loss_mask`.

A state dict is plain JSON (ints, strings, lists; row buffers as base64), so it can live in a training checkpoint;
a pipeline restored from it yields exactly the batches the saved one would have yielded next.

Fine-tuning: `InstructionExample` (OpenOrca-style rows) and `ChatExample` (ShareGPT-style rows) build one padded
example of `max_total_length` tokens with labels only on answers; `TEMPLATES` / `MIXTURES` hold the released
recipes as data; `SFTDataset`, `MixedDataset` and `filter_rows` cover datasets, mixing and the filter mini-language.

Plain Python / NumPy / PyTorch; parquet needs the optional `pyarrow` package.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from longllama.errors import InputError

IGNORE_INDEX = -100  # label value torch's cross-entropy skips

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # all read as JSON lines, one object per line
TEXT_SUFFIXES = (".txt", ".text", ".md")  # a whole file is one document
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES

Doc = tuple[list[int], list[int]]  # (token ids, loss mask of 0/1), one document


class Resumable(Protocol):
    """An iterator whose position can be saved as JSON and restored."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------------------------------
# Text documents
# --------------------------------------------------------------------------------------------------------------------


def _field_names(spec: str) -> list[str]:
    """SPEC C.1: "a+b" reads fields a and b and joins their texts with a space."""
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


def _expand_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
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


def _parse_json_line(raw: bytes, where: str) -> Any:
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
                yield _join_fields(_parse_json_line(raw, where), names, where), offset, line


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


def _open_parquet(path: Path, columns: Sequence[str]) -> Any:
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
    opened = _open_parquet(path, names)
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


def _check_state(state: Mapping[str, Any], kind: str, expected: Mapping[str, Any]) -> None:
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
        self.paths = _expand_paths(paths)
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
        _check_state(state, "files", expected)
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
        _check_state(state, "list", {"size": len(self.items), "shuffle_seed": self.shuffle_seed})
        self.epoch, self._index = int(state["epoch"]), int(state["index"])
        self._order = _epoch_order(len(self.items), self.shuffle_seed, self.epoch)


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------


class TokenizedDocs:
    """Documents as (ids, loss mask): [BOS] + tokens + [EOS] with mask [0] + [1]*n + [1] (SPEC C.1).

    `tokenizer` encodes each text without special tokens (e.g. `longllama.tokenizer.load_tokenizer(folder)`); its
    BOS/EOS ids are used unless `bos_id` / `eos_id` are given. Without a tokenizer the documents must already be
    token-id lists and `bos_id` / `eos_id` are required. Documents with fewer than `min_length` tokens (BOS and EOS
    counted, as the reference TokenFilter counts them) are dropped.

    `read_ahead=N` reads N documents at a time and encodes them in one batched call (the Rust tokenizer spreads it
    over the cores); the documents, and the states, are exactly those of reading one at a time: a state is the
    reader's position before the current chunk plus how many of the chunk's documents were taken.
    """

    def __init__(
        self,
        documents: Resumable,
        *,
        tokenizer: Any = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = True,
        min_length: int = 0,
        read_ahead: int = 0,
    ) -> None:
        self.documents = documents
        self.tokenizer = tokenizer
        self.bos_id = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise InputError("no BOS/EOS id: pass a tokenizer that has them, or bos_id= and eos_id=")
        self.add_bos, self.add_eos = add_bos, add_eos
        self.min_length = min_length
        self.read_ahead = read_ahead
        self._last_epoch = getattr(documents, "epoch", 0)
        self._chunk: list[list[int]] = []  # encoded documents of the current read-ahead chunk
        self._chunk_state: dict[str, Any] | None = None  # the reader's state before that chunk
        self._taken = 0  # documents of the chunk handed on (or dropped) so far

    def __iter__(self) -> TokenizedDocs:
        return self

    def __next__(self) -> Doc:
        while True:
            ids = self._next_encoded()
            ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos
            epoch = getattr(self.documents, "epoch", 0)
            if ids and len(ids) >= self.min_length:
                self._last_epoch = epoch
                # Predicting BOS (the start of an unrelated document) is unlearnable: no loss there.
                return ids, [0] * self.add_bos + [1] * (len(ids) - self.add_bos)
            if epoch >= self._last_epoch + 2:  # a whole epoch went by with nothing long enough
                raise InputError(f"no document has at least min_length={self.min_length} tokens; lower it")

    def _next_encoded(self) -> list[int]:
        if self.read_ahead <= 0:
            return self._encode(next(self.documents))
        if self._taken >= len(self._chunk):
            self._read_chunk()
        self._taken += 1
        return self._chunk[self._taken - 1]

    def _read_chunk(self) -> None:
        state = self.documents.state_dict()
        raw = []
        for _ in range(self.read_ahead):
            try:
                raw.append(next(self.documents))
            except StopIteration:
                break
        if not raw:
            raise StopIteration
        self._chunk_state, self._taken = state, 0
        self._chunk = self._encode_many(raw)

    def _encode_many(self, documents: list[Any]) -> list[list[int]]:
        if self.tokenizer is None or not all(isinstance(d, str) for d in documents):
            return [self._encode(d) for d in documents]  # ids as they are, or the per-document error
        return [list(ids) for ids in self.tokenizer(documents, add_special_tokens=False)["input_ids"]]

    def _encode(self, document: Any) -> list[int]:
        if self.tokenizer is None:
            if isinstance(document, str):
                raise InputError("got a text document but no tokenizer; pass tokenizer=load_tokenizer(model_dir)")
            return [int(token) for token in document]
        if not isinstance(document, str):
            raise InputError(f"document is {type(document).__name__}, not text; pass texts to a tokenizer")
        return list(self.tokenizer.encode(document, add_special_tokens=False))

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": "tokenized", "min_length": self.min_length}
        if self._chunk_state is not None and self._taken < len(self._chunk):
            return {**state, "documents": self._chunk_state, "skip": self._taken}
        return {**state, "documents": self.documents.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, "tokenized", {"min_length": self.min_length})
        self.documents.load_state_dict(state["documents"])
        self._chunk, self._chunk_state, self._taken = [], None, 0
        for _ in range(int(state.get("skip", 0))):  # taken from the saved chunk already: read past them (unencoded)
            next(self.documents)
        self._last_epoch = getattr(self.documents, "epoch", 0)


# --------------------------------------------------------------------------------------------------------------------
# Batching pipelines (SPEC C.2)
# --------------------------------------------------------------------------------------------------------------------


def _pack(values: Sequence[int], dtype: str) -> str:
    """Compact, JSON-safe form of a token or mask buffer (base64 of little-endian values)."""
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text: str, dtype: str) -> list[int]:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).tolist()


def _pack_mask(mask: Sequence[int]) -> str:
    array = np.asarray(mask)
    if array.size and not np.isin(array, (0, 1)).all():
        raise InputError("loss masks must hold only 0 and 1 to be saved in a state dict")
    return _pack(array, "u1")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")


class _Buffer:
    """Tokens and loss mask waiting to be batched (one batch row for doc_aware, the whole stream for linear).

    Taken tokens are skipped with `start` and dropped only once they are most of the list, so a long document
    is not copied again for every batch it spans.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.mask: list[int] = []
        self.start = 0

    def __len__(self) -> int:
        return len(self.tokens) - self.start

    def fill(self, source: Iterator[Doc], size: int) -> None:
        # Whole documents are appended until `size` tokens are there; the tail waits for the next batch.
        while len(self) < size:
            tokens, mask = next(source)
            if len(tokens) != len(mask):
                raise InputError(f"document has {len(tokens)} tokens but {len(mask)} loss-mask values")
            self.tokens.extend(tokens)
            self.mask.extend(mask)

    def take(self, count: int) -> tuple[list[int], list[int], list[int]]:
        """(inputs, targets, target loss mask) of `count` positions; the buffer keeps everything from `count` on."""
        at = self.start
        inputs = self.tokens[at : at + count]
        targets, mask = self.tokens[at + 1 : at + count + 1], self.mask[at + 1 : at + count + 1]
        self.start += count
        if self.start * 2 > len(self.tokens):
            self.tokens, self.mask, self.start = self.tokens[self.start :], self.mask[self.start :], 0
        return inputs, targets, mask

    def state(self) -> dict[str, str]:
        return {"tokens": _pack(self.tokens[self.start :], "<i4"), "mask": _pack_mask(self.mask[self.start :])}

    def load(self, state: Mapping[str, str]) -> None:
        self.tokens, self.mask = _unpack(state["tokens"], "<i4"), _unpack(state["mask"], "u1")
        self.start = 0


def _batch(rows: Sequence[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    inputs, targets, mask = zip(*rows, strict=True)
    # Through numpy: much faster than torch.tensor on nested Python lists.
    return {
        "input_ids": torch.from_numpy(np.asarray(inputs, dtype=np.int64)),
        "targets": torch.from_numpy(np.asarray(targets, dtype=np.int64)),
        "loss_mask": torch.from_numpy(np.asarray(mask, dtype=np.float32)),
    }


class _Pipeline:
    """Shared iterator and state plumbing; a subclass makes one batch in `_make`."""

    kind = ""

    def __init__(self, source: Iterator[Doc], batch_size: int, seq_len: int) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        self.source, self.batch_size, self.seq_len = source, int(batch_size), int(seq_len)
        self.batches = 0  # batches yielded so far

    def __iter__(self) -> _Pipeline:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # StopIteration from a finite source ends the pipeline; the partial batch is dropped.
        batch = self._make()
        self.batches += 1
        return batch

    def _make(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _buffers(self) -> list[_Buffer]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here; take it between batches (not while a prefetcher runs ahead)."""
        if not hasattr(self.source, "state_dict"):
            raise InputError("this pipeline's source cannot save its position; use DocumentReader or ListDocuments")
        return {
            "kind": self.kind,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "batches": self.batches,
            "buffers": [buffer.state() for buffer in self._buffers()],
            "source": self.source.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.kind, {"batch_size": self.batch_size, "seq_len": self.seq_len})
        self.source.load_state_dict(state["source"])
        for buffer, saved in zip(self._buffers(), state["buffers"], strict=True):
            buffer.load(saved)
        self.batches = int(state["batches"])


class LinearPipeline(_Pipeline):
    """`linear`: one token stream; each batch is the next B·L tokens reshaped to (B, L), targets shifted by one."""

    kind = "linear"

    def __init__(self, source: Iterator[Doc], batch_size: int, seq_len: int) -> None:
        super().__init__(source, batch_size, seq_len)
        self._stream = _Buffer()

    def _buffers(self) -> list[_Buffer]:
        return [self._stream]

    def _make(self) -> dict[str, torch.Tensor]:
        count = self.batch_size * self.seq_len
        self._stream.fill(self.source, count + 1)
        flat = self._stream.take(count)
        rows = [tuple(part[i * self.seq_len : (i + 1) * self.seq_len] for part in flat) for i in range(self.batch_size)]
        return _batch(rows)


class DocAwarePipeline(_Pipeline):
    """`doc_aware`: each of the B rows packs its own documents back to back ("... EOS BOS ...") and continues them
    across batches. Before a batch, rows are refilled in order 0..B-1 with whole documents from the shared source
    while they hold fewer than L+1 tokens; then input = buf[:L], targets = buf[1:L+1], loss_mask = mask[1:L+1], and
    the row keeps buf[L:] (so the next batch's first input is this batch's last target).
    """

    kind = "doc_aware"

    def __init__(self, source: Iterator[Doc], batch_size: int, seq_len: int) -> None:
        super().__init__(source, batch_size, seq_len)
        self._rows = [_Buffer() for _ in range(self.batch_size)]

    def _buffers(self) -> list[_Buffer]:
        return self._rows

    def _make(self) -> dict[str, torch.Tensor]:
        for row in self._rows:
            row.fill(self.source, self.seq_len + 1)
        return _batch([row.take(self.seq_len) for row in self._rows])


class KPackingPipeline:
    """`doc_aware_k{k}`: a doc_aware pipeline of B/k rows of k·L tokens, each row cut into k consecutive (B, L) rows,
    so batch rows j·k ... j·k+k-1 are k consecutive chunks of one stream (what cross-batch attention expects)."""

    kind = "doc_aware_k"

    def __init__(self, source: Iterator[Doc], batch_size: int, seq_len: int, k: int) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len, k=k)
        if batch_size % k:
            raise InputError(f"batch_size {batch_size} is not divisible by k={k}; use a multiple of {k}")
        self.batch_size, self.seq_len, self.k = int(batch_size), int(seq_len), int(k)
        self.inner = DocAwarePipeline(source, self.batch_size // self.k, self.k * self.seq_len)

    @property
    def batches(self) -> int:
        return self.inner.batches

    def __iter__(self) -> KPackingPipeline:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {name: value.reshape(self.batch_size, self.seq_len) for name, value in next(self.inner).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.kind, {"k": self.k})
        self.inner.load_state_dict(state["inner"])


Pipeline = LinearPipeline | DocAwarePipeline | KPackingPipeline


def dataset_packing(name: str) -> int:
    """The k of a `doc_aware_k{k}` pipeline name (the model's dataset packing); 1 for the other pipelines."""
    match = re.fullmatch(r"doc_aware_k(\d+)", name)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    if name in ("linear", "doc_aware"):
        return 1
    raise InputError(f"unknown data pipeline {name!r}; use linear, doc_aware or doc_aware_k<k> (e.g. doc_aware_k4)")


def build_pipeline(name: str, source: Iterator[Doc], *, batch_size: int, seq_len: int) -> Pipeline:
    """The pipeline named in SPEC C.2: "linear", "doc_aware" or "doc_aware_k{k}"."""
    k = dataset_packing(name)
    if name == "linear":
        return LinearPipeline(source, batch_size, seq_len)
    if name == "doc_aware":
        return DocAwarePipeline(source, batch_size, seq_len)
    return KPackingPipeline(source, batch_size, seq_len, k)


class Prefetcher:
    """Make the next batches of a resumable pipeline in a background worker while the caller trains on this one.

    Batch making is CPU work (reading, tokenizing, packing). `process=True` (the default) runs it in a forked
    child process, so it never competes with the training loop for the GIL; `process=False` uses a thread (no
    fork; the GPU waits release the GIL there too). Exact resume still holds: a state is taken right after batch
    `i` is made, for those `i` (counted from 1, continuing from `set_position` after a resume) that `state_at(i)`
    asks for, and `state_dict()` gives the state after the last batch handed out. `pin=True` puts batches in
    page-locked memory, so the copy to the GPU can run asynchronously. Restore a state with `load_state_dict`
    before the first `next`. The worker must not use CUDA (it only reads files and tokenizes).
    """

    def __init__(self, source: Any, *, depth: int = 4, state_at: Callable[[int], bool] = lambda index: True,
                 process: bool = True, pin: bool = False) -> None:
        self.source, self.depth, self.state_at, self.process, self.pin = source, depth, state_at, process, pin
        self._made = self._taken = 0
        self._state: dict[str, Any] | None = None
        self._queue: Any = None
        self._worker: Any = None
        self._stop: Any = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._worker is None:
            self._start()
        arrays, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self._taken += 1
        self._state = state
        batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
        return {name: value.pin_memory() for name, value in batch.items()} if self.pin else batch

    def _start(self) -> None:
        if self.process:
            import multiprocessing

            context = multiprocessing.get_context("fork")
            self._queue, self._stop = context.Queue(maxsize=self.depth), context.Event()
            self._worker = context.Process(target=self._work, name="longllama-data", daemon=True)
        else:
            import queue
            import threading

            self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
            self._worker = threading.Thread(target=self._work, name="longllama-data", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        if self.process:  # the worker's tensor work is tiny; torch's thread pool would only crowd the trainer's cores
            torch.set_num_threads(1)
        made = self._made
        while not self._stop.is_set():
            try:
                batch = next(self.source)
                made += 1
                state = self.source.state_dict() if self.state_at(made) else None
                # NumPy arrays cross the process boundary as plain pickled buffers (no shared-memory handles).
                item = ({name: value.numpy() for name, value in batch.items()}, state, None)
            except BaseException as error:  # handed to the consumer, which re-raises it
                item = (None, None, error)
            self._queue.put(item)
            if item[2] is not None:
                return

    def set_position(self, index: int) -> None:
        """Number the next batch `index + 1` (after a resume at step `index`), before the first next()."""
        if self._worker is not None:
            raise RuntimeError("set_position after batches were made")
        self._made = self._taken = index

    def state_dict(self) -> dict[str, Any]:
        if self._worker is None:
            return self.source.state_dict()
        if self._state is None:
            raise RuntimeError(f"no data state was taken after batch {self._taken}: state_at({self._taken}) was "
                               "false; save only at the steps state_at selects")
        return self._state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._worker is not None:
            raise RuntimeError("load_state_dict after batches were made: restore the state before the first next()")
        self.source.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker (a process is terminated; a thread, a daemon holding nothing, ends on its next turn)."""
        if self._worker is None:
            return
        self._stop.set()
        if self.process:
            self._worker.terminate()
            self._worker.join(timeout=5)
            self._queue.close()
        else:
            while not self._queue.empty():
                self._queue.get_nowait()


# --------------------------------------------------------------------------------------------------------------------
# Instruction and chat fine-tuning (SPEC D)
# --------------------------------------------------------------------------------------------------------------------

AI_TASK_PROMPT = (
    "You are an AI assistant. User will you give you a task. "
    "Your goal is to complete the task as faithfully as you can.\n\n"
)
CHAT_PROMPT = (
    "A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted as ASSISTANT:). "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
)


@dataclass(frozen=True)
class InstructionTemplate:
    """How an OpenOrca-style row becomes texts: input = [pre_prompt + row[prompt_field] + post_prompt] (only with a
    prompt_field) + pre_question + row[question_field] + post_question; response = pre_response +
    row[response_field] + post_response. Defaults are the reference trainer's."""

    question_field: str = "question"
    response_field: str = "response"
    prompt_field: str | None = None
    pre_prompt: str = ""
    post_prompt: str = "\n"
    pre_question: str = ""
    post_question: str = "\n"
    pre_response: str = ""
    post_response: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """How a ShareGPT-style row becomes a conversation: `initial_prompt`, then per turn in row[conversations_field]
    the model or human prefix and turn[text_field]; turns whose turn[source_field] == model_source are learned.
    `replace_rules` are (regex, replacement) pairs applied in order to each turn text (re.DOTALL)."""

    conversations_field: str = "conversations"
    text_field: str = "value"
    source_field: str = "from"
    model_source: str = "gpt"
    initial_prompt: str = "You are a helpful ASSISTANT.\n\n"
    model_prefix: str = "\nASSISTANT: "
    human_prefix: str = "\nUSER: "
    replace_rules: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SFTLengths:
    """Truncation and padding (SPEC D.1). max_input_length / max_output_length apply to instruction data only."""

    max_input_length: int = 2048
    max_output_length: int = 2048
    max_total_length: int = 2048
    always_pad: bool = True
    random_pad: bool = True

    def __post_init__(self) -> None:
        _check_positive(
            max_input_length=self.max_input_length,
            max_output_length=self.max_output_length,
            max_total_length=self.max_total_length,
        )


# The templates of SPEC D.2, by name.
TEMPLATES: dict[str, InstructionTemplate | ChatTemplate] = {
    "openorca-3b": InstructionTemplate(
        prompt_field="system_prompt", post_prompt="\n", question_field="question", post_question="\n",
        response_field="response",
    ),
    "sharegpt-3b-v1.1": ChatTemplate(text_field="markdown", initial_prompt=CHAT_PROMPT),
    "code-7b-instruct-mathinstruct": InstructionTemplate(
        pre_question=AI_TASK_PROMPT, question_field="instruction", post_question="\nAnswer: ", response_field="output",
    ),
    "code-7b-instruct-openorca": InstructionTemplate(
        pre_question=AI_TASK_PROMPT, question_field="question", post_question=" ", response_field="response",
    ),
    "code-7b-instruct-sharegpt": ChatTemplate(text_field="markdown", initial_prompt=CHAT_PROMPT),
}

_NO_OPENAI_DAN = r"conversations.<int>*^.value<M>(?i)^((?!openai).)*$<;>conversations.<int>*^.value<M>^((?!DAN).)*$"
_CODE_CHAT_CLEAN = (
    r"conversations.<int>*^.value<M>(?i)^((?!((as a|I am).{0,32}language model)|(openai)|(against my guidelines)"
    r"|(I apologize)).)*$<;>conversations.<int>*^.value<M>^((?!DAN).)*$"
)
_ORCA_NON_ANSWERS = (
    r"response<M>(?i)^((?!(does not mention)|(it is not possible to)|(no answer\.$)"
    r"|(Insufficient information to provide an answer\.$)).)*$"
)


@dataclass(frozen=True)
class MixturePart:
    """One dataset of a fine-tuning mixture: its template, sampling proportion, filter rules and where it came from
    (a Hugging Face dataset id and revision, to export to a local file)."""

    template: str
    proportion: float
    filter: str = ""
    dataset: str = ""


@dataclass(frozen=True)
class Mixture:
    parts: tuple[MixturePart, ...]
    lengths: SFTLengths = dataclass_field(default_factory=SFTLengths)


_ORCA = "Open-Orca/OpenOrca@f0823c7ffc48c9d33a42f16cf0b885fed4a7d0a1"
_SHAREGPT = "zetavg/ShareGPT-Processed@15968d6dfa02529988da12e382af3ab7c857ebcd"
_MATH = "TIGER-Lab/MathInstruct@95969ba885cf13d89c1fc0990c1a246a46e388d6"

# The fine-tuning runs of SPEC D.2 / D.3.
MIXTURES: dict[str, Mixture] = {
    "inst-3b-low-budget": Mixture(
        (MixturePart("openorca-3b", 1.0, dataset=_ORCA),),
        SFTLengths(max_input_length=1024, max_output_length=1024, max_total_length=1024),
    ),
    "instchat-3b-v1.1": Mixture(
        (
            MixturePart("openorca-3b", 0.99, dataset=_ORCA),
            MixturePart(
                "sharegpt-3b-v1.1", 0.01,
                f"lang<M>^en$<;>{_NO_OPENAI_DAN}<;>conversations.<int>0.value<LENLT>8000", _SHAREGPT,
            ),
        ),
        SFTLengths(max_input_length=2048, max_output_length=2048, max_total_length=2048),
    ),
    "code-7b-instruct": Mixture(
        (
            MixturePart("code-7b-instruct-mathinstruct", 0.71, dataset=_MATH),
            MixturePart("code-7b-instruct-openorca", 0.16, "question<LENLT>5000", _ORCA),
            MixturePart(
                "code-7b-instruct-openorca", 0.10,
                f"question<LENGT>5000<;>question<LENLT>12000<;>{_ORCA_NON_ANSWERS}", _ORCA,
            ),
            MixturePart(
                "code-7b-instruct-sharegpt", 0.02,
                f"lang<M>^en$<;>conversations.<int>*.value<LENLT>6000<;>{_CODE_CHAT_CLEAN}", _SHAREGPT,
            ),
            MixturePart(
                "code-7b-instruct-sharegpt", 0.01,
                f"lang<M>^en$<;>conversations.<int>*.value<LENGT>6000<;>conversations.<int>*.value<LENLT>12000"
                f"<;>{_CODE_CHAT_CLEAN}",
                _SHAREGPT,
            ),
        ),
        SFTLengths(max_input_length=3072, max_output_length=3072, max_total_length=3072),
    ),
}


def pad_id_of(tokenizer: Any) -> int:
    """The padding id of SPEC D.1: the tokenizer's pad token, else its unk token (0 for LLaMA)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "unk_token_id", None)
    if pad is None:
        raise InputError("the tokenizer has neither a pad nor an unk token; set tokenizer.pad_token")
    return int(pad)


def _template(value: str | InstructionTemplate | ChatTemplate, kind: type) -> Any:
    template = TEMPLATES.get(value) if isinstance(value, str) else value
    if not isinstance(template, kind):
        names = ", ".join(name for name, t in TEMPLATES.items() if isinstance(t, kind))
        raise InputError(f"{value!r} is not a {kind.__name__}; use one of {names} or a {kind.__name__}(...)")
    return template


def _text_of(record: Any, name: str, what: str) -> str:
    if not isinstance(record, Mapping) or name not in record:
        raise InputError(f"{what} has no field {name!r}; set the template's field names to this data's")
    value = record[name]
    if not isinstance(value, str):
        raise InputError(f"{what} field {name!r} is {type(value).__name__}, not text")
    return value


class _ExampleBuilder:
    """Tokenizing, truncation, padding and masks shared by the instruction and chat builders."""

    mask_eos = False  # chat hides EOS tokens from attention (they stay targets)

    def __init__(self, tokenizer: Any, lengths: SFTLengths) -> None:
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.pad_id = pad_id_of(tokenizer)
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise InputError("the tokenizer has no BOS or EOS token; fine-tuning examples need both")

    def tokens(self, text: str) -> list[int]:
        # Each segment separately and without specials, so SentencePiece gives each its own dummy-prefix space.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def finish(self, ids: list[int], labels: list[int], rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        total = self.lengths.max_total_length
        ids, labels = ids[:total], labels[:total]
        padding = total - len(ids) if self.lengths.always_pad else 0
        left = 0
        if padding > 0 and self.lengths.random_pad:
            if rng is None:
                raise InputError("random_pad needs rng=np.random.default_rng(seed); or set random_pad=False")
            # How much padding goes left decides how much of the example lands in memory (SPEC D.4).
            left = int(rng.integers(0, padding + 1))
        right = padding - left
        ids = [self.pad_id] * left + ids + [self.pad_id] * right
        labels = [IGNORE_INDEX] * left + labels + [IGNORE_INDEX] * right
        input_ids = torch.tensor(ids, dtype=torch.int64)
        attention_mask = input_ids != self.pad_id
        if self.mask_eos:
            attention_mask &= input_ids != self.eos_id
        return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.int64),
                "attention_mask": attention_mask}


class InstructionExample(_ExampleBuilder):
    """Builds an instruction example (SPEC D.1): in = [BOS] + tok(input text), cut to max_input_length; out =
    tok(response text) + [EOS], cut to max_output_length (which may drop the EOS); labels IGNORE on `in`; the
    whole cut to max_total_length and padded to it. Call with a row (dict) and, for random_pad, a numpy Generator.
    The reference drew random padding from the global numpy RNG; here the caller's Generator is used, so results
    are reproducible and independent of other code using numpy."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | InstructionTemplate = "openorca-3b",
        lengths: SFTLengths = SFTLengths(),
    ) -> None:
        super().__init__(tokenizer, lengths)
        self.template: InstructionTemplate = _template(template, InstructionTemplate)

    def texts(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """(input text, response text) of a row."""
        t = self.template
        prompt = ""
        if t.prompt_field is not None:
            prompt = t.pre_prompt + _text_of(row, t.prompt_field, "row") + t.post_prompt
        question = t.pre_question + _text_of(row, t.question_field, "row") + t.post_question
        response = t.pre_response + _text_of(row, t.response_field, "row") + t.post_response
        return prompt + question, response

    def __call__(self, row: Mapping[str, Any], *, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        question, response = self.texts(row)
        given = ([self.bos_id] + self.tokens(question))[: self.lengths.max_input_length]
        answer = (self.tokens(response) + [self.eos_id])[: self.lengths.max_output_length]
        return self.finish(given + answer, [IGNORE_INDEX] * len(given) + answer, rng)


class ChatExample(_ExampleBuilder):
    """Builds a chat example (SPEC D.1): [BOS] + tok(initial prompt), then per turn tok(prefix) + tok(text), plus
    [EOS] after model turns; labels only on model texts and their EOS; cut to max_total_length and padded to it;
    attention_mask is also False on EOS tokens. See `InstructionExample` about `rng`."""

    mask_eos = True

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | ChatTemplate = "sharegpt-3b-v1.1",
        lengths: SFTLengths = SFTLengths(),
    ) -> None:
        super().__init__(tokenizer, lengths)
        self.template: ChatTemplate = _template(template, ChatTemplate)
        try:
            self._rules = [(re.compile(rule, re.DOTALL), new) for rule, new in self.template.replace_rules]
        except re.error as exc:
            raise InputError(f"chat replace rule is not a valid regex ({exc})") from exc
        self._model_prefix = self.tokens(self.template.model_prefix)
        self._human_prefix = self.tokens(self.template.human_prefix)

    def __call__(self, row: Mapping[str, Any], *, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        t = self.template
        ids = [self.bos_id] + self.tokens(t.initial_prompt)
        labels = [IGNORE_INDEX] * len(ids)
        turns = row.get(t.conversations_field) if isinstance(row, Mapping) else None
        if not isinstance(turns, list):
            raise InputError(f"row has no list field {t.conversations_field!r}; set conversations_field")
        for number, turn in enumerate(turns):
            text = _text_of(turn, t.text_field, f"turn {number}")
            for rule, new in self._rules:
                text = rule.sub(new, text)
            if t.source_field not in turn:
                raise InputError(f"turn {number} has no field {t.source_field!r}; set the template's source_field")
            learned = turn[t.source_field] == t.model_source
            prefix = self._model_prefix if learned else self._human_prefix
            body = self.tokens(text) + [self.eos_id] * learned
            ids += prefix + body
            labels += [IGNORE_INDEX] * len(prefix) + (body if learned else [IGNORE_INDEX] * len(body))
        return self.finish(ids, labels, rng)


def parse_replace_rules(text: str) -> tuple[tuple[str, str], ...]:
    """The reference's command-line form "regex<R>replacement<;>regex<R>replacement" as ChatTemplate.replace_rules."""
    rules = []
    for rule in filter(None, text.split("<;>")):
        if rule.count("<R>") != 1:
            raise InputError(f"replace rule {rule!r} needs exactly one '<R>' between regex and replacement")
        rules.append(tuple(rule.split("<R>")))
    return tuple(rules)


def collate_sft(examples: Sequence[Mapping[str, torch.Tensor]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padding any that are shorter (only when always_pad is off)."""
    pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": False}
    return {
        name: torch.nn.utils.rnn.pad_sequence([e[name] for e in examples], batch_first=True, padding_value=value)
        for name, value in pad_values.items()
    }


class SFTDataset(torch.utils.data.Dataset):
    """Rows (dicts) and an example builder as a map-style dataset of padded examples.

    Random padding of item i uses a Generator seeded with (seed, epoch, i): the same item gets the same padding in
    any DataLoader worker or order, and `set_epoch` gives it new padding in a new epoch.
    """

    def __init__(
        self, rows: Sequence[Mapping[str, Any]], build: _ExampleBuilder, *, seed: int = 42
    ) -> None:
        self.rows, self.build, self.seed, self.epoch = rows, build, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            return self.build(self.rows[index], rng=rng)
        except InputError as exc:
            raise InputError(f"row {index}: {exc}") from exc


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets mixed with given proportions (SPEC D.1): the length is the sum of the lengths; a fixed
    mapping, drawn once with numpy seed 42 as the reference did, picks a dataset for each index, and item i is that
    dataset's item i mod its length. (The reference seeded the global numpy RNG and restored it; a private
    RandomState with the same seed gives the same mapping without touching global state.)"""

    def __init__(self, datasets: Sequence[Any], proportions: Sequence[float], *, seed: int = 42) -> None:
        if not datasets or len(datasets) != len(proportions):
            raise InputError(f"got {len(datasets)} datasets and {len(proportions)} proportions; give one per dataset")
        weights = np.asarray(proportions, dtype=np.float64)
        if (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-6:
            raise InputError(f"proportions {list(proportions)} must be non-negative and sum to 1")
        if any(len(dataset) == 0 for dataset in datasets):
            raise InputError("a dataset of the mixture is empty (all rows filtered out?); drop it or fix its filter")
        self.datasets = list(datasets)
        total = sum(len(dataset) for dataset in self.datasets)
        if len(self.datasets) == 1:
            self.mapping = np.zeros(total, dtype=np.int64)
        else:
            self.mapping = np.random.RandomState(seed).choice(len(self.datasets), total, replace=True, p=weights)

    def __len__(self) -> int:
        return len(self.mapping)

    def __getitem__(self, index: int) -> Any:
        dataset = self.datasets[int(self.mapping[index])]
        return dataset[index % len(dataset)]


def read_rows(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """All records of .jsonl (one JSON object per line) or .parquet files, in order, for fine-tuning datasets."""
    rows: list[dict[str, Any]] = []
    for path in _expand_paths(paths):
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            rows.extend(_open_parquet(path, ()).read().to_pylist())
        elif suffix in JSONL_SUFFIXES:
            rows.extend(_jsonl_records(path))
        else:
            raise InputError(f"{path}: fine-tuning rows must come from .jsonl or .parquet files")
    return rows


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if raw.strip():
                where = f"{path} line {line}"
                record = _parse_json_line(raw, where)
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield record


# --------------------------------------------------------------------------------------------------------------------
# Row filters (SPEC D.1): "path<MODE>arg" rules joined by "<;>"
# --------------------------------------------------------------------------------------------------------------------

_MODES = ("<M>", "<LENLT>", "<LENGT>", "<TOKLT>", "<TOKGT>")
_INT = "<int>"


@dataclass(frozen=True)
class _Rule:
    path: tuple[str, ...]
    mode: str
    pattern: re.Pattern[str] | None
    bound: int


def _parse_rule(text: str) -> _Rule:
    found = [(text.find(mode), mode) for mode in _MODES if mode in text]
    if not found:
        raise InputError(f"filter rule {text!r} has no mode; use one of {', '.join(_MODES)}")
    at, mode = min(found)  # the first marker separates the field path from its argument
    path, arg = tuple(text[:at].split(".")), text[at + len(mode) :]
    if mode == "<M>":
        try:
            return _Rule(path, mode, re.compile(arg, re.DOTALL), 0)
        except re.error as exc:
            raise InputError(f"filter rule {text!r}: bad regex ({exc})") from exc
    try:
        return _Rule(path, mode, None, int(arg))
    except ValueError as exc:
        raise InputError(f"filter rule {text!r}: {mode} needs an integer, got {arg!r}") from exc


def _step(value: Any, key: str, where: str) -> Any:
    try:
        return value[int(key[len(_INT) :])] if key.startswith(_INT) else value[key]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: cannot follow {key!r} of the filter path") from exc


def _matches(value: Any, path: Sequence[str], pattern: re.Pattern[str], where: str) -> bool:
    if not path:
        if not isinstance(value, str):
            raise InputError(f"{where}: filter path ends at {type(value).__name__}, not text")
        return pattern.match(value) is not None
    head, rest = path[0], path[1:]
    if head in (f"{_INT}*^", f"{_INT}*v"):  # all / any list element
        results = (_matches(item, rest, pattern, where) for item in value)
        return all(results) if head.endswith("^") else any(results)
    return _matches(_step(value, head, where), rest, pattern, where)


def _measure(value: Any, path: Sequence[str], size: Callable[[str], int], where: str) -> int:
    if not path:
        if not isinstance(value, str):
            raise InputError(f"{where}: filter path ends at {type(value).__name__}, not text")
        return size(value)
    head, rest = path[0], path[1:]
    if head == f"{_INT}*":  # summed over list elements
        return sum(_measure(item, rest, size, where) for item in value)
    return _measure(_step(value, head, where), rest, size, where)


def make_filter(spec: str, *, tokenizer: Any = None) -> Callable[[Mapping[str, Any]], bool]:
    """A row predicate from rules "path<MODE>arg" joined by "<;>": <M> regex match from the start (re.DOTALL);
    <LENLT>/<LENGT> character length strictly below/above; <TOKLT>/<TOKGT> token count (needs `tokenizer`).
    Path parts are dict keys or `<int>N` (index N), `<int>*^` (all elements match), `<int>*v` (any element
    matches), `<int>*` (lengths summed over elements). An empty spec keeps every row."""
    rules = [_parse_rule(text) for text in spec.split("<;>") if text]
    if tokenizer is None and any(rule.mode.startswith("<TOK") for rule in rules):
        raise InputError("token-count filters (<TOKLT>/<TOKGT>) need tokenizer=")

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def keep(row: Mapping[str, Any]) -> bool:
        for rule in rules:
            where = "filter " + ".".join(rule.path)
            if rule.pattern is not None:
                if not _matches(row, rule.path, rule.pattern, where):
                    return False
                continue
            size = len if rule.mode.startswith("<LEN") else count_tokens
            amount = _measure(row, rule.path, size, where)
            if (amount >= rule.bound) if rule.mode.endswith("LT>") else (amount <= rule.bound):
                return False
        return True

    return keep


def filter_rows(rows: Iterable[Mapping[str, Any]], spec: str, *, tokenizer: Any = None) -> list[Mapping[str, Any]]:
    """The rows that pass `make_filter(spec)`."""
    keep = make_filter(spec, tokenizer=tokenizer)
    return [row for row in rows if keep(row)]
