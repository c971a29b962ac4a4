"""FoT pre-training data (docs/training.md#documents-and-tokens, C.2): documents to tokens to packed batches, resumable,
made ahead in a worker.

In three resumable stages (each is an iterator with `state_dict()` / `load_state_dict()`):

* text documents: `longllama.documents.iter_documents(paths)` (or `ListDocuments`);
* `TokenizedDocs`: each document becomes [BOS] + ids + [EOS] with loss mask [0] + [1]*n + [1];
* `LinearPipeline`, `DocAwarePipeline`, `KPackingPipeline` (`build_pipeline("doc_aware_k4", ...)`): batches of
  `input_ids`, `targets` (inputs shifted by one: already the next token, unlike HF `labels`) and `loss_mask`.

A state dict is plain JSON (ints, strings, lists; row buffers as base64), so it can live in a training checkpoint;
a pipeline restored from it yields exactly the batches the saved one would have yielded next. `Prefetcher` makes
the next batches in a background worker.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from longllama.documents import Resumable, check_state
from longllama.errors import InputError

Doc = tuple[list[int], list[int]]  # (token ids, loss mask of 0/1), one document


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------


class TokenizedDocs:
    """Documents as (ids, loss mask): [BOS] + tokens + [EOS] with mask [0] + [1]*n + [1]
    (docs/training.md#documents-and-tokens).

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
        check_state(state, "tokenized", {"min_length": self.min_length})
        self.documents.load_state_dict(state["documents"])
        self._chunk, self._chunk_state, self._taken = [], None, 0
        for _ in range(int(state.get("skip", 0))):  # taken from the saved chunk already: read past them (unencoded)
            next(self.documents)
        self._last_epoch = getattr(self.documents, "epoch", 0)


# --------------------------------------------------------------------------------------------------------------------
# Batching pipelines (docs/training.md#batching-pipelines)
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


def check_positive(**values: int) -> None:
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
        check_positive(batch_size=batch_size, seq_len=seq_len)
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
        check_state(state, self.kind, {"batch_size": self.batch_size, "seq_len": self.seq_len})
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
        check_positive(batch_size=batch_size, seq_len=seq_len, k=k)
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
        check_state(state, self.kind, {"k": self.k})
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
    """The pipeline named in docs/training.md#batching-pipelines: "linear", "doc_aware" or "doc_aware_k{k}"."""
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

    def __init__(
        self,
        source: Any,
        *,
        depth: int = 4,
        state_at: Callable[[int], bool] = lambda index: True,
        process: bool = True,
        pin: bool = False,
    ) -> None:
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
            raise RuntimeError(
                f"no data state was taken after batch {self._taken}: state_at({self._taken}) was "
                "false; save only at the steps state_at selects"
            )
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
