"""The model worker: one thread runs every piece of model work (tokenizing, reading memories, generating), taken
from a bounded queue. Neither the model nor DocumentMemory's copy-on-write bookkeeping is thread-safe, so nothing
else touches them; the web server only queues jobs and reads their results."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from longllama.cache import LongLlamaCache
from longllama.document_memory import _AnswerText

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue holds as many jobs as it may: the request is refused (429), not kept waiting."""


class ModelWorker:
    """One thread, one bounded queue of jobs; `submit(fn)` returns a Future of `fn()` run on that thread."""

    def __init__(self, size: int):
        self._jobs: queue.Queue = queue.Queue(maxsize=size)
        self._thread = threading.Thread(target=self._loop, name="longllama-model", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], cancelled: threading.Event | None = None) -> concurrent.futures.Future:
        """Queue `fn`; a job whose `cancelled` event is set before it starts is dropped. Raises QueueFull."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._jobs.put_nowait((future, fn, cancelled))
        except queue.Full:
            raise QueueFull from None
        return future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker and wait for it (for start-up and shut-down work; blocks, so not from requests)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, None))
        return future.result()

    def close(self) -> None:
        """Drop the queued jobs (their requests get cancelled futures) and end the thread after the running one."""
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, fn, cancelled = item
            if (cancelled is not None and cancelled.is_set()) or not future.set_running_or_notify_cancel():
                future.cancel()
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the request that queued it
                future.set_exception(exc)


class _Cancelled(StoppingCriteria):
    """Ends generation at the next token once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Generated:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    completion_tokens: int


def generate_text(
    model,
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
    ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> Generated:
    """Continue `ids` (after `cache` when given: a document memory's or a read prefix's, left unchanged) on the
    worker thread; text pieces go to `on_text` as they come, stop strings and EOS cut off."""
    device = model.lm_head.weight.device
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    # Each request draws from its own seed: a seeded request before it does not make this one repeat.
    torch.manual_seed(seed if seed is not None else secrets.randbits(63))
    settings: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        settings = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    if ignore_eos:
        settings["suppress_tokens"] = [tokenizer.eos_token_id]
    criteria = StoppingCriteriaList([_Cancelled(cancelled)])
    if stop:
        criteria.append(StopStringCriteria(tokenizer, list(stop)))
    streamer = _AnswerText(tokenizer, stop, on_text)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            cache=cache,
            attention_mask=None if cache is not None else torch.ones_like(input_ids),
            streamer=streamer,
            stopping_criteria=criteria,
            return_dict_in_generate=True,
            last_context_length=last_context_length,
            max_new_tokens=max_tokens,
            eos_token_id=tokenizer.eos_token_id,
            **settings,
        )
    generated = [int(t) for t in out.sequences[0, len(ids) :].tolist()]
    text, kept = streamer.answer(generated)
    if cancelled.is_set():
        reason = "cancelled"
    elif tokenizer.eos_token_id in generated or len(kept) < len(generated) or len(generated) < max_tokens:
        reason = "stop"
    else:
        reason = "length"
    return Generated(text=text, finish_reason=reason, completion_tokens=len(generated))
