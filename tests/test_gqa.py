"""Grouped-query attention (num_key_value_heads=2 with 4 query heads) in the local cache and the memory.

Query head j uses key/value head j // (heads / kv_heads), as in transformers' LLaMA. The memory stores only the
key/value heads. Helpers (sharp random weights, the transcription of docs/inference.md) come from test_invariants.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_invariants import (  # noqa: E402
    IMPLS,
    ORDER_TOL,
    _long_run,
    _padded_mask,
    assert_decoding_matches_spec,
    assert_padded_call_matches_spec,
    hf_llama,
    ids_of,
    legacy,
    max_diff,
    tiny,
    with_config,
)

KV = 2


@pytest.mark.parametrize("mem_layers", [[], [1, 3]], ids=["no-memory", "memory-1-3"])
@pytest.mark.parametrize("n,lcl", [(20, None), (64, 64)])
@torch.no_grad()
def test_gqa_short_input_equals_llama(mem_layers, n, lcl):
    """L <= lcl (or lcl >= L <= window): the logits equal transformers' LLaMA with num_key_value_heads=2."""
    model = tiny(num_key_value_heads=KV, mem_layers=mem_layers)
    llama = hf_llama(model)
    assert llama.config.num_key_value_heads == KV
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (KV * 16, 64)
    ids = ids_of(2, n, seed=40)
    ours, theirs = model(ids, last_context_length=lcl).logits, llama(ids).logits
    assert torch.equal(ours, theirs), max_diff(ours, theirs)  # the same fp32 ops in the same order (test_F1)


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_gqa_memory_stores_only_kv_heads(use_cache):
    """Memory and local cache hold kv_heads=2 heads; the memory keys are the un-rotated k_proj outputs."""
    model = tiny(num_key_value_heads=KV)
    b, n = 2, 150
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        out = model(ids_of(b, n, seed=41), use_cache=use_cache)
    finally:
        handle.remove()
    cache = out.past_key_values
    m = n - 24 if use_cache else n
    for idx, state in enumerate(cache.layers):
        entry = legacy(cache)[idx]
        if use_cache:
            assert entry[0].shape == entry[1].shape == (b, KV, 24, 16)
        if idx in model.config.mem_layers:
            assert state.memory.kv_heads == KV
            assert state.memory.keys.shape == state.memory.values.shape == (b, KV, m, 16)
            assert entry[3].shape == (b, KV, m, 16)
            assert state.memory.nbytes() == b * m * (2 * KV * 16 * 4 + 1)
        else:
            assert state.memory is None
    layer = model.model.layers[1]
    windows = seen[:2] if use_cache else seen
    expected = torch.cat(
        [layer.self_attn.k_proj(layer.input_layernorm(h)).view(b, h.shape[1], KV, 16).transpose(1, 2) for h in windows],
        dim=2,
    )
    assert torch.equal(cache.layers[1].memory.keys, expected)  # the same modules on the same window-shaped inputs


@torch.no_grad()
def test_gqa_matches_the_spec_reimplementation():
    """Padded fresh batch with use_cache=False, then (fresh reference) a prompt and 25 decode steps across a flush.
    Fresh calls are bitwise. In one-token steps the model multiplies the 2 query heads of a kv head as one (2, d)
    block against the shared keys (a gemm) where the transcription repeats the keys per head (a gemv), which rounds
    differently, so decode steps and the state after them agree to ORDER_TOL."""
    model = tiny(num_key_value_heads=KV, max_position_embeddings=32, last_context_length=16)
    ids = ids_of(2, 100, seed=42)
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :37] = 0
    assert_padded_call_matches_spec(model, ids, mask)
    out = assert_decoding_matches_spec(model, ids_of(1, 100, seed=43), ids_of(1, 25, seed=44), tol=ORDER_TOL)
    assert out.past_key_values.memory_length == 116


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose k/v projections repeat each kv head for its query heads (long input,
    memory, decode across a flush): query head j reads kv head j // 2."""
    gqa = tiny(num_key_value_heads=KV)
    mha = tiny(num_key_value_heads=4)
    state = gqa.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = tensor.view(KV, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
        state[name] = tensor
    mha.load_state_dict(state, strict=True)
    mask = _padded_mask("holes")
    ids, steps = ids_of(2, 200, seed=45), ids_of(2, 12, seed=46)
    assert max_diff(_long_run(gqa, ids, mask, steps), _long_run(mha, ids, mask, steps)) <= ORDER_TOL


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("kind", ["none", "left-37", "holes"])
@torch.no_grad()
def test_gqa_sdpa_parity(kind, impl):
    """SDPA (torch_attention) and the fast path vs the explicit path with GQA and memory (padded batch, decode
    across a flush); see ORDER_TOL."""
    model = tiny(num_key_value_heads=KV)
    sdpa = with_config(model, **IMPLS[impl])
    mask = _padded_mask(kind)
    ids, steps = ids_of(2, 200, seed=47), ids_of(2, 12, seed=48)
    assert max_diff(_long_run(model, ids, mask, steps), _long_run(sdpa, ids, mask, steps)) <= ORDER_TOL


@pytest.mark.parametrize("grouping", [(1, 3), (3, 5), (2, 16), (4, 2048)])
@torch.no_grad()
def test_gqa_grouping_invariance(grouping):
    """mem_attention_grouping with GQA, including head chunks that straddle kv groups ((3, 5)). The grouped path
    expands the kv heads to one per query head, so even a single chunk ((4, 2048)) multiplies other shapes than the
    ungrouped path and agrees to ORDER_TOL, not bitwise."""
    model = tiny(num_key_value_heads=KV)
    grouped = with_config(model, mem_attention_grouping=grouping)
    mask = _padded_mask("holes")
    ids, steps = ids_of(2, 200, seed=49), ids_of(2, 12, seed=50)
    base, other = _long_run(model, ids, mask, steps), _long_run(grouped, ids, mask, steps)
    assert max_diff(base, other) <= ORDER_TOL
