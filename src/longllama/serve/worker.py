"""The model worker: one thread runs every piece of model work (tokenizing, reading memories, generating), taken
from a bounded queue. Neither the model nor DocumentMemory's copy-on-write bookkeeping is thread-safe, so nothing
else touches them; the web server only queues jobs and reads their results.

Generations are decoded together (batch.py): a generation's job queues its prompt in the batch; the thread runs the
jobs waiting (up to a batch's worth), then one step reads the queued prompts together and advances every running
generation by one token. A generation job that finds the batch full waits at the head of the queue (the queue stays
bounded) until a generation ends."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from longllama.batch import BatchGenerator, Stream
from longllama.cache import LongLlamaCache
from longllama.document_memory import _AnswerText

logger = logging.getLogger(__name__)


WAIT_SLICE = 0.25  # seconds an idle worker's thread waits for a job before it runs Python again (ModelWorker._next)


class QueueFull(Exception):
    """The worker's queue holds as many jobs as it may: the request is refused (429), not kept waiting."""


class ModelWorker:
    """One thread, one bounded queue of jobs; `submit(fn)` returns a Future of `fn()` run on that thread. With an
    `engine`, jobs submitted with `generation=True` add a sequence to it, and the thread steps it between jobs.

    `own_thread=False` starts no thread: the caller runs the jobs on its own thread with `run()`, which returns after
    `close()`. On a CPU that thread should be the one that loaded the model: PyTorch's CPU kernels keep a pool of
    OpenMP threads per calling thread, and a second pool on the same cores made decoding 2-3x slower (measured on
    2 cores; benchmarks/RESULTS.md, "Serving on a CPU").

    `on_idle` runs after each job and before the thread waits for one (the server flushes its outbox there);
    `gather`: see below."""

    def __init__(
        self,
        size: int,
        engine: BatchGenerator | None = None,
        *,
        own_thread: bool = True,
        on_idle: Callable[[], None] | None = None,
        gather: float = 0.0,
    ):
        self._jobs: queue.Queue = queue.Queue(maxsize=size)
        self.engine = engine
        self._on_idle = on_idle  # called after each job and before the thread waits for one
        # Seconds an idle worker waits, after a generation job arrives, for others to read in the same pass, again
        # after each that comes (10 x at most): clients that send together arrive milliseconds apart, and each later
        # pass costs a layout (a graph capture on GPUs).
        self._gather = float(gather)
        self._thread: threading.Thread | None = None
        self._closed = False
        if own_thread:
            self._thread = threading.Thread(target=self._loop, name="longllama-model", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the jobs on the calling thread until close() (a worker made with own_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this worker runs its jobs on its own thread: make it with own_thread=False")
        self._loop()

    def submit(
        self, fn: Callable[[], Any], cancelled: threading.Event | None = None, *, generation: bool = False
    ) -> concurrent.futures.Future:
        """Queue `fn`; a job whose `cancelled` event is set before it starts is dropped. `generation`: fn adds a
        sequence to the engine (it waits while the engine is full). Raises QueueFull."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._jobs.put_nowait((future, fn, cancelled, generation))
        except queue.Full:
            raise QueueFull from None
        return future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker and wait for it (for start-up and shut-down work; blocks, so not from requests)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, None, False))
        return future.result()

    def close(self) -> None:
        """Drop the queued jobs (their requests get cancelled futures) and end the thread after the running one."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._jobs.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _decoding(self) -> bool:
        return self.engine is not None and self.engine.active > 0

    def _loop(self) -> None:
        held = None  # a generation job waiting for room in the batch
        burst = self.engine.max_rows if self.engine is not None else 1
        while True:
            ran = 0
            until = cap = None  # the end of the wait for jobs to read with the first (see `gather`), its limit
            # The jobs waiting now, up to a batch's worth, before the next step: prompts queued together are read
            # together (BatchGenerator.admit) and the rows are laid out once.
            while ran < burst:
                if held is None:
                    block = ran == 0 and not self._decoding()
                    if block and self._on_idle is not None:
                        self._on_idle()
                    left = None if until is None else until - time.monotonic()
                    try:
                        if left is not None and left > 0:
                            held = self._jobs.get(timeout=left)
                        else:
                            held = self._next(block)
                    except queue.Empty:
                        break
                    if held is None:
                        return
                    if held[3] and self._gather > 0 and (block or until is not None):
                        # each arrival extends the wait by `gather`, up to 10 x gather from the first
                        now = time.monotonic()
                        cap = now + 10 * self._gather if block else cap
                        until = min(now + self._gather, cap)
                if held[3] and self.engine is not None and self.engine.full:
                    break
                self._run(*held[:3])
                held, ran = None, ran + 1
                if self._on_idle is not None:
                    self._on_idle()
            if self._decoding():
                try:
                    self.engine.step()
                except Exception:  # the sequences got the error (on_error); the worker goes on
                    logger.exception("a decoding step failed")

    def _next(self, block: bool):
        """The next job; an idle thread waits in slices of WAIT_SLICE seconds. Python runs a signal's handler on the
        main thread once that thread runs Python again, and a signal the system hands to another of the process's
        threads does not wake it: a `longllama serve` on a GPU machine, idle on its main thread, never saw its
        SIGTERM (the stacks showed it waiting here, the HTTP thread still serving)."""
        while True:
            try:
                return self._jobs.get(block=block, timeout=WAIT_SLICE if block else None)
            except queue.Empty:
                if not block:
                    raise

    @staticmethod
    def _run(future, fn, cancelled) -> None:
        if (cancelled is not None and cancelled.is_set()) or not future.set_running_or_notify_cancel():
            future.cancel()
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the request that queued it
            future.set_exception(exc)


@dataclass
class Generated:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    completion_tokens: int


def start_text(
    engine: BatchGenerator,
    tokenizer,
    ids: Sequence[int],
    *,
    cache: LongLlamaCache | None = None,
    last_context_length: int | None = None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
    seed: int | None,
    cancelled: threading.Event,
    on_text: Callable[[str], None],
    on_done: Callable[[Generated], None],
    on_error: Callable[[BaseException], None],
    ignore_eos: bool = False,
) -> Stream:
    """Read `ids` (after `cache` when given: a document memory's or a read prefix's, left unchanged) into the engine
    on the worker thread and let it decode with the others: text pieces go to `on_text` as they come (stop strings
    and EOS cut off), the result to `on_done`; a cancelled request ends at its next token."""
    streamer = _AnswerText(tokenizer, stop, on_text)
    eos = tokenizer.eos_token_id

    def on_token(token: int) -> bool:
        streamer.add([token])
        return cancelled.is_set() or streamer.stopped()

    def on_end(stream: Stream) -> None:
        streamer.end()
        text, kept = streamer.answer(stream.tokens)
        if cancelled.is_set():
            reason = "cancelled"
        elif stream.finish_reason == "length" and len(kept) == len(stream.tokens):
            reason = "length"
        else:
            reason = "stop"
        on_done(Generated(text=text, finish_reason=reason, completion_tokens=len(stream.tokens)))

    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "seed": seed}
    return engine.add(
        ids,
        cache=cache,
        last_context_length=last_context_length,
        max_new_tokens=max_tokens,
        eos_token_id=None if ignore_eos else eos,
        suppress_tokens=[eos] if ignore_eos else (),
        on_token=on_token,
        on_end=on_end,
        on_error=on_error,
        **sampling,
    )
