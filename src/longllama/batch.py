"""Continuous batching: several generations decoded together, each over its own prompt and memory.

`BatchGenerator.add` reads a prompt (after a document memory or a read prefix, when given) and chooses its first
token at once; the sequence then joins the rows that `step` advances by one token each (fast/batch_decode.py), and
leaves when it ends. Sequences join and leave between any two steps, so a new request never waits for the others to
finish. Each row decodes what it would alone: its own local cache and memory, its own sampling settings and random
generator; only the order of floating-point sums differs (the kernels split the work by batch size).

Used by `longllama serve`; from Python:

    engine = BatchGenerator(model, max_rows=8)
    a = engine.add(ids_a, cache=memory_a.cache, max_new_tokens=64)
    b = engine.add(ids_b, max_new_tokens=64, do_sample=True, temperature=0.7, seed=1)
    engine.run()  # or call engine.step() yourself between other work
    a.tokens, a.finish_reason
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longllama.cache import LongLlamaCache
from longllama.errors import InputError
from longllama.fast.batch_decode import BatchDecoder


@dataclass
class Stream:
    """One generation of a BatchGenerator: its tokens so far and, once it ended, why ("eos", "length" or
    "stopped": its `on_token` asked to stop)."""

    max_new_tokens: int
    eos: frozenset[int]
    processors: LogitsProcessorList
    do_sample: bool
    generator: torch.Generator | None
    on_token: Callable[[int], bool] | None = None
    on_end: Callable[[Stream], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        stop = self.on_token(token) if self.on_token is not None else False
        if token in self.eos:
            self.finish_reason = "eos"
        elif stop:
            self.finish_reason = "stopped"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.finished and self.on_end is not None:
            self.on_end(self)


class BatchGenerator:
    """Generations decoded together, at most `max_rows` at a time (see the module docstring). Not thread-safe: one
    thread adds and steps (the server's model worker)."""

    def __init__(self, model, *, max_rows: int = 8):
        if max_rows < 1:
            raise InputError(f"max_rows={max_rows}: pass at least 1")
        self.model, self.max_rows = model, int(max_rows)
        self.device = model.lm_head.weight.device
        plan = model.plan
        self._decoder = BatchDecoder(model, plan=plan, graphs=plan.on_gpu and not model.config.mem_offload)
        self._streams: list[Stream] = []
        self.most_active = 0  # the most sequences decoded together so far (the server's /health reports it)

    @property
    def active(self) -> int:
        """Sequences being decoded."""
        return len(self._streams)

    @property
    def full(self) -> bool:
        return len(self._streams) >= self.max_rows

    def add(
        self,
        input_ids: Sequence[int],
        *,
        cache: LongLlamaCache | None = None,
        last_context_length: int | None = None,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        suppress_tokens: Sequence[int] = (),
        on_token: Callable[[int], bool] | None = None,
        on_end: Callable[[Stream], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> Stream:
        """Read `input_ids` (after `cache`, which is left unchanged: a document memory's or a prefix's state) and
        start decoding it. `on_token(token)` is called with each new token and returns True to end the sequence
        there; `on_end(stream)` once it ended; `on_error(exc)` if a later step fails. Raises InputError when
        `max_rows` sequences are being decoded (check `full`)."""
        if self.full:
            raise InputError(f"{self.max_rows} sequences are being decoded: wait for one to end (BatchGenerator.full)")
        if not len(input_ids):
            raise InputError("input_ids is empty: pass at least one token to continue from")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: pass at least 1")
        eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
        processors = LogitsProcessorList()
        if suppress_tokens:
            processors.append(SuppressTokensLogitsProcessor(list(suppress_tokens), device=self.device))
        generator = None
        if do_sample:
            if temperature <= 0:
                raise InputError(f"temperature={temperature}: pass a positive temperature, or do_sample=False")
            processors.append(TemperatureLogitsWarper(float(temperature)))
            if top_k:
                processors.append(TopKLogitsWarper(int(top_k)))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(float(top_p)))
            generator = torch.Generator(self.device)
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        stream = Stream(
            int(max_new_tokens),
            frozenset(int(t) for t in eos),
            processors,
            bool(do_sample),
            generator,
            on_token,
            on_end,
            on_error,
        )
        model = self.model
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        state = model.model.resolve_cache(cache, True)  # a fork: the caller's cache stays as it was
        with torch.no_grad():  # positions follow the cache's (from 0 without one)
            out = model.model.run(
                ids,
                cache=state,
                use_cache=True,
                last_context_length=last_context_length,
                keep_last=1,
            )
            logits = model.lm_head(out.hidden[:, -1]).float()
        stream._push(self._choose([stream], logits)[0])
        if not stream.finished:
            self._decoder.add(state)
            self._streams.append(stream)
            self.most_active = max(self.most_active, len(self._streams))
        return stream

    def step(self) -> list[Stream]:
        """One token for every active sequence; returns those that ended with it. If the step fails, every active
        sequence gets the error (`on_error`) and is dropped, and the error is raised."""
        if not self._streams:
            return []
        last = torch.tensor([s.tokens[-1] for s in self._streams], dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                logits = self._decoder.step(last)
        except BaseException as exc:
            streams, self._streams = self._streams, []
            self._decoder.remove(list(range(len(streams))))
            for s in streams:
                if s.on_error is not None:
                    s.on_error(exc)
            raise
        for stream, token in zip(self._streams, self._choose(self._streams, logits)):
            stream._push(token)
        return self.drop([s for s in self._streams if s.finished])

    def drop(self, streams: Sequence[Stream]) -> list[Stream]:
        """Stop decoding `streams` (ended ones, or any the caller no longer wants); returns them."""
        gone = [i for i, s in enumerate(self._streams) if any(s is t for t in streams)]
        if gone:
            self._decoder.remove(gone)
            self._streams = [s for i, s in enumerate(self._streams) if i not in gone]
        return list(streams)

    def run(self) -> None:
        """Step until every sequence has ended."""
        while self._streams:
            self.step()

    def _choose(self, streams: Sequence[Stream], logits: torch.Tensor) -> list[int]:
        """Each row's next token: greedy rows by one argmax, the others through their processors and generator."""
        tokens = logits.argmax(dim=-1)
        for i, stream in enumerate(streams):
            if not stream.processors:
                continue
            scores = stream.processors(None, logits[i : i + 1])
            if stream.do_sample:
                probs = torch.softmax(scores, dim=-1)
                tokens[i] = torch.multinomial(probs, 1, generator=stream.generator)[0, 0]
            else:
                tokens[i] = scores.argmax(dim=-1)[0]
        return [int(t) for t in tokens.tolist()]
