"""The static decoder (fixed buffers, CUDA-graph friendly) gives what the generic decoding path gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ForcedTokens, assert_within_steps, reference_root, sharp_tiny
from transformers import AutoModelForCausalLM

from longllama.fast.decode import StaticDecoder


def _model(**overrides):
    return sharp_tiny(**overrides)


def _both(model, ids, **kwargs):
    out = {}
    for decoder in ("dynamic", "static"):
        out[decoder] = model.generate(ids, decoder=decoder, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out["dynamic"], out["static"]


# The two decoders run the same fp32 maths through other kernels (one token's projections as a gemv, keys rotated
# once when stored): their logits and fp32 cache entries differ by summation order, observed up to 7e-7.
FP32_TOL = 1e-5


def _forced_logits(model, ids, tokens, decoder, **kwargs):
    """Raw logits (steps, b, vocab) and the output of decoding along `tokens` (prompt included)."""
    out = model.generate(
        ids,
        decoder=decoder,
        logits_processor=[ForcedTokens(tokens)],
        output_logits=True,
        return_dict_in_generate=True,
        max_new_tokens=tokens.shape[1] - ids.shape[1],
        **kwargs,
    )
    assert torch.equal(out.sequences, tokens)
    return torch.stack(out.logits), out


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(num_key_value_heads=2), dict(mem_positionals=False), dict(mem_dtype="bfloat16"), dict(mem_layers=[])],
)
def test_static_equals_dynamic_across_flushes(overrides):
    model = _model(**overrides)
    ids = torch.randint(3, 320, (2, 150))
    kwargs = dict(last_context_length=40)  # 140 new tokens: several flushes of the 64-token window
    a = model.generate(
        ids, decoder="dynamic", output_scores=True, return_dict_in_generate=True, max_new_tokens=140, **kwargs
    )
    # The static decoder reads the dynamic one's tokens: these toy logits have near-ties (top two ~2e-5 apart) that
    # a bf16 rounding flip may legitimately tip. Its own greedy choice is still checked: the logits bound below
    # leaves the argmax unchanged wherever the top logit leads by more than twice the bound.
    dynamic = torch.stack(a.scores)  # greedy without processors: the raw logits
    static, b = _forced_logits(model, ids, a.sequences, "static", **kwargs)
    tol = FP32_TOL
    if model.config.mem_dtype != "float32":
        # Memory keys are the fp32 keys rounded to bf16; where the two decoders' fp32 keys straddle a rounding
        # boundary they store neighbours (one step apart). Rounding every key (half a step each) moves the logits
        # by `moved` (fp32-memory twin, same weights and tokens); a few keys one step apart stay within twice that.
        twin = _model(**{**overrides, "mem_dtype": "float32"})
        moved = float((_forced_logits(twin, ids, a.sequences, "dynamic", **kwargs)[0] - dynamic).abs().max())
        assert 0 < moved < 1e-2, (
            moved
        )  # invariant 15 (docs/invariants.md): bf16 memory changes toy logits by ~1e-4..1e-3
        tol += 2 * moved
    assert (dynamic - static).abs().max() <= tol
    assert a.cache.local_length == b.cache.local_length and a.cache.memory_length == b.cache.memory_length
    for la, lb in zip(a.cache.to_legacy(), b.cache.to_legacy()):
        for x, y in zip(la, lb):
            assert x.dtype == y.dtype and x.shape == y.shape
            if not x.is_floating_point():
                assert torch.equal(x, y)  # positions
                continue
            # fp32 entries within FP32_TOL; an entry stored in bf16 (memory) is that fp32 value rounded: one step more
            assert_within_steps(x, y, dtype=x.dtype, steps=0 if x.dtype == torch.float32 else 1, atol=FP32_TOL)


def test_static_continues_a_cache_and_leaves_it_unchanged():
    model = _model()
    doc = model(torch.randint(3, 320, (1, 200)), use_cache=True).past_key_values
    before = [t.clone() for entry in doc.to_legacy() for t in entry]
    question = torch.randint(3, 320, (1, 10))
    a, b = _both(model, question, past_key_values=doc, max_new_tokens=30)
    assert torch.equal(a.sequences, b.sequences)
    after = [t for entry in doc.to_legacy() for t in entry]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def _same_cache(a, b):
    assert a.local_length == b.local_length and a.memory_length == b.memory_length
    for la, lb in zip(a.to_legacy(), b.to_legacy()):
        for x, y in zip(la, lb):
            assert x.shape == y.shape and (x.numel() == 0 or (x.float() - y.float()).abs().max() < 1e-5)


def test_static_decoding_returns_a_cache_that_continues_the_generation(monkeypatch):
    # Static decoding queues each step ahead of the host and leaves the last token unfed; the cache it returns holds
    # the prompt and every other generated token, and a generation continued from it (fed the last token) is the
    # one longer generation: same tokens, same scores, same final cache. 30 + 40 tokens after a prompt whose local
    # cache holds 40: flushes of the 64-token window in both parts.
    model = _model()
    ids = torch.randint(3, 320, (2, 150))
    options = dict(do_sample=False, last_context_length=40, output_scores=True, return_dict_in_generate=True)
    static_caches = []
    to_cache = StaticDecoder.to_cache
    monkeypatch.setattr(StaticDecoder, "to_cache", lambda self: static_caches.append(1) or to_cache(self))
    whole = model.generate(ids, decoder="dynamic", max_new_tokens=70, **options)
    first = model.generate(ids, decoder="static", max_new_tokens=30, **options)
    assert torch.equal(first.sequences, whole.sequences[:, :180])
    positions = first.cache.layers[0].positions
    assert positions.shape[1] == first.cache.local_length and (positions[:, -1] == 178).all()  # 179 tokens fed
    rest = model.generate(
        first.sequences[:, -1:], past_key_values=first.cache, decoder="static", max_new_tokens=40, **options
    )
    assert torch.equal(rest.sequences[:, 1:], whole.sequences[:, 180:])
    assert (torch.stack(first.scores + rest.scores) - torch.stack(whole.scores)).abs().max() < 1e-5
    _same_cache(rest.cache, whole.cache)
    assert len(static_caches) == 2  # both parts decoded statically


def test_padded_batches_are_not_decoded_statically():
    model = _model()
    ids = torch.randint(3, 320, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert not StaticDecoder.usable(cache, mask)
    assert StaticDecoder.usable(cache, torch.ones_like(ids))
    a, b = _both(model, ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(a.sequences, b.sequences)


def test_reference_generation_fixtures_with_the_static_decoder():
    root = reference_root()
    if root is None:
        pytest.skip("shared fixtures not found")
    for name in ("generate_greedy", "generate_lcl"):
        case = json.loads((root / name / "case.json").read_text())
        tensors = np.load(root / name / "tensors.npz")
        model = AutoModelForCausalLM.from_pretrained(root / name / "checkpoint")
        out = model.generate(
            torch.from_numpy(tensors["input_ids"]),
            decoder="static",
            output_scores=True,
            return_dict_in_generate=True,
            **case["args"],
        )
        np.testing.assert_array_equal(out.sequences.numpy(), tensors["sequences"])
        assert np.abs(torch.stack(out.scores, 1).numpy() - tensors["scores"]).max() <= 1e-4


class _Tokens:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        pass


@pytest.mark.parametrize("end_at", ["undo", "flush"])
def test_static_decoding_ahead_of_the_host_stops_where_dynamic_stops(end_at):
    # The static path queues each next step before it looks at the current token; when every row has ended it
    # takes that step back, so tokens, scores, streamed tokens and the final cache match the dynamic path. At
    # generated token 24 the next step would flush the 64-token window (40 local tokens after the prompt): there
    # it decides before stepping.
    model = _model()
    for seed in range(50):
        ids = torch.randint(3, 320, (1, 150), generator=torch.Generator().manual_seed(seed))
        free = model.generate(ids, decoder="static", max_new_tokens=40, last_context_length=40)[0, 150:].tolist()
        k = 24 if end_at == "flush" else 11
        if free[k] not in free[:k]:
            break
    else:
        pytest.fail("no prompt whose chosen token is new at that step")
    streams = {}
    out = {}
    for decoder in ("dynamic", "static"):
        streams[decoder] = _Tokens()
        out[decoder] = model.generate(
            ids,
            decoder=decoder,
            max_new_tokens=40,
            last_context_length=40,
            eos_token_id=free[k],
            streamer=streams[decoder],
            output_scores=True,
            return_dict_in_generate=True,
        )
    a, b = out["dynamic"], out["static"]
    assert a.sequences.shape[1] == 150 + k + 1 and torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.scores) - torch.stack(b.scores)).abs().max() < FP32_TOL
    assert [t.tolist() for t in streams["static"].puts] == [t.tolist() for t in streams["dynamic"].puts]
    assert a.cache.local_length == b.cache.local_length and a.cache.memory_length == b.cache.memory_length
    for la, lb in zip(a.cache.to_legacy(), b.cache.to_legacy()):
        for x, y in zip(la, lb):
            # positions, and fp32 keys/values (the default memory dtype): FP32_TOL as above
            assert x.shape == y.shape and (x.numel() == 0 or (x.float() - y.float()).abs().max() < FP32_TOL)
