"""The "fast" attention implementation computes the same function as the exact ("eager") one.

On the CPU its partial attentions run as explicit fp32 maths, so this checks the log-sum-exp merge of local and
memory attention, the zero-padded memory storage and the decoding path; the CUDA kernels are checked against the
exact path on the GPU by benchmarks/gpu_check.py."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_steps, sharp_tiny

from longllama import windows
from longllama.attention import attend, kernel_head_dim
from longllama.fast import attention as fast_attention
from longllama.fast.attention import kernel_dtype, memory_attention, memory_pieces, partial_attention
from longllama.ops import merge_partials
from longllama.plan import ExecutionPlan, build_plan


def _model(**overrides):
    return sharp_tiny(**overrides)


def _logits(model, impl, ids, **kwargs):
    model.config.attn_impl = impl
    with torch.no_grad():
        return model(ids, **kwargs)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_key_value_heads=2),
        dict(mem_positionals=False),
        dict(hidden_size=80),  # head_dim 20 -> 24
        dict(mem_dtype="bfloat16"),
    ],
)
def test_fast_equals_eager_on_long_inputs(overrides):
    model = _model(**overrides)
    ids = torch.randint(3, 320, (2, 300))
    a = _logits(model, "eager", ids, use_cache=False).logits
    b = _logits(model, "fast", ids, use_cache=False).logits
    tol = 1e-4
    if model.config.mem_dtype != "float32":
        # The two paths' fp32 memory keys differ in their last bits, so their bf16 roundings may be neighbours.
        # Rounding every key (half a step) moves the logits by `moved` (fp32-memory twin, same weights); a few keys
        # one step apart stay within twice that.
        twin = _model(**{**overrides, "mem_dtype": "float32"})
        moved = float((_logits(twin, "eager", ids, use_cache=False).logits - a).abs().max())
        assert 0 < moved < 1e-2, (
            moved
        )  # invariant 15 (docs/invariants.md): bf16 memory changes toy logits by ~1e-4..1e-3
        tol += 2 * moved
    assert (a - b).abs().max() < tol


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_partial_attention_kernel_equals_the_maths(causal):
    # Inference on the CPU runs torch's blockwise kernel (it returns the log-sum-exp too); with gradients the
    # explicit maths runs. Both must be the same attention.
    torch.manual_seed(0)
    m = 40 if causal else 300
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, m, 16), torch.randn(2, 3, m, 16)
    with torch.no_grad():
        out, lse = partial_attention(q, k, v, causal=causal, scale=0.25)
    scores = (q @ k.transpose(-1, -2)) * 0.25
    if causal:
        scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-5, atol=1e-5)
    grad_q = q.clone().requires_grad_()
    out_grad, lse_grad = partial_attention(grad_q, k, v, causal=causal, scale=0.25)
    torch.testing.assert_close(out_grad.detach(), out, rtol=1e-5, atol=1e-5)


def test_kernels_get_one_dtype_under_autocast(bf16_cpu_attention):
    # fp32 weights under bf16 autocast: RoPE gives fp32 q/k next to a bf16 v. The CUDA kernels read mixed dtypes
    # as garbage (measured on an H100: loss 7.57 instead of 2.62), so the fast path casts all three to one dtype.
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    assert kernel_dtype(q, k, v) == torch.float32
    assert kernel_dtype(v, v, v) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_dtype(q, k, v) == torch.bfloat16
    model = _model()
    ids = torch.randint(3, 320, (2, 300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _logits(model, "eager", ids, use_cache=False).logits.float()
        b = _logits(model, "fast", ids, use_cache=False).logits.float()
    reference = _logits(model, "eager", ids, use_cache=False).logits
    # Both within bf16 noise of the fp32 result, and of each other, in bf16 steps at the logits' largest magnitude:
    # autocast rounds every product's inputs and output (half a step each at that layer's scale), which leaves
    # ~1.6 steps on these logits (measured); 4 leaves room for other kernels' roundings.
    scale = reference.abs().max()
    for got, want in ((a, reference), (b, reference), (a, b)):
        assert_within_steps(got, want, dtype=torch.bfloat16, steps=4, magnitude=scale)


def test_memory_attention_in_pieces_through_the_model(monkeypatch):
    # The plan reaches memory attention: cuDNN's path (run by the CPU kernel here) reads memories of up to 376 keys
    # in pieces of 16 x 2^j keys, merged into the one softmax of the exact path.
    model = _model()
    ids = torch.randint(3, 320, (1, 400))
    a = _logits(model, "eager", ids, use_cache=False).logits
    keys = []
    real = fast_attention.partial_attention

    def spy(q, k, v, **kwargs):
        if not kwargs["causal"]:
            keys.append(k.shape[2])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fast_attention, "partial_attention", spy)
    model.set_plan(memory_kernel="cudnn", memory_piece=16)
    b = _logits(model, "fast", ids, use_cache=False).logits
    assert (a - b).abs().max() < 1e-4
    assert 16 in keys and max(keys) > 64 and all(m % 16 == 0 for m in keys if m >= 16)  # pieces of 16 x 2^j keys


def test_fast_equals_eager_when_decoding_across_flushes():
    model = _model(num_key_value_heads=2)
    ids = torch.randint(3, 320, (1, 150))
    for impl in ("eager", "fast"):
        model.config.attn_impl = impl
        out = model.generate(ids, max_new_tokens=60, do_sample=False, output_scores=True, return_dict_in_generate=True)
        if impl == "eager":
            ref = out
    assert torch.equal(out.sequences, ref.sequences)
    assert (torch.stack(out.scores) - torch.stack(ref.scores)).abs().max() < 1e-4


def test_fast_falls_back_to_exact_on_padding():
    model = _model()
    ids = torch.randint(3, 320, (2, 200))
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    a = _logits(model, "eager", ids, attention_mask=mask, use_cache=False).logits
    b = _logits(model, "fast", ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    assert (a - b)[keep].abs().max() < 1e-5


def test_merge_of_partials_is_one_softmax():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    ka, kb = k[:, :, :15], k[:, :, 15:]
    va, vb = v[:, :, :15], v[:, :, 15:]
    oa, la = partial_attention(q, ka, va, causal=False, scale=0.3)
    ob, lb = partial_attention(q, kb, vb, causal=False, scale=0.3)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v
    assert (merge_partials(oa, la, ob, lb) - full).abs().max() < 1e-5
    oc, _ = partial_attention(q, k, v, causal=True, scale=0.3)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf")), dim=-1) @ v
    assert (oc - ref).abs().max() < 1e-5


def test_memory_is_stored_padded_for_kernels():
    model = _model(hidden_size=80)  # head_dim 20
    out = _logits(model, "fast", torch.randint(3, 320, (1, 200)), use_cache=False)
    memory = out.past_key_values.layers[1].memory
    assert memory.head_dim == 20 and memory.storage_dim == kernel_head_dim(20) == 24
    keys, values = memory.padded()
    assert keys.shape[-1] == 24 and torch.count_nonzero(keys[..., 20:]) == 0
    assert torch.count_nonzero(values[..., 20:]) == 0 and memory.keys.shape[-1] == 20


def test_attend_rejects_nothing_silently_for_grouped_heads():
    torch.manual_seed(2)
    q = torch.randn(1, 4, 30, 16)
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    mk, mv = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    causal = torch.ones(30, 30, dtype=torch.bool).tril()[None, None]
    a, _ = attend(q, k, v, visible=causal, mem_k=mk, mem_v=mv, impl="eager")
    b = fast_attention.attend(
        q, k, v, plan=ExecutionPlan(attention="fast"), visible=causal, mem_k=mk, mem_v=mv, is_causal=True
    )
    assert (a - b).abs().max() < 1e-5


def test_offloaded_memory_gives_the_same_results():
    """mem_offload keeps the memory on the CPU (pinned when CUDA exists); results do not change."""
    model = _model()
    ids = torch.randint(3, 320, (1, 300))
    ref = _logits(model, "eager", ids, use_cache=True)
    model.config.mem_offload = True
    try:
        out = _logits(model, "eager", ids, use_cache=True)
        gen = model.generate(ids[:, :150], max_new_tokens=30, decoder="static")
    finally:
        model.config.mem_offload = False
    assert torch.equal(ref.logits, out.logits)  # on a CPU the offloaded memory is where it was: the same computation
    assert out.past_key_values.layers[1].memory.device.type == "cpu"
    assert torch.equal(gen, model.generate(ids[:, :150], max_new_tokens=30, decoder="dynamic"))


@pytest.mark.parametrize("batch,kv_heads", [(1, 4), (2, 4), (2, 2)])
def test_memory_attention_is_one_softmax_over_the_memory(batch, kv_heads):
    # FlashAttention 2's path (the CPU kernel here): one call over all memory keys, grouped heads expanded.
    torch.manual_seed(0)
    q = torch.randn(batch, 4, 40, 8)
    k, v = torch.randn(batch, kv_heads, 1000, 8), torch.randn(batch, kv_heads, 1000, 8)
    out, lse = memory_attention(q, k, v, scale=0.3, plan=ExecutionPlan(memory_kernel="flash"))
    scores = q @ k.repeat_interleave(4 // kv_heads, 1).transpose(-1, -2) * 0.3
    assert (out - torch.softmax(scores, -1) @ v.repeat_interleave(4 // kv_heads, 1)).abs().max() < 1e-5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-5


def test_memory_pieces_cover_the_memory_in_binary_digits():
    assert memory_pieces(0, 4) == []
    assert memory_pieces(3, 4) == [(0, 3)]
    assert memory_pieces(4 * 13 + 3, 4) == [(0, 32), (32, 48), (48, 52), (52, 55)]  # 13 = 8 + 4 + 1, rest 3
    for m in range(1, 200):
        pieces = memory_pieces(m, 8)
        assert pieces[0][0] == 0 and pieces[-1][1] == m
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        lengths = {end - start for start, end in pieces}
        assert all(length % 8 == 0 and (length // 8) & (length // 8 - 1) == 0 for length in lengths if length >= 8)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("m", [7, 64, 1000])
def test_memory_attention_in_pieces_is_one_softmax(kv_heads, m):
    # The cuDNN path's split (run by the CPU kernel here): pieces of unit x 2^j keys and a rest, merged exactly.
    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 8)
    k, v = torch.randn(1, kv_heads, m, 8), torch.randn(1, kv_heads, m, 8)
    out, lse = memory_attention(q, k, v, scale=0.3, plan=ExecutionPlan(memory_kernel="cudnn", memory_piece=16))
    scores = q @ k.repeat_interleave(4 // kv_heads, 1).transpose(-1, -2) * 0.3
    assert (out - torch.softmax(scores, -1) @ v.repeat_interleave(4 // kv_heads, 1)).abs().max() < 1e-5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-5


def test_memory_storage_dim_per_device():
    config = _model().config
    assert build_plan(config, "cpu").memory_storage_dim(100) == 104
    assert ExecutionPlan(device="cuda").memory_storage_dim(100) == 112
    assert ExecutionPlan(device="cuda:0").memory_storage_dim(128) == 128
    assert ExecutionPlan(device="cpu").memory_storage_dim(100) == 104


@pytest.mark.parametrize("group_tokens", [128, 192, 100000])
@pytest.mark.parametrize("n", [300, 64 * 7 + 24])
@pytest.mark.parametrize("overrides", [{"num_key_value_heads": 2}, {"mem_positionals": False, "hidden_size": 80}])
def test_memory_windows_in_groups_equal_one_at_a_time(group_tokens, n, overrides):
    # run_windows reads several memory windows at once as a batch (window 64 here); the logits, the memory and the
    # local cache must be those of the windows read one at a time (groups of fewer tokens than a window).
    torch.manual_seed(0)
    model = _model(**overrides)
    model.config.attn_impl = "fast"
    ids = torch.randint(3, 320, (1, n))
    outs = {}
    for tokens in (1, group_tokens):
        model.set_plan(window_group_tokens=tokens)
        with torch.no_grad():
            outs[tokens] = model(ids, use_cache=True, attention_mask=torch.ones_like(ids))
    a, b = outs[1], outs[group_tokens]
    assert (a.logits - b.logits).abs().max() < 1e-5
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        # the final window runs alone in both; the memory it reads below layer 3 (layer 1's, made from layer 0's
        # rows) is the same, so its local keys are bitwise equal while layer 3's memory may differ in its last bits
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.positions, lb.positions)
        if la.memory is not None:
            assert la.memory.length == lb.memory.length > 0
            assert (la.memory.keys - lb.memory.keys).abs().max() < 1e-5
            assert (la.memory.values - lb.memory.values).abs().max() < 1e-5


def test_window_groups_are_used_only_where_they_apply(monkeypatch):
    calls = []
    model = _model()
    model.config.attn_impl = "fast"
    real = windows.forward_window

    def spy(layers, norm, rope, h, **kwargs):
        calls.append(kwargs.get("grouped", False))
        return real(layers, norm, rope, h, **kwargs)

    monkeypatch.setattr(windows, "forward_window", spy)
    model.set_plan(window_group_tokens=256)
    ids = torch.randint(3, 320, (1, 400))
    with torch.no_grad():
        model(ids, use_cache=False)
    assert True in calls
    calls.clear()
    with torch.no_grad():
        model(torch.cat([ids, ids]), use_cache=False)  # batch 2: one window at a time
    assert calls and not any(calls)


def test_generation_after_a_grouped_prompt_equals_one_window_at_a_time(monkeypatch):
    # generate() passes an all-ones mask; it is dropped, so the prompt's memory windows go in groups.
    torch.manual_seed(0)
    model = _model()
    model.config.attn_impl = "fast"
    ids = torch.randint(3, 320, (1, 64 * 6 + 10))
    outs, grouped = {}, {}
    real = windows.forward_window

    def spy(layers, norm, rope, h, **kwargs):
        grouped[tokens].append(kwargs.get("grouped", False))
        return real(layers, norm, rope, h, **kwargs)

    monkeypatch.setattr(windows, "forward_window", spy)
    for tokens in (1, 256):  # one window at a time (groups of less than a window), then groups of 4 windows
        grouped[tokens] = []
        model.set_plan(window_group_tokens=tokens)
        outs[tokens] = model.generate(
            ids, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    assert not any(grouped[1]) and any(grouped[256])
    assert torch.equal(outs[1].sequences, outs[256].sequences)
    assert (torch.stack(outs[1].scores) - torch.stack(outs[256].scores)).abs().max() < 1e-4


@pytest.mark.parametrize("local_width", [8, 16, 64])
def test_local_attention_padded_wider_gives_the_same_result(local_width):
    torch.manual_seed(0)
    model = _model(hidden_size=80)  # head_dim 20
    ids = torch.randint(3, 320, (1, 300))
    want = _logits(model, "eager", ids).logits
    assert model.set_plan(local_width=local_width).local_storage_dim(20) == -(-20 // local_width) * local_width
    got = _logits(model, "fast", ids).logits
    assert (got - want).abs().max() < 1e-4


def test_memory_stored_wider_gives_the_same_result(monkeypatch):
    assert ExecutionPlan(device="cuda").replace(memory_width=64).memory_storage_dim(100) == 128
    torch.manual_seed(0)
    model = _model(hidden_size=80)
    ids = torch.randint(3, 320, (1, 300))
    want = _logits(model, "eager", ids).logits
    # On the CPU a plan stores rows of 8 (24 for head_dim 20): a stand-in gives the 64 a GPU plan's width could.
    monkeypatch.setattr(ExecutionPlan, "memory_storage_dim", lambda self, head_dim: 64)
    out = _logits(model, "fast", ids, use_cache=True)
    assert max(layer.memory.storage_dim for layer in out.past_key_values.layers if layer.memory is not None) == 64
    assert (out.logits - want).abs().max() < 1e-4
