"""Continuous batching (batch.py, fast/batch_decode.py): each row of a batch decodes what it would alone."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_tiny

from longllama import batch
from longllama.batch import BatchGenerator
from longllama.errors import InputError
from longllama.fast import decode_attention, kernels

# fp32 maths through other kernels and batch sizes (summation order): logits differ by ~1e-6.
FP32_TOL = 1e-4


def _alone(model, ids, cache=None, **kwargs):
    """Greedy tokens and per-step logits of one sequence through model.generate (the reference)."""
    out = model.generate(
        torch.tensor([ids]),
        cache=cache,
        attention_mask=None if cache is not None else torch.ones(1, len(ids), dtype=torch.long),
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits)


def _memory_of(model, ids):
    """The cache after reading `ids` (a document: whole windows to memory)."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=True, last_context_length=model.config.context_window).cache


class _Logits:
    """Records every row's logits per step by wrapping the engine's choice."""

    def __init__(self, engine):
        self.rows: dict[int, list[torch.Tensor]] = {}
        real = engine._choose

        def choose(streams, logits):
            for stream, row in zip(streams, logits):
                self.rows.setdefault(id(stream), []).append(row.clone())
            return real(streams, logits)

        engine._choose = choose

    def of(self, stream) -> torch.Tensor:
        return torch.stack(self.rows[id(stream)])


def _check_rows(model, requests, *, max_rows=8, steps_between=0, interpret=False, overlap=False, compact_after=0):
    """Each request (ids, cache or None, max_new_tokens) decoded in one batch (joining `steps_between` steps apart)
    gives the tokens and logits it gives alone."""
    torch.manual_seed(0)
    alone = [_alone(model, ids, cache, max_new_tokens=n, last_context_length=24) for ids, cache, n in requests]
    if interpret:
        model.set_plan(interpret_kernels=True, decode_kernels=True)
    engine = BatchGenerator(model, max_rows=max_rows, overlap=overlap, compact_after=compact_after)
    logits = _Logits(engine)
    streams = []
    with torch.no_grad():
        for ids, cache, n in requests:
            streams.append(engine.add(ids, cache=cache, max_new_tokens=n, last_context_length=24))
            for _ in range(steps_between):
                engine.step()
        engine.run()
    for (tokens, want), stream in zip(alone, streams):
        got = logits.of(stream)
        assert got.shape == want.shape
        assert (got - want).abs().max() < FP32_TOL
        assert stream.tokens == tokens and stream.finish_reason == "length"


@pytest.mark.parametrize(
    "overrides, overlap, compact_after",
    [
        ({}, False, 0),
        ({}, True, 0),
        ({}, True, 6),
        (dict(num_key_value_heads=2), False, 0),
        (dict(mem_positionals=False), False, 0),
    ],
)
def test_rows_with_their_own_memories_decode_as_alone(overrides, overlap, compact_after):
    """Rows join a few steps apart and leave at their own lengths; with `overlap` each step is launched before the
    previous one's tokens are handed out (a GPU's default), and a row's token in flight feeds its next step; with
    `compact_after` a row that ended stays in the batch, retired, until a layout drops it (a GPU's default)."""
    model = sharp_tiny(**overrides)
    g = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, 320, (200,), generator=g).tolist()
    doc_b = torch.randint(3, 320, (330,), generator=g).tolist()
    mem_a, mem_b = _memory_of(model, doc_a), _memory_of(model, doc_b)
    assert mem_a.memory_length != mem_b.memory_length
    requests = [
        (torch.randint(3, 320, (5,), generator=g).tolist(), mem_a, 90),  # 90 new tokens: past a 64-token window
        (torch.randint(3, 320, (17,), generator=g).tolist(), mem_b, 70),
        (torch.randint(3, 320, (150,), generator=g).tolist(), None, 40),  # a fresh prompt, no document
        (torch.randint(3, 320, (9,), generator=g).tolist(), mem_a, 25),  # the same document as the first
    ]
    _check_rows(model, requests, steps_between=3, overlap=overlap, compact_after=compact_after)
    # the documents' memories are unchanged by the rows' appends (copy on write)
    assert mem_a.memory_length == _memory_of(model, doc_a).memory_length


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_key_value_heads=2),
        dict(mem_positionals=False),
        dict(mem_dtype="int8"),
        dict(mem_top_k=8),
        dict(mem_retrieval="blocks", mem_blocks=2, mem_block_size=8),
    ],
)
def test_prompts_read_together_give_what_they_give_alone(overrides):
    """Prompts queued together are read in one pass (read_together) after their own documents (local caches and
    memories of different lengths) or none, prompts of different lengths; each row's logits and tokens are those it
    gets alone. A prompt longer than the final window is read alone in the same admission."""
    model = sharp_tiny(**overrides)
    g = torch.Generator().manual_seed(4)

    def document(n, local):  # `local` tokens stay in the local cache, the rest go to memory
        ids = torch.randint(3, 320, (n,), generator=g).tolist()
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=True, last_context_length=local).cache

    mem_a, mem_b, mem_c = document(200, 24), document(333, 10), document(41, 40)
    assert (mem_a.local_length, mem_b.local_length, mem_c.local_length) == (24, 10, 40)
    requests = [
        (torch.randint(3, 320, (5,), generator=g).tolist(), mem_a, 40),  # past the 64-token window while decoding
        (torch.randint(3, 320, (17,), generator=g).tolist(), mem_b, 20),
        (torch.randint(3, 320, (1,), generator=g).tolist(), mem_a, 12),  # the same document, a one-token prompt
        (torch.randint(3, 320, (20,), generator=g).tolist(), None, 15),  # no document
        (torch.randint(3, 320, (9,), generator=g).tolist(), mem_c, 10),
        (torch.randint(3, 320, (30,), generator=g).tolist(), mem_b, 10),  # longer than the final window: alone
    ]
    together = []
    real = batch.read_together
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch, "read_together", lambda m, c, p: together.append(len(p)) or real(m, c, p))
        _check_rows(model, requests)
    assert together == [5]


def test_rows_decode_as_alone_with_the_kernels():
    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    model = sharp_tiny(attn_impl="fast")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # 56 tokens stay local: with the 4-token prompt, the 64-token window fills at step 4
        mem = model(torch.randint(3, 320, (200,), generator=g)[None], use_cache=True, last_context_length=56).cache
    calls = []
    real = decode_attention.attend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_attention, "attend", lambda *a, **k: calls.append(k) or real(*a, **k))
        requests = [
            (torch.randint(3, 320, (4,), generator=g).tolist(), mem, 14),  # past the window into memory
            (torch.randint(3, 320, (30,), generator=g).tolist(), None, 10),
        ]
        _check_rows(model, requests, interpret=True, steps_between=2)
    assert any(k.get("row_memories") for k in calls)  # the kernels read the rows' memories
    assert any(k.get("row_table") is not None for k in calls)  # in one launch


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("kernel", [False, True])
def test_sampling_rows_follow_their_own_seed(overlap, kernel, request):
    """A sampled row draws what it draws alone, beside other sampled rows: through its own generator, or (the
    kernel, as on GPUs) with its own keys in one launch for all rows."""
    from longllama.fast import sampling

    model = sharp_tiny()
    if kernel:
        request.getfixturevalue("interpreter")
        model.set_plan(interpret_kernels=True, decode_kernels=False)  # the sampling kernel, not the decoding ones
    launches = []
    real = sampling.sample_rows
    request.getfixturevalue("monkeypatch").setattr(
        sampling,
        "sample_rows",
        lambda logits, rows, *a, **k: launches.append(rows.numel()) or real(logits, rows, *a, **k),
    )
    ids = torch.randint(3, 320, (12,)).tolist()
    settings = dict(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7)

    def sampled(partners: int) -> list[int]:
        engine = BatchGenerator(model, overlap=overlap)
        with torch.no_grad():
            for k in range(partners):
                engine.add(ids[k:], max_new_tokens=20, do_sample=True, temperature=1.0)
            stream = engine.add(ids, **settings)
            engine.run()
        return stream.tokens

    alone = sampled(0)
    assert sampled(3) == alone  # other rows draw from their own generators
    assert len(set(alone)) > 3
    settings["seed"] = 8
    assert sampled(0) != alone
    assert (max(launches) == 4) if kernel else not launches  # the kernel: all four sampled rows in one launch


@pytest.mark.parametrize("overlap", [False, True])
def test_streams_end_at_eos_callbacks_and_capacity(overlap):
    """EOS, a callback's stop and max_new_tokens end each stream where it would end alone; with `overlap` the step
    computed after an EOS or a stop is never handed out (no token, no callback after the end)."""
    model = sharp_tiny()
    ids = torch.randint(3, 320, (12,)).tolist()
    tokens, _ = _alone(model, ids, max_new_tokens=10)
    end = next(k for k in range(2, 10) if tokens[k] not in tokens[:k])  # a token first seen at step `end`
    engine = BatchGenerator(model, max_rows=2, overlap=overlap)
    ended, seen = [], []
    with torch.no_grad():
        eos = engine.add(ids, max_new_tokens=10, eos_token_id=tokens[end], on_end=ended.append)
        stopped = engine.add(ids, max_new_tokens=10, on_token=lambda t: seen.append(t) or len(seen) == 3)
        assert engine.full
        with pytest.raises(InputError, match="wait for one to end"):
            engine.add(ids, max_new_tokens=3)
        engine.run()
    assert eos.tokens == tokens[: end + 1] and eos.finish_reason == "eos" and ended == [eos]
    assert stopped.tokens == tokens[:3] and stopped.finish_reason == "stopped" and seen == tokens[:3]
    assert engine.active == 0 and engine._pending is None
    with pytest.raises(InputError, match="max_new_tokens=0"):
        engine.add(ids, max_new_tokens=0)


def test_the_batch_decoders_capture_label_reads_every_rows_memory():
    """A CUDA graph capture is logged with the longest memory (timings); the batch keeps one memory per row."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(3)
    short, long = (_memory_of(model, torch.randint(3, 320, (n,), generator=g).tolist()) for n in (140, 330))
    engine = BatchGenerator(model)
    with torch.no_grad():
        for cache in (short, long):
            engine.add(torch.randint(3, 320, (5,), generator=g).tolist(), cache=cache, max_new_tokens=4)
        engine.admit()
    decoder = engine._decoder
    lengths = [max(m.length for m in row.memories if m is not None) for row in decoder.rows]
    assert lengths[1] > lengths[0] and decoder._memory_length() == lengths[1]


def test_quantized_weights_decode_in_a_batch_as_alone():
    """int8 weights (torchao's tensors) go through their own products in a batch too, never to the bf16 kernel."""
    pytest.importorskip("torchao")
    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.quantize import quantize_model

    model = sharp_tiny(attn_impl="fast")
    quantize_model(model, "int8")
    g = torch.Generator().manual_seed(4)
    requests = [(torch.randint(3, 320, (n,), generator=g).tolist(), None, 12) for n in (7, 30)]
    _check_rows(model, requests, interpret=True, steps_between=2)


def test_a_failed_joint_reading_falls_back_to_each_prompt_alone():
    """If reading the prompts together fails (say, out of memory), each prompt is read alone, as if never tried."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        doc = model(torch.randint(3, 320, (150,), generator=g)[None], use_cache=True, last_context_length=20).cache
    requests = [(torch.randint(3, 320, (n,), generator=g).tolist(), doc, 8) for n in (3, 11)]

    def fails(*args):
        for cache in args[1]:  # part of the work done: the caches' local parts already extended
            cache.layers[0].set_local(None, None, None)
        raise torch.OutOfMemoryError("pretend")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch, "read_together", fails)
        _check_rows(model, requests)


def test_add_refuses_token_ids_outside_the_vocabulary_at_once():
    engine = BatchGenerator(sharp_tiny())
    with pytest.raises(InputError, match="token id 320 is outside the vocabulary"):
        engine.add([5, 320], max_new_tokens=2)
    assert engine.active == 0


def test_suppressed_tokens_are_never_chosen_and_rows_keep_their_own():
    """suppress_tokens (the server's ignore_eos) masks a row's logits as generate's processor does; rows without it
    in the same batch are unaffected."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 320, (12,), generator=g).tolist()
    free, _ = _alone(model, ids, max_new_tokens=10)
    banned = sorted(set(free[:4]))
    want, _ = _alone(model, ids, max_new_tokens=10, suppress_tokens=banned)
    engine = BatchGenerator(model)
    with torch.no_grad():
        plain = engine.add(ids, max_new_tokens=10)
        masked = engine.add(ids, max_new_tokens=10, suppress_tokens=banned)
        sampled = engine.add(ids, max_new_tokens=30, suppress_tokens=banned, do_sample=True, temperature=2.0, seed=3)
        engine.run()
    assert plain.tokens == free and masked.tokens == want and want != free
    assert not set(sampled.tokens) & set(banned) and not set(masked.tokens) & set(banned)


def test_a_stream_dropped_while_its_step_is_in_flight_gets_nothing_more():
    """With overlap, dropping a stream (a client that left) between two steps discards its token in flight; the
    other rows go on as alone, fed their own tokens in flight across the row change."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 14, 6)]
    want = [_alone(model, x, max_new_tokens=12)[0] for x in ids]
    engine = BatchGenerator(model, overlap=True)
    got: list[int] = []
    with torch.no_grad():
        streams = [engine.add(x, max_new_tokens=12) for x in ids[:2]]
        streams[1].on_token = got.append
        for _ in range(4):
            engine.step()
        assert engine._pending is not None and len(streams[1].tokens) == 4  # the first token, then 3 handed out
        engine.drop([streams[1]])
        streams.append(engine.add(ids[2], max_new_tokens=12))  # a row joins while the first one's step is in flight
        engine.run()
    assert streams[0].tokens == want[0] and streams[2].tokens == want[2]
    assert streams[1].tokens == got == want[1][:4] and not streams[1].finished


def test_ended_rows_retire_in_place_until_a_layout_drops_them():
    """With compact_after, a row whose sequence ended is not laid out away at once (on a GPU that would be a new
    CUDA graph): it stays, retired, until a row joins, until it would flush its window into memory, or for
    compact_after steps; the others' tokens are those they get alone, and retired rows never yield a token."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(8)
    ids = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    lengths = (3, 40, 5, 20)
    want = [_alone(model, x, max_new_tokens=n)[0] for x, n in zip(ids, lengths)]
    engine = BatchGenerator(model, overlap=True, compact_after=10)
    decoder = engine._decoder
    with torch.no_grad():
        streams = [engine.add(x, max_new_tokens=n) for x, n in zip(ids[:3], lengths)]
        engine.step()  # read together, laid out with the first step
        layouts = decoder.layouts
        while not streams[2].finished:
            engine.step()
        assert streams[0].finished and len(decoder.rows) == 3 and decoder.layouts == layouts  # retired in place
        assert sum(row.retired is not None for row in decoder.rows) == 2 and engine.active == 1
        streams.append(engine.add(ids[3], max_new_tokens=lengths[3]))  # a join lays out and drops them
        engine.step()
        assert decoder.layouts == layouts + 1 and len(decoder.rows) == 2
        while not streams[3].finished:
            engine.step()
        assert len(decoder.rows) == 2 and decoder.rows[1].retired is not None
        for _ in range(10):  # retired for compact_after steps: dropped
            engine.step()
        assert len(decoder.rows) == 1
        engine.run()
    assert [s.tokens for s in streams] == want
    assert not decoder.rows  # the last one to end freed the buffers


def test_a_retired_row_is_dropped_before_it_would_flush_its_window():
    """A retired row's window is never flushed into memory (work for nothing, and a new graph): the rows are laid
    out without it first; the row still decoding passes its own window as alone."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(9)
    ids = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (30, 8)]
    want = [_alone(model, x, max_new_tokens=n)[0] for x, n in zip(ids, (4, 90))]
    engine = BatchGenerator(model, overlap=True, compact_after=1000)
    decoder = engine._decoder
    flushed = []
    with torch.no_grad():
        short, long = (engine.add(x, max_new_tokens=n) for x, n in zip(ids, (4, 90)))
        while not short.finished:
            engine.step()
        retired = next(row for row in decoder.rows if row.retired is not None)
        layouts, to_window = decoder.layouts, decoder.window - retired.count
        real = retired.memories[model.config.mem_layers[0]].append
        retired.memories[model.config.mem_layers[0]].append = lambda *a: flushed.append(1) or real(*a)
        for _ in range(to_window):
            engine.step()
        assert len(decoder.rows) == 2 and decoder.layouts == layouts
        engine.step()  # its window would be full now: laid out without it
        assert len(decoder.rows) == 1 and decoder.layouts == layouts + 1
        engine.run()
    assert not flushed
    assert short.tokens == want[0] and long.tokens == want[1]


def test_stats_count_the_steps_prompts_and_layouts_of_a_run():
    """engine.stats() (the server's /health): two prompts read in one pass, then a layout and one step per token
    after the first (the first comes with the prompt's reading); a third prompt two steps later is a second read and
    a second layout. No CUDA graphs on a CPU."""
    model = sharp_tiny()
    g = torch.Generator().manual_seed(8)
    ids = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 14, 6)]
    engine = BatchGenerator(model)
    start = engine.stats()
    assert start["steps"] == start["prompts"] == start["reads"] == start["captures"] == 0
    with torch.no_grad():
        for x in ids[:2]:
            engine.add(x, max_new_tokens=6)
        engine.step()
        engine.step()
        engine.add(ids[2], max_new_tokens=6)
        engine.run()
    stats = engine.stats()
    # the first two streams' 5 steps, then the third's last 3 after theirs ended
    assert stats["steps"] == 5 + 2 and stats["prompts"] == 3 and stats["reads"] == 2
    assert stats["layouts"] >= 2 + start["layouts"] and stats["captures"] == 0 and stats["capture_seconds"] == 0
    assert 0 < stats["read_seconds"] <= stats["step_seconds"]
    assert stats["gpu_seconds"] == 0  # the device's time: there is none on a CPU


@pytest.mark.parametrize("overlap", [False, True])
def test_on_wait_runs_before_each_step_hands_out_its_tokens(overlap):
    """The engine calls on_wait (the server's outbox flush) once per step with a step's tokens to hand out, before
    it waits for them: with overlap the pieces of the token before are sent while the GPU computes."""
    model = sharp_tiny()
    seen = []
    engine = BatchGenerator(model, overlap=overlap, on_wait=lambda: seen.append(("wait", len(stream.tokens))))
    with torch.no_grad():
        stream = engine.add([5, 9, 17, 4], max_new_tokens=5, on_token=lambda t: seen.append(("token", t)) and False)
        engine.run()
    waits = [n for kind, n in seen if kind == "wait"]
    # the first token comes with the prompt's reading; tokens 2..5 from steps, each handed out after a wait
    assert waits == [1, 2, 3, 4]
    assert [kind for kind, _ in seen] == ["token"] + ["wait", "token"] * 4
