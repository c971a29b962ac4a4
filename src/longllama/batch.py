"""Continuous batching: several generations decoded together, each over its own prompt and memory.

`BatchGenerator.add` queues a prompt (after a document memory or a read prefix, when given); the next `step` (or
`admit`) reads every prompt queued since, chooses each one's first token, and the sequences join the rows that
`step` advances by one token each (fast/batch_decode.py), leaving when they end. Sequences join and leave between
any two steps, so a new request never waits for the others to finish. Prompts that fit their row's local window
(a question after a document memory, a short prompt) are read together in one pass through the layers
(`read_together`): one launch of each product for all of them, instead of a whole forward pass each, which is what
a short prompt's reading costs on a GPU (the host's launches, not the arithmetic). Each row decodes what it would
alone: its own local cache and memory, its own sampling settings and random generator; only the order of
floating-point sums differs (the kernels split the work by batch size). On a GPU a step is launched before the
previous step's tokens are handed out (`overlap`): the host's work per token runs while the GPU computes.

Used by `longllama serve`; from Python:

    engine = BatchGenerator(model, max_rows=8)
    a = engine.add(ids_a, cache=memory_a.cache, max_new_tokens=64)
    b = engine.add(ids_b, max_new_tokens=64, do_sample=True, temperature=0.7, seed=1)
    engine.run()  # or call engine.step() yourself between other work (the first reads both prompts)
    a.tokens, a.finish_reason
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longllama.cache import LongLlamaCache
from longllama.errors import InputError
from longllama.fast import sampling
from longllama.fast.batch_decode import BatchDecoder
from longllama.fast.decode import StaticDecoder
from longllama.lm import check_token_range
from longllama.ops import EAGER


@dataclass
class Stream:
    """One generation of a BatchGenerator: its tokens so far and, once it ended, why ("eos", "length" or
    "stopped": its `on_token` asked to stop)."""

    max_new_tokens: int
    eos: frozenset[int]
    do_sample: bool
    on_token: Callable[[int], bool] | None = None
    on_end: Callable[[Stream], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    suppress: tuple[int, ...] = ()  # token ids never chosen (applied to all rows' logits at once, before sampling)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # Sampling's settings, the seed of the row's draws and how many it made (sampling.sample_rows draws the n-th token
    # with a key of (seed, n); the warpers' path draws from a generator seeded with `seed`).
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    draws: int = 0
    _warpers: tuple[LogitsProcessorList, torch.Generator] | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def warpers(self, device: torch.device) -> tuple[LogitsProcessorList, torch.Generator]:
        """transformers' warpers for these settings and a generator on `device` seeded with `seed`, made on first use:
        how a sampled row is drawn where the sampling kernel does not run (CPUs)."""
        if self._warpers is None:
            processors = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
            generator = torch.Generator(device)
            generator.manual_seed(self.seed)
            self._warpers = (processors, generator)
        return self._warpers

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


@dataclass
class _Prompt:
    """A stream's prompt, queued until the next step reads it."""

    stream: Stream
    ids: list[int]
    cache: LongLlamaCache | None  # the caller's, left unchanged
    state: LongLlamaCache  # a fork of it (or a new cache) that the prompt extends
    last_context_length: int | None


@dataclass
class _Launched:
    """A step whose tokens are on their way to the host: the stream of each row it advanced (None where a row was
    retired, or its stream dropped since), their tokens on the device, the host copy and the events that mark where
    its work began and ended on the device (None on a CPU)."""

    rows: list[Stream | None]
    tokens: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None
    layout: int  # the decoder's layout count at launch: while it holds, the row indices do
    began: torch.cuda.Event | None = None


class BatchGenerator:
    """Generations decoded together, at most `max_rows` at a time (see the module docstring). Not thread-safe: one
    thread adds and steps (the server's model worker)."""

    def __init__(
        self,
        model,
        *,
        max_rows: int = 8,
        overlap: bool | None = None,
        compact_after: int | None = None,
        on_wait: Callable[[], None] | None = None,
    ):
        if max_rows < 1:
            raise InputError(f"max_rows={max_rows}: pass at least 1")
        self.model, self.max_rows = model, int(max_rows)
        self.device = model.lm_head.weight.device
        plan = model.plan
        graphs = plan.on_gpu and not model.config.mem_offload
        # A sequence that ends leaves its row in place for up to `compact_after` steps (BatchDecoder.retire) where
        # laying the rows out again would cost a CUDA graph capture; without graphs it leaves at once (0).
        if compact_after is None:
            compact_after = 128 if graphs else 0
        self._decoder = BatchDecoder(model, plan=plan, graphs=graphs, compact_after=int(compact_after))
        # Overlap (GPUs): each step is launched before the previous step's tokens are handed out, so the host's work
        # per token (callbacks, the server's text) runs while the GPU computes. On a CPU the kernels run on the
        # calling thread, so there is nothing to overlap; `overlap=True` there runs the same code (the tests).
        self.overlap = plan.on_gpu if overlap is None else bool(overlap)
        self._queued: list[_Prompt] = []  # added, read at the next step
        self._pending: _Launched | None = None  # the step in flight (overlap): its tokens not yet handed out
        self._suppressed = None  # (each row's suppress tokens, their (rows, cols) index on the device)
        self._drawing = None  # (the sampled rows and their streams, their settings on the device: sampling.sample_rows)
        self.most_active = 0  # the most sequences decoded together so far (the server's /health reports it)
        # Called each step just before the host waits for a step's tokens: with overlap the GPU is busy then, so
        # other Python threads (the server's event loop) can run without taking the interpreter from the launches.
        self.on_wait = on_wait
        self._counts = {
            "steps": 0,
            "step_seconds": 0.0,
            "gpu_seconds": 0.0,
            "prompts": 0,
            "reads": 0,
            "read_seconds": 0.0,
        }

    @property
    def _streams(self) -> list[Stream]:
        """The sequences being decoded, in their rows' order (the decoder's rows are the one record of them)."""
        return [row.owner for row in self._decoder.rows if row.retired is None]

    @property
    def active(self) -> int:
        """Sequences being decoded or waiting for their prompt to be read."""
        return len(self._streams) + len(self._queued)

    @property
    def full(self) -> bool:
        return self.active >= self.max_rows

    def stats(self) -> dict[str, float]:
        """Counters since the engine was made (the server's /health reports them): `steps` taken and the host's
        `step_seconds` in them (reading prompts and, with overlap, waiting for the step before included); on a GPU,
        `gpu_seconds`, the device's time from each step's launch to its tokens' copy (prompts and layouts not
        included; the steps' seconds less this is what the GPU waited for the host); `prompts` read in `reads` passes
        taking `read_seconds`; the decoder's row `layouts` and CUDA graph `captures` with their `capture_seconds`.
        Where the time of a run goes: GPU-bound steps take about the GPU's time each."""
        decoder = self._decoder
        out = dict(self._counts, layouts=decoder.layouts, captures=decoder.captures)
        out["capture_seconds"] = decoder.capture_seconds
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

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
        """Queue `input_ids` to be read (after `cache`, which is left unchanged: a document memory's or a prefix's
        state) at the next step, which chooses its first token; then it is decoded with the others. `on_token(token)`
        is called with each new token and returns True to end the sequence there; `on_end(stream)` once it ended;
        `on_error(exc)` if reading its prompt or a later step fails. Raises InputError when `max_rows` sequences are
        being decoded or queued (check `full`), or for token ids outside the vocabulary."""
        if self.full:
            raise InputError(f"{self.max_rows} sequences are being decoded: wait for one to end (BatchGenerator.full)")
        if not len(input_ids):
            raise InputError("input_ids is empty: pass at least one token to continue from")
        ids = [int(t) for t in input_ids]
        check_token_range(min(ids), max(ids), self.model.config.vocab_size)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: pass at least 1")
        eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
        seed = secrets.randbits(63) if seed is None else int(seed)
        if do_sample and temperature <= 0:
            raise InputError(f"temperature={temperature}: pass a positive temperature, or do_sample=False")
        stream = Stream(
            int(max_new_tokens),
            frozenset(int(t) for t in eos),
            bool(do_sample),
            on_token,
            on_end,
            on_error,
            tuple(int(t) for t in suppress_tokens),
            temperature=float(temperature),
            top_k=int(top_k) if top_k else None,
            top_p=float(top_p),
            seed=seed,
        )
        state = self.model.model.resolve_cache(cache, True)  # a fork (checked now): the caller's cache stays as it was
        self._queued.append(_Prompt(stream, ids, cache, state, last_context_length))
        self.most_active = max(self.most_active, self.active)
        return stream

    def admit(self) -> None:
        """Read the queued prompts and choose each one's first token; those that go on join the decoded rows. Prompts
        that fit their local window are read together (`read_together`), the others one at a time. A prompt whose
        reading fails ends its stream (`on_error`), not the others."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        start = time.perf_counter()
        try:
            self._admit(queued)
        finally:
            self._counts["prompts"] += len(queued)
            self._counts["reads"] += 1
            self._counts["read_seconds"] += time.perf_counter() - start

    def _admit(self, queued: list[_Prompt]) -> None:
        model = self.model
        states = [p.state for p in queued]
        together = [i for i, (p, state) in enumerate(zip(queued, states)) if self._fits(p, state)]
        if len(together) < 2:
            together = []
        logits: dict[int, torch.Tensor] = {}
        if together:
            try:
                with torch.no_grad():
                    rows = read_together(model, [states[i] for i in together], [queued[i].ids for i in together])
                logits.update(zip(together, rows))
            except Exception:  # read them one at a time below, where a failure is that prompt's alone
                states = [model.model.resolve_cache(p.cache, True) if i in together else s for i, (p, s) in
                          enumerate(zip(queued, states))]  # fmt: skip
        unreported = None  # the first failure of a stream without on_error, raised once the others are in
        for i, (prompt, state) in enumerate(zip(queued, states)):
            stream = prompt.stream
            try:
                if i not in logits:
                    logits[i] = self._read(prompt, state)
                stream._push(int(self._choose([stream], logits[i][None])[0]))
                if not stream.finished:
                    self._decoder.add(state, owner=stream)
            except Exception as exc:
                if stream.on_error is not None:
                    stream.on_error(exc)
                elif unreported is None:
                    unreported = exc
        if unreported is not None:
            raise unreported

    def _fits(self, prompt: _Prompt, state: LongLlamaCache) -> bool:
        """Whether `read_together` can read the prompt: it stays in the local window (nothing goes to memory), after
        a cache of one sequence with consecutive positions, unsharded."""
        config, n = self.model.config, len(prompt.ids)
        lcl = config.last_context_length if prompt.last_context_length is None else prompt.last_context_length
        if self.model.plan.memory_shard is not None or n > lcl or state.local_length + n > config.context_window:
            return False
        if any(s.memory is not None and s.memory.rows != 1 for s in state.layers):
            return False
        return state.local_length == 0 or (state.layers[0].keys.shape[0] == 1 and StaticDecoder.usable(state, None))

    def _read(self, prompt: _Prompt, state: LongLlamaCache) -> torch.Tensor:
        """One prompt read alone (any length, windows into memory as the model reads them): its next logits (vocab,)."""
        model = self.model
        ids = torch.tensor([prompt.ids], dtype=torch.long, device=self.device)
        with torch.no_grad():  # positions follow the cache's (from 0 without one)
            out = model.model.run(
                ids,
                cache=state,
                use_cache=True,
                last_context_length=prompt.last_context_length,
                keep_last=1,
                validate=False,
            )
            return model.lm_head(out.hidden[:, -1]).float()[0]

    def step(self) -> list[Stream]:
        """Read the queued prompts (`admit`), then one token for every decoded sequence; returns those that ended
        (with their first token or this one). With `overlap`, the tokens handed out (and the streams ended) are the
        previous step's, while this one runs on the GPU; a stream ended by EOS or its `on_token` has one step
        computed after its end, never handed out. If the step fails, every decoded sequence gets the error
        (`on_error`) and is dropped, and the error is raised."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self._counts["steps"] += 1
            self._counts["step_seconds"] += time.perf_counter() - start

    def _step(self) -> list[Stream]:
        before = list(self._queued)
        self.admit()
        ended = [p.stream for p in before if p.stream.finished]
        pending, self._pending = self._pending, None
        last: list[Stream] = []
        if pending is not None:  # a stream whose token in flight is its last (max_new_tokens) is not stepped again
            flying = {id(s) for s in pending.rows if s is not None}
            last = [s for s in self._streams if id(s) in flying and len(s.tokens) + 1 >= s.max_new_tokens]
            self._leave(last)
        launched = None
        if self._streams:
            try:
                with torch.no_grad():
                    self._decoder.prepare()  # the rows' indices for this step: laid out, retired ones dropped
                    began = self._event()
                    rows = self._rows()
                    logits = self._decoder.step(self._inputs(pending, rows))
                    launched = self._launch(rows, logits, began)
            except BaseException as exc:
                self._fail(exc, last)
                raise
        if self.overlap:
            self._pending = launched
        else:
            pending = launched
        if pending is not None:
            try:
                tokens = self._landed(pending)
            except BaseException as exc:
                self._fail(exc, last)
                raise
            for stream, token in zip(pending.rows, tokens):
                if stream is not None and not stream.finished:
                    stream._push(token)
        ended += self.drop([s for s in self._streams if s.finished]) + last
        if not self._streams:
            self._pending = None  # nothing in flight is still wanted
            if self._decoder.rows:
                self._decoder.remove([])  # retired rows: their buffers are freed
        return ended

    def _rows(self) -> list[Stream | None]:
        """The stream of each row of the decoder (None where a retired row is still computed)."""
        return [None if row.retired is not None else row.owner for row in self._decoder.rows]

    def _inputs(self, pending: _Launched | None, rows: list[Stream | None]) -> torch.Tensor:
        """Each row's last token (rows,) on the device: a step in flight whose rows were not laid out again since
        gives its tokens as they are (no copy, no wait); otherwise the rows in flight get theirs from the device
        and the others (joined since, or all of them without overlap) from the host."""
        if pending is not None and pending.layout == self._decoder.layouts:
            return pending.tokens
        host = [0 if s is None else s.tokens[-1] for s in rows]  # a row in flight gets its token below
        at = {} if pending is None else {id(s): i for i, s in enumerate(pending.rows) if s is not None}
        pairs = [(j, at[id(s)]) for j, s in enumerate(rows) if s is not None and id(s) in at]
        inputs = self._to_device(torch.tensor(host, dtype=torch.long))
        if pairs:
            dst, src = self._to_device(torch.tensor(pairs, dtype=torch.long).T)
            inputs[dst] = pending.tokens[src]
        return inputs

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device, without waiting for the device's queued work (pinned, asynchronous)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _event(self) -> torch.cuda.Event | None:
        """A timing event recorded now on the current stream (None on a CPU)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _launch(self, rows: list[Stream | None], logits: torch.Tensor, began: torch.cuda.Event | None) -> _Launched:
        """Choose the rows' next tokens on the device and start their copy to the host."""
        tokens = self._choose(rows, logits)
        layout = self._decoder.layouts
        if tokens.device.type != "cuda":
            return _Launched(rows, tokens, tokens, None, layout)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        return _Launched(rows, tokens, host, self._event(), layout, began)

    def _landed(self, launched: _Launched) -> list[int]:
        if self.on_wait is not None:
            self.on_wait()
        if launched.done is not None:
            launched.done.synchronize()  # releases the interpreter while it waits
            if launched.began is not None:
                self._counts["gpu_seconds"] += launched.began.elapsed_time(launched.done) / 1e3
        return launched.host.tolist()

    def _fail(self, exc: BaseException, last: Sequence[Stream]) -> None:
        """A failed step: every decoded sequence (and those taken out for their last token) gets the error."""
        streams, self._pending = [*self._streams, *last], None
        if self._decoder.rows:
            self._decoder.remove(list(range(len(self._decoder.rows))))
        for s in streams:
            if s.on_error is not None:
                s.on_error(exc)

    def _leave(self, streams: Sequence[Stream]) -> None:
        """Take `streams` out of the decoded rows (retired in place where compact_after allows) and out of the
        step in flight."""
        if self._pending is not None:
            self._pending.rows = [None if any(s is t for t in streams) else s for s in self._pending.rows]
        gone = [i for i, row in enumerate(self._decoder.rows) if any(row.owner is t for t in streams)]
        if gone:
            if self._decoder.compact_after > 0:
                self._decoder.retire(gone)
            else:
                self._decoder.remove(gone)

    def drop(self, streams: Sequence[Stream]) -> list[Stream]:
        """Stop decoding `streams` (ended ones, or any the caller no longer wants; queued ones are not read); returns
        them."""
        self._queued = [p for p in self._queued if not any(p.stream is t for t in streams)]
        self._leave(streams)
        return list(streams)

    def run(self) -> None:
        """Step until every sequence has ended."""
        while self._streams or self._queued:
            self.step()

    def _choose(self, streams: Sequence[Stream | None], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (rows,) on the logits' device, with no wait for the device: greedy rows (and
        retired ones, None) by one argmax, the sampled ones in one kernel launch for all (sampling.sample_rows, each
        row with its own settings and seed; GPUs, or the interpreter where the plan says so), else each through its
        warpers and generator (Stream.warpers). Suppressed tokens are masked for all rows in one write (a processor
        per row cost each row its own kernels at every step)."""
        key = tuple(() if stream is None else stream.suppress for stream in streams)
        if any(key):
            if self._suppressed is None or self._suppressed[0] != key:  # built when the rows change, not each step
                pairs = [(i, t) for i, tokens in enumerate(key) for t in tokens]
                self._suppressed = (key, self._to_device(torch.tensor(pairs, dtype=torch.long).T))
            rows, cols = self._suppressed[1]
            logits[rows, cols] = -float("inf")
        tokens = logits.argmax(dim=-1)
        drawn = [i for i, stream in enumerate(streams) if stream is not None and stream.do_sample]
        if drawn and sampling.applies(logits, cpu=self.model.plan.interpret_kernels):
            self._draw(streams, drawn, logits, tokens)
            return tokens
        for i in drawn:
            processors, generator = streams[i].warpers(logits.device)
            probs = torch.softmax(processors(None, logits[i : i + 1]), dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=generator)[0, 0]
        return tokens

    def _draw(
        self, streams: Sequence[Stream | None], drawn: list[int], logits: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """The sampled rows `drawn` of logits into `tokens`, in one launch: each row's settings (on the device while
        the rows stay the same) and the key of its next draw."""
        key = tuple((i, id(streams[i])) for i in drawn)
        if self._drawing is None or self._drawing[0] != key:
            chosen = [streams[i] for i in drawn]  # kept with the key: their ids stay theirs while it is cached
            vocab = logits.shape[1]
            settings = (
                self._to_device(torch.tensor(drawn, dtype=torch.long)),
                self._to_device(torch.tensor([s.temperature for s in chosen], dtype=torch.float32)),
                self._to_device(torch.tensor([min(s.top_k or vocab, vocab) for s in chosen], dtype=torch.int32)),
                self._to_device(torch.tensor([s.top_p for s in chosen], dtype=torch.float32)),
            )
            uses = {"uses_top_k": any(s.top_k and s.top_k < vocab for s in chosen),
                    "uses_top_p": any(s.top_p < 1.0 for s in chosen)}  # fmt: skip
            self._drawing = (key, chosen, settings, uses)
        _, chosen, settings, uses = self._drawing
        keys = []
        for stream in chosen:
            keys.append(_draw_key(stream.seed, stream.draws))
            stream.draws += 1
        seeds = self._to_device(torch.tensor(keys, dtype=torch.long))
        sampling.sample_rows(logits, settings[0], *settings[1:], seeds, tokens, **uses)


def _draw_key(seed: int, draw: int) -> int:
    """The key of a stream's draw-th sampled token (63 bits): splitmix64 of the seed and the draw, so that keys of
    nearby seeds and draws share nothing."""
    z = (seed + (draw + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


_MASK64 = (1 << 64) - 1


def read_together(model, caches: Sequence[LongLlamaCache], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Read prompts[i] after caches[i] (each the cache of one sequence, extended in place: its local cache grows by
    the prompt) in one pass through the layers; returns each row's next-token logits (rows, vocab) in fp32.

    The same maths as reading each prompt alone (model.run) when every local cache plus its prompt fits the window,
    so nothing goes to memory (BatchGenerator._fits): the rows are laid out right-aligned, row i's local keys then
    its prompt's, with each row's own RoPE positions (relative to its oldest local token) and a mask that keeps every
    query to its own row's keys, causally. Products, norms and the local layers' attention run once for all rows;
    a memory layer attends row by row, each over its own memory (Attention.attend: the plan's choice, as alone)."""
    inner, plan = model.model, model.plan
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    rows = len(prompts)
    counts = [cache.local_length for cache in caches]
    lengths = [len(ids) for ids in prompts]
    n = max(lengths)
    span = max(c + t for c, t in zip(counts, lengths))
    ids = torch.zeros(rows, n, dtype=torch.long)
    for i, prompt in enumerate(prompts):  # shorter prompts padded on the left: their padding queries are dropped
        ids[i, n - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    starts = [span - c - t for c, t in zip(counts, lengths)]  # each row's first key slot
    first = torch.tensor(starts, device=device)
    slots = torch.arange(span, device=device)
    cos, sin = inner.rope.gather((slots[None] - first[:, None]).clamp_min(0), dtype, span)  # (rows, 1, span, d)
    query_slots = slots[span - n :]
    own = slots[None, None] >= first[:, None, None]  # (rows, 1, span): the row's keys
    causal = slots[None, None] <= query_slots[None, :, None]  # (1, n, span)
    padding = torch.arange(n, device=device)[None, :] < torch.tensor([n - t for t in lengths], device=device)[:, None]
    visible = (own & (causal | padding[:, :, None]))[:, None]  # (rows, 1, n, span); padding queries see all their row
    positions = [  # each row's new positions continue its cache's
        torch.arange(t, device=device) + (cache.layers[0].positions[0, -1] + 1 if c else 0)
        for cache, c, t in zip(caches, counts, lengths)
    ]
    h = inner.embed_tokens(ids.to(device))
    for layer, *states in zip(inner.layers, *(cache.layers for cache in caches)):
        attn = layer.self_attn
        x = layer.input_layernorm(h, EAGER)
        q = attn._split(attn.q_proj(x), attn.num_heads)
        k_new = attn._split(attn.k_proj(x), attn.num_kv_heads)
        v_new = attn._split(attn.v_proj(x), attn.num_kv_heads)
        keys = k_new.new_zeros(rows, attn.num_kv_heads, span, attn.head_dim)
        values = torch.zeros_like(keys)
        keys[:, :, span - n :], values[:, :, span - n :] = k_new, v_new
        for i, (state, c) in enumerate(zip(states, counts)):
            if c:  # the row's local cache before its prompt (over the padding keys of a shorter prompt)
                lo = span - c - lengths[i]
                keys[i, :, lo : lo + c], values[i, :, lo : lo + c] = state.keys[0], state.values[0]
        q_rot, k_rot = q, keys
        if attn.rotates:
            q_rot = EAGER.rotate(q, cos[:, :, span - n :], sin[:, :, span - n :])
            k_rot = EAGER.rotate(keys, cos, sin)
        if attn.is_memory_layer:
            out = q_rot.new_zeros(rows, attn.num_heads, n, attn.head_dim)
            for i, (state, t) in enumerate(zip(states, lengths)):
                # Each row over its own memory, its own queries only (block retrieval groups queries from the first)
                lo = starts[i]
                out[i : i + 1, :, n - t :] = attn.attend(
                    q_rot[i : i + 1, :, n - t :],
                    k_rot[i : i + 1, :, lo:],
                    values[i : i + 1, :, lo:],
                    visible=visible[i : i + 1, :, n - t :, lo:],
                    memory=state.memory,
                    plan=plan,
                    pad=EAGER.pad_to,
                )[0]
        else:
            out = attn.attend(q_rot, k_rot, values, visible=visible, memory=None, plan=plan, pad=EAGER.pad_to)[0]
        for i, (state, c, t) in enumerate(zip(states, counts, lengths)):
            lo = span - c - t
            past = state.positions if c else positions[i][:0][None]
            new = torch.cat([past, positions[i][None]], dim=1)
            state.set_local(keys[i : i + 1, :, lo:], values[i : i + 1, :, lo:], new)
        a = attn._output(out)
        post = layer.post_attention_layernorm
        h, normed = EAGER.add_rms_norm(h, a, post.weight, post.variance_epsilon)
        h = layer.mlp(normed, EAGER, residual=h)
    return model.lm_head(inner.norm(h[:, -1:], EAGER)[:, 0]).float()
