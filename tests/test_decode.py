"""The static decoder (fixed buffers, CUDA-graph friendly) gives what the generic decoding path gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from longllama.decode import StaticDecoder

from conftest import reference_root, sharp_tiny


def _model(**overrides):
    return sharp_tiny(**overrides)


def _both(model, ids, **kwargs):
    out = {}
    for decoder in ("dynamic", "static"):
        out[decoder] = model.generate(ids, decoder=decoder, output_scores=True, return_dict_in_generate=True,
                                      **kwargs)
    return out["dynamic"], out["static"]


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=2), dict(mem_positionals=False),
                                       dict(mem_dtype="bfloat16"), dict(mem_layers=[])])
def test_static_equals_dynamic_across_flushes(overrides):
    model = _model(**overrides)
    ids = torch.randint(3, 320, (2, 150))
    a, b = _both(model, ids, max_new_tokens=140, last_context_length=40)  # several flushes of the 64-token window
    assert torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.scores) - torch.stack(b.scores)).abs().max() < 1e-5
    assert a.cache.local_length == b.cache.local_length and a.cache.memory_length == b.cache.memory_length
    for la, lb in zip(a.cache.to_legacy(), b.cache.to_legacy()):
        for x, y in zip(la, lb):
            assert x.shape == y.shape and (x.numel() == 0 or (x.float() - y.float()).abs().max() < 1e-5)


def test_static_continues_a_cache_and_leaves_it_unchanged():
    model = _model()
    doc = model(torch.randint(3, 320, (1, 200)), use_cache=True).past_key_values
    before = [t.clone() for entry in doc.to_legacy() for t in entry]
    question = torch.randint(3, 320, (1, 10))
    a, b = _both(model, question, past_key_values=doc, max_new_tokens=30)
    assert torch.equal(a.sequences, b.sequences)
    after = [t for entry in doc.to_legacy() for t in entry]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


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
        out = model.generate(torch.from_numpy(tensors["input_ids"]), decoder="static", output_scores=True,
                             return_dict_in_generate=True, **case["args"])
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
        out[decoder] = model.generate(ids, decoder=decoder, max_new_tokens=40, last_context_length=40,
                                      eos_token_id=free[k], streamer=streams[decoder], output_scores=True,
                                      return_dict_in_generate=True)
    a, b = out["dynamic"], out["static"]
    assert a.sequences.shape[1] == 150 + k + 1 and torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.scores) - torch.stack(b.scores)).abs().max() < 1e-5
    assert [t.tolist() for t in streams["static"].puts] == [t.tolist() for t in streams["dynamic"].puts]
    assert a.cache.local_length == b.cache.local_length and a.cache.memory_length == b.cache.memory_length
    for la, lb in zip(a.cache.to_legacy(), b.cache.to_legacy()):
        for x, y in zip(la, lb):
            assert x.shape == y.shape and (x.numel() == 0 or (x.float() - y.float()).abs().max() < 1e-5)
