"""kNN memory (`mem_top_k`): each memory-layer query sees only its k highest-scoring memory keys, in one softmax
with its local keys. The fast path (chunked exact kNN, then fp32 attention over the chosen keys) computes the same
function as the exact path (a masked top k of the full score matrix), which is checked here against a direct
computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import sharp_tiny

from longllama import attention
from longllama.config import ConfigError, preset
from longllama.fast import attention as fast_attention
from longllama.fast.attention import top_k_memory_attention
from longllama.plan import ExecutionPlan


def _direct(q, k, v, mem_k, mem_v, top_k):
    """softmax over [causal local scores ; each query's top_k memory scores] by hand (no grouped heads)."""
    d = q.shape[-1]
    local = q @ k.transpose(-1, -2) / math.sqrt(d)
    n = q.shape[2]
    local = local.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    mem = q @ mem_k.transpose(-1, -2) / math.sqrt(d)
    kth = mem.topk(top_k, dim=-1).values[..., -1:]
    mem = mem.masked_fill(mem < kth, float("-inf"))
    probs = torch.softmax(torch.cat([local, mem], dim=-1), dim=-1)
    return probs[..., :n] @ v + probs[..., n:] @ mem_v


def attend(q, k, v, *, impl, visible, is_causal=False, **memory):
    """The output of the exact attention ("eager") or of the fast path (plan.attention "fast") on the CPU."""
    if impl == "fast":
        return fast_attention.attend(
            q, k, v, plan=ExecutionPlan(attention="fast"), visible=visible, is_causal=is_causal, **memory
        )
    return attention.attend(q, k, v, visible=visible, impl=impl, **memory)[0]


@pytest.mark.parametrize("impl", ["eager", "fast"])
@pytest.mark.parametrize("n", [3, 40])  # decoding-sized and window-sized query blocks
def test_attend_with_top_k_equals_direct_maths(impl, n):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16) for _ in range(3))
    mem_k, mem_v = torch.randn(2, 4, 300, 16), torch.randn(2, 4, 300, 16)
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    out = attend(q, k, v, visible=visible, is_causal=True, mem_k=mem_k, mem_v=mem_v, impl=impl, mem_top_k=7)
    assert (out - _direct(q, k, v, mem_k, mem_v, 7)).abs().max() < 1e-5
    dense = attend(q, k, v, visible=visible, is_causal=True, mem_k=mem_k, mem_v=mem_v, impl=impl)
    assert (out - dense).abs().max() > 1e-2  # the top k is not the dense attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_chunked_selection_and_gather(monkeypatch, dtype):
    # A running top k over many chunks of keys, gathered in several chunks of queries, with grouped heads. fp32
    # reuses the selection's scores; bf16 recomputes the chosen keys' scores in fp32 (compared on the rounded inputs).
    monkeypatch.setattr(fast_attention, "_TOP_K_SCORES", 4 * 10 * 9)  # chunks of 9 keys
    monkeypatch.setattr(fast_attention, "_TOP_K_GATHERED", 2 * 5 * 6)  # 2 query rows per chunk
    torch.manual_seed(12)
    q = torch.randn(1, 4, 10, 6).to(dtype)
    mem_k, mem_v = torch.randn(1, 2, 100, 6).to(dtype), torch.randn(1, 2, 100, 6).to(dtype)
    out, lse = top_k_memory_attention(q, mem_k, mem_v, top_k=5, scale=0.5)
    q, mem_k, mem_v = q.float(), mem_k.float(), mem_v.float()
    s = q @ mem_k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5
    # The keys are chosen by scores rounded to `dtype`: where the 5th and 6th fp32 scores round to one bf16 value
    # either key is a valid choice (torch.topk breaks the tie its own way), so the input is one without such a tie
    # (with seed 1, two of the 40 rows had one; the closest pair here is 0.87 step apart and rounds apart).
    fifth_sixth = s.topk(6, dim=-1).values[..., 4:].to(dtype)
    assert bool((fifth_sixth[..., 0] != fifth_sixth[..., 1]).all())
    kth = s.topk(5, dim=-1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    assert (out - torch.softmax(s, -1) @ mem_v.repeat_interleave(2, 1)).abs().max() < 1e-5
    assert (lse - torch.logsumexp(s, -1)).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=2), dict(mem_positionals=False)])
def test_model_fast_equals_eager_with_top_k(overrides):
    model = sharp_tiny(mem_top_k=16, **overrides)
    # Distinct tokens: with repeated ones (and no positions in memory) keys can tie, and either choice is a top k.
    ids = torch.stack([torch.randperm(317)[:300] + 3 for _ in range(2)])
    with torch.no_grad():
        model.config.attn_impl = "eager"
        a = model(ids, use_cache=False).logits
        model.config.attn_impl = "fast"
        b = model(ids, use_cache=False).logits
        model.config.mem_top_k = None
        dense = model(ids, use_cache=False).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - dense)[:, 100:].abs().max() > 1e-3  # windows after the first see a memory larger than k


def test_top_k_as_large_as_the_memory_is_dense():
    model = sharp_tiny(mem_top_k=10_000)
    ids = torch.randint(3, 320, (1, 300))
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        model.config.mem_top_k = None
        b = model(ids, use_cache=False).logits
    assert torch.equal(a, b)  # attend() drops a top k that covers the memory: the dense path itself


def test_generation_with_top_k_same_on_both_paths():
    model = sharp_tiny(mem_top_k=8)
    ids = torch.randint(3, 320, (1, 150))
    runs = {}
    for impl in ("eager", "fast"):
        model.config.attn_impl = impl
        runs[impl] = model.generate(
            ids, max_new_tokens=60, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    assert torch.equal(runs["eager"].sequences, runs["fast"].sequences)
    assert (torch.stack(runs["eager"].scores) - torch.stack(runs["fast"].scores)).abs().max() < 1e-4


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_top_k_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="mem_top_k"):
        preset("tiny", mem_top_k=bad)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("n", [40, 5])  # a window-sized block, and a few queries (below FEW_QUERIES)
def test_window_after_a_local_cache_with_top_k(kv_heads, n):
    # n new queries after 20 cached keys (a mask that is not top-left causal): local part under the mask, memory
    # by kNN, merged; the same as the masked top k of the exact path, and not the dense memory attention.
    torch.manual_seed(2)
    q = torch.randn(1, 4, n, 16)
    k, v = torch.randn(1, kv_heads, 20 + n, 16), torch.randn(1, kv_heads, 20 + n, 16)
    mem_k, mem_v = torch.randn(1, kv_heads, 500, 16), torch.randn(1, kv_heads, 500, 16)
    visible = (torch.arange(20 + n)[None, :] <= torch.arange(20, 20 + n)[:, None])[None, None]
    outs = [
        attend(q, k, v, visible=visible, mem_k=mem_k, mem_v=mem_v, impl=impl, mem_top_k=9) for impl in ("eager", "fast")
    ]
    dense = attend(q, k, v, visible=visible, mem_k=mem_k, mem_v=mem_v, impl="eager")
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert (outs[1] - dense).abs().max() > 1e-3
