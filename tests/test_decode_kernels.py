"""The Triton kernels of a decoding step (gemv.py, decode_attention.py), run by Triton's interpreter on the CPU:
each against its plain-torch definition, and whole static decodes with and without them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ForcedTokens, assert_within_steps, sharp_tiny

from longllama import ops
from longllama.fast import decode_attention, fused, gemv, kernels
from longllama.plan import ExecutionPlan

pytest.importorskip("triton")

# Triton's interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest): a kernel's bf16 store is up to
# one step (not half a step) from the fp32 value it computed.
STORE_STEPS = 1
# the split into chunks (the plan's decode_programs, decode_min_chunk) at which small inputs take many chunks, some
# of them empty
MANY_CHUNKS = {"programs": 16, "min_chunk": 8}


def _reference_attention(q, keys, values, used, mem_k=None, mem_v=None):
    """fp32 softmax(q k^T / sqrt(d)) v over the first `used` local slots and the memory (heads repeated for GQA)."""
    d = q.shape[-1]
    k, v = keys[:, :, :used, :d].float(), values[:, :, :used, :d].float()
    if mem_k is not None:
        k = torch.cat([k, mem_k[..., :d].float()], 2)
        v = torch.cat([v, mem_v[..., :d].float()], 2)
    group = q.shape[1] // keys.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q.float()[:, :, None] @ k.transpose(-1, -2) / math.sqrt(d)
    return (scores.softmax(-1) @ v)[:, :, 0]


@pytest.mark.parametrize("slot", [0, 17, 39])
@pytest.mark.parametrize("with_memory", [False, True])
def test_split_attention_equals_one_softmax(interpreter, slot, with_memory):
    torch.manual_seed(slot)
    b, h, kv, d, window, m, stored = 2, 4, 2, 20, 40, 150, 32
    q = torch.randn(b, h, d) * 2
    keys, values = (F.pad(torch.randn(b, kv, window, d), (0, 4)) for _ in range(2))  # rows zero-padded to 24
    memory = None
    if with_memory:
        memory = (F.pad(torch.randn(b, kv, m, d), (0, stored - d)), F.pad(torch.randn(b, kv, m, d), (0, stored - d)))
    out = decode_attention.attend(q, keys, values, torch.tensor([slot]), memory, **MANY_CHUNKS)
    ref = _reference_attention(q, keys, values, slot + 1, *(memory or (None, None)))
    assert out.shape == (b, h, d) and (out - ref).abs().max() < 1e-5


def _row_memory(kv, n, capacity, d, stored):
    """A memory of n keys as a MemoryCache holds it: the first n entries of a (1, kv, capacity, stored) buffer."""
    k, v = (F.pad(torch.randn(1, kv, capacity, d), (0, stored - d)) for _ in range(2))
    return k[:, :, :n], v[:, :, :n]


@pytest.mark.parametrize("one_launch", [False, True])
def test_rows_read_their_own_memories_in_one_softmax_each(interpreter, monkeypatch, one_launch):
    torch.manual_seed(3)
    b, h, kv, d, window, stored, slot = 4, 4, 2, 20, 40, 24, 30
    q = torch.randn(b, h, d) * 2
    keys, values = (F.pad(torch.randn(b, kv, window, d), (0, 4)) for _ in range(2))
    lo = torch.tensor([0, 12, 30, 5])  # each row's own slots lo..slot
    shared = _row_memory(kv, 150, 160, d, stored)
    # different lengths and capacities (head strides), a row without memory, two rows reading one memory in place
    memories = [shared, _row_memory(kv, 37, 64, d, stored), None, shared]
    table = decode_attention.rows_table(memories, q.device) if one_launch else None
    assert (table is not None) == one_launch
    launches = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda *a, **k: launches.append(k.get("ROWS")) or real(*a, **k))
    out = decode_attention.attend(
        q, keys, values, torch.tensor([slot]), lo=lo, row_memories=memories, row_table=table, **MANY_CHUNKS
    )
    assert launches.count(False) == (1 if one_launch else 4) and launches.count(True) == (1 if one_launch else 0)
    for i, mem in enumerate(memories):
        ref = _reference_attention(
            q[i : i + 1], keys[i : i + 1, :, lo[i] :], values[i : i + 1, :, lo[i] :], slot + 1 - lo[i], *(mem or ())
        )
        assert (out[i : i + 1] - ref).abs().max() < 1e-5


def test_one_launch_takes_only_memories_it_can_read_alike():
    d, stored = 20, 24
    memory = _row_memory(2, 30, 40, d, stored)
    assert decode_attention.rows_table([None, None], torch.device("cpu")) is None  # nothing to read
    assert decode_attention.rows_table([memory, None], torch.device("cpu")).tolist() == [
        [0, 0, 40 * stored // 8, 40 * stored // 8, 30],  # in units of 8 elements
        [0, 0, 0, 0, 0],
    ]
    wider = _row_memory(2, 30, 40, d, 32)
    assert decode_attention.rows_table([memory, wider], torch.device("cpu")) is None  # another row stride
    keys, values = memory
    shifted = (keys[:, :, 1:], values[:, :, 1:])  # starts one row (24 elements) in: aligned
    assert decode_attention.rows_table([memory, shifted], torch.device("cpu")) is not None
    narrow = [_row_memory(2, 30, capacity, d, d) for capacity in (30, 31)]  # rows 20 wide: head strides 600, 620
    assert decode_attention.rows_table(narrow[:1], torch.device("cpu")) is not None
    assert decode_attention.rows_table(narrow, torch.device("cpu")) is None  # 620 is not a multiple of 8
    unaligned = tuple(torch.randn(2 * 30 * stored + 4)[4:].view(1, 2, 30, stored) for _ in range(2))
    assert decode_attention.rows_table([memory, unaligned], torch.device("cpu")) is None  # 4 elements off


def test_split_attention_in_bf16_reads_memory_of_another_dtype(interpreter):
    torch.manual_seed(1)
    q = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    keys, values = torch.randn(1, 4, 64, 16, dtype=torch.bfloat16), torch.randn(1, 4, 64, 16, dtype=torch.bfloat16)
    memory = (torch.randn(1, 4, 300, 16), torch.randn(1, 4, 300, 16))  # fp32 memory (mem_dtype)
    out = decode_attention.attend(q, keys, values, torch.tensor([63]), memory)
    ref = _reference_attention(q, keys, values, 64, *memory)
    # fp32 maths (the fp32 test's 1e-5), then one bf16 store
    assert out.dtype == torch.bfloat16
    assert_within_steps(out, ref, dtype=torch.bfloat16, steps=STORE_STEPS, atol=1e-5)


@pytest.mark.parametrize("rotate", [True, False])
def test_rope_store_writes_the_slot_and_rotates(interpreter, rotate):
    torch.manual_seed(2)
    b, h, kv, d, window, slot = 2, 4, 2, 16, 10, 6
    qkv = torch.randn(b, 1, (h + 2 * kv) * d, dtype=torch.bfloat16)
    angles = torch.randn(window, d)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    raw, rot, values = (torch.zeros(b, kv, window, d, dtype=torch.bfloat16) for _ in range(3))
    q = decode_attention.rope_store(qkv, cos, sin, torch.tensor([slot]), raw, rot, values, h, rotate=rotate)
    heads = qkv.view(b, h + 2 * kv, d).float()
    c, s = cos[slot].float(), sin[slot].float()
    turn = (lambda x: ops.rotate(x, c, s)) if rotate else (lambda x: x)
    # rotated in fp32 (the same products as the definition, maybe fused: 1e-5), then one bf16 store; the raw key and
    # the value are copied, so bitwise
    assert_within_steps(q, turn(heads[:, :h]), dtype=torch.bfloat16, steps=STORE_STEPS, atol=1e-5)
    assert torch.equal(raw[:, :, slot], qkv.view(b, h + 2 * kv, d)[:, h : h + kv])
    assert torch.equal(values[:, :, slot], qkv.view(b, h + 2 * kv, d)[:, h + kv :])
    assert_within_steps(rot[:, :, slot], turn(heads[:, h : h + kv]), dtype=torch.bfloat16, steps=STORE_STEPS, atol=1e-5)
    others = torch.ones(window, dtype=torch.bool)
    others[slot] = False
    assert not raw[:, :, others].any() and not rot[:, :, others].any() and not values[:, :, others].any()


def _assert_close_in_bf16(y, ref):
    """Within four bf16 steps at the reference's largest magnitude (the scale of the sums' terms): the reference rounds
    after each of up to four bf16 ops (normed input, products, silu, their product; half a step each), the kernel
    stores its fp32 result once (STORE_STEPS), and an intermediate product may be larger than the result."""
    assert_within_steps(y, ref, dtype=torch.bfloat16, steps=4, magnitude=ref.float().abs().max())


def _assert_swiglu_close(y, x, gate, up):
    """silu(x gate^T) * (x up^T) within four bf16 steps at max |u| (|g| + |silu(g)|): both sides round the two
    products and the silu to bf16 before multiplying (the interpreter by truncation, a full step), and a step of
    g or u moves the result by that much times the other factor."""
    g, u = F.linear(x.float(), gate.float()), F.linear(x.float(), up.float())
    ref = F.silu(F.linear(x, gate)) * F.linear(x, up)
    magnitude = (u.abs() * (g.abs() + F.silu(g).abs())).max()
    assert_within_steps(y, ref, dtype=torch.bfloat16, steps=4, magnitude=magnitude)


@pytest.mark.parametrize("rows", [1, 2, 7])  # a program per row; the several-row kernels (tl.dot, 16 rows)
def test_matrix_vector_kernels_equal_linear(interpreter, rows):
    torch.manual_seed(3)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
    q, k, v = (torch.randn(n, 96, dtype=torch.bfloat16) for n in (48, 12, 12))
    assert gemv.applies(x, q, cpu=True, max_rows=16) and not gemv.applies(x, q)  # CPU tensors go there when asked
    assert not gemv.applies(x, q, cpu=True, max_rows=rows - 1)  # more rows than the kernel is asked to serve
    assert not gemv.applies(torch.zeros(17, 96, dtype=torch.bfloat16), q, cpu=True, max_rows=32)  # over 16 rows
    kw = dict(cpu=True, max_rows=16)
    stacked = gemv.linear_stacked(x, (q, k, v), **kw)
    assert stacked.shape == (rows, 1, 72)
    _assert_close_in_bf16(stacked, torch.cat([F.linear(x, w) for w in (q, k, v)], -1))
    residual = torch.randn(rows, 1, 48, dtype=torch.bfloat16)
    _assert_close_in_bf16(gemv.linear(x, q, residual=residual, **kw), residual + F.linear(x, q))
    up = torch.randn(48, 96, dtype=torch.bfloat16)
    _assert_swiglu_close(gemv.linear_swiglu(x, q, up, **kw), x, q, up)
    # With the RMSNorm before the product done inside it.
    norm = (torch.rand(96, dtype=torch.bfloat16) + 0.5, 1e-6)
    normed = ops.rms_norm(x * 3, *norm)
    _assert_close_in_bf16(gemv.linear(x * 3, q, norm=norm, **kw), F.linear(normed, q))
    _assert_close_in_bf16(
        gemv.linear_stacked(x * 3, (q, k, v), norm=norm, **kw),
        torch.cat([F.linear(normed, w) for w in (q, k, v)], -1),
    )
    _assert_swiglu_close(gemv.linear_swiglu(x * 3, q, up, norm=norm, **kw), normed, q, up)


@pytest.mark.parametrize("rows", [1, 5])
def test_the_rmsnorm_inside_sums_every_column_of_a_long_row(interpreter, rows):
    """K = 600, not a power of two: one row's norm sums it in several steps of the product's blocks (256 columns
    under the interpreter), the last one partial; several rows' norm kernel covers it with one masked block."""
    torch.manual_seed(4)
    x = torch.randn(rows, 1, 600, dtype=torch.bfloat16) * 3
    q, up = (torch.randn(40, 600, dtype=torch.bfloat16) * 0.1 for _ in range(2))
    norm = (torch.rand(600, dtype=torch.bfloat16) + 0.5, 1e-6)
    normed = ops.rms_norm(x, *norm)
    kw = dict(cpu=True, max_rows=16)
    _assert_close_in_bf16(gemv.linear(x, q, norm=norm, **kw), F.linear(normed, q))
    _assert_swiglu_close(gemv.linear_swiglu(x, q, up, norm=norm, **kw), normed, q, up)


@pytest.mark.parametrize("k", [600, 3200])
def test_several_rows_are_normalised_by_their_own_kernel_as_rms_norm_does(interpreter, k):
    torch.manual_seed(6)
    x = torch.randn(5, k, dtype=torch.bfloat16) * 3
    weight = torch.rand(k, dtype=torch.bfloat16) + 0.5
    got = gemv.rms_norm_rows(x, weight, 1e-6)
    # Both round twice (the normalised row, its product with the weight); the interpreter truncates (a step each),
    # torch rounds to nearest, and a step of the normalised value is up to two of the product's (weight >= 0.5).
    assert_within_steps(got, ops.rms_norm(x, weight, 1e-6), dtype=torch.bfloat16, steps=6)
    assert not torch.equal(got, x)


def _int8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight as quantize.py makes it (torchao's weight-only Int8Tensor of a random bf16 (n, k) weight) and
    its value in fp32 (values x row scales)."""
    pytest.importorskip("torchao")
    from longllama import quantize

    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    quantize._torchao()[0](layer, quantize._int8_config())
    values, scales = quantize.int8_rows(layer.weight)
    assert values.dtype == torch.int8 and scales.shape == (n, 1)
    return layer.weight, values.float() * scales


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_matrix_vector_kernels_read_int8_weights(interpreter, rows):
    """int8 weights (one scale per output row) go to the same kernels, read as int8 and scaled after the sum: each
    result against the fp32 product with the dequantized weight, one bf16 store (and the bf16 roundings of the
    unfused definition: _assert_close_in_bf16)."""
    torch.manual_seed(4)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
    (q, qf), (k, kf), (v, vf), (up, upf) = (_int8(n, 96, seed) for seed, n in enumerate((48, 12, 12, 48)))
    kw = dict(cpu=True, max_rows=16)
    assert gemv.applies(x, q, k, v, **kw)
    assert not gemv.applies(x, q, torch.randn(12, 96, dtype=torch.bfloat16), **kw)  # int8 and plain: no one launch
    xf = x.float()
    _assert_close_in_bf16(
        gemv.linear_stacked(x, (q, k, v), **kw), torch.cat([F.linear(xf, w) for w in (qf, kf, vf)], -1)
    )
    residual = torch.randn(rows, 1, 48, dtype=torch.bfloat16)
    _assert_close_in_bf16(gemv.linear(x, q, residual=residual, **kw), residual.float() + F.linear(xf, qf))
    _assert_swiglu_close(gemv.linear_swiglu(x, q, up, **kw), xf, qf, upf)
    norm = (torch.rand(96, dtype=torch.bfloat16) + 0.5, 1e-6)
    normed = ops.rms_norm(x * 3, *norm).float()
    _assert_close_in_bf16(gemv.linear(x * 3, q, norm=norm, **kw), F.linear(normed, qf))
    _assert_swiglu_close(gemv.linear_swiglu(x * 3, q, up, norm=norm, **kw), normed, qf, upf)


def _decode(model, ids, kernels_on: bool, **kwargs):
    """A static decode with the Triton step on or off (the plan's decode_kernels; CPU tensors to the kernels in the
    interpreter); checks that the kernels ran exactly when asked for."""
    real_attend = decode_attention.attend
    calls = []

    def attend(*args, **kwargs):
        calls.append(1)
        return real_attend(*args, **kwargs)

    model.set_plan(interpret_kernels=True, decode_kernels=kernels_on)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_attention, "attend", attend)
        out = model.generate(ids, decoder="static", output_scores=True, return_dict_in_generate=True, **kwargs)
    assert bool(calls) == kernels_on
    return out


@pytest.mark.parametrize(
    "overrides", [{}, dict(num_key_value_heads=2), dict(mem_positionals=False), dict(mem_top_k=4), dict(hidden_size=80)]
)  # head_dim 20: rows padded to 24
def test_static_decoding_with_kernels_equals_without(interpreter, overrides):
    model = sharp_tiny(attn_impl="fast", **overrides)
    ids = torch.randint(3, 320, (1, 150))
    with torch.no_grad():
        plain = _decode(model, ids, False, max_new_tokens=40, last_context_length=40)  # crosses a flush
        fast = _decode(model, ids, True, max_new_tokens=40, last_context_length=40)
    assert torch.equal(plain.sequences, fast.sequences)
    assert (torch.stack(plain.scores) - torch.stack(fast.scores)).abs().max() < 1e-4
    for la, lb in zip(plain.cache.to_legacy(), fast.cache.to_legacy()):
        for x, y in zip(la, lb):
            assert x.shape == y.shape and (x.numel() == 0 or (x.float() - y.float()).abs().max() < 1e-5)


def test_static_decoding_with_kernels_in_bf16(interpreter, bf16_cpu_attention):
    # Both decode along the plain path's tokens (a near-tie may go either way in bf16), against fp32 maths on the
    # same (bf16-valued) weights. The kernels store their bf16 results where the plain path rounds, but each store
    # errs up to STORE_STEPS instead of half a step (twice the plain path's error), and the two paths round at
    # different points (twice again): within 4x the plain path's own distance to fp32 (measured 2.7x).
    model = sharp_tiny(attn_impl="fast").to(torch.bfloat16)
    ids = torch.randint(3, 320, (1, 100))
    with torch.no_grad():
        plain = _decode(model, ids, False, max_new_tokens=8, output_logits=True)
        forced = dict(logits_processor=[ForcedTokens(plain.sequences)], output_logits=True, max_new_tokens=8)
        fast = _decode(model, ids, True, **forced)
        exact = copy.deepcopy(model).float()
        exact.config.attn_impl = "eager"
        reference = exact.generate(ids, decoder="dynamic", return_dict_in_generate=True, **forced)
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(reference.sequences, plain.sequences)
    plain_logits, fast_logits, exact_logits = (torch.stack(out.logits)[1:] for out in (plain, fast, reference))
    plain_error = (plain_logits - exact_logits).abs().max()  # step 0 is the prompt's, the same on both paths
    assert 0 < plain_error and (fast_logits - exact_logits).abs().max() <= 4 * plain_error


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A weight quantized by quantize_model as fp32 values, from the parts the kernels read."""
    from longllama import int4, quantize

    rows = quantize.int8_rows(weight)
    if rows is not None:
        return rows[0].float() * rows[1]
    parts = quantize.int4_parts(weight)
    return int4.dequantize(*parts).float() if parts is not None else weight.float()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_static_decoding_reads_quantized_weights_in_the_kernels(interpreter, bf16_cpu_attention, quantization):
    """A model with int8 or int4 weights (quantize_model) decodes through the matrix-vector kernels, which read the
    int8 rows and scales (quantize.int8_rows) or the int4 codes, scales and offsets (quantize.int4_parts) in place,
    against the weights' own products (no kernels) and fp32 maths on the dequantized weights: along the same tokens,
    within 4x the unfused path's own distance to fp32 (as the bf16 test above)."""
    pytest.importorskip("torchao")
    from longllama import quantize

    model = sharp_tiny(attn_impl="fast").to(torch.bfloat16)
    exact = copy.deepcopy(model).float()
    exact.config.attn_impl = "eager"
    quantize.quantize_model(model, quantization)
    with torch.no_grad():
        for name, module in quantize.quantized_linears(model):
            exact.get_submodule(name).weight.copy_(_dequantized(module.weight))
    launched = []
    real = gemv._stacked
    ids = torch.randint(3, 320, (1, 100))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemv, "_stacked", lambda *a, **kw: launched.append(1) or real(*a, **kw))
        model.set_plan(interpret_kernels=False)
        plain = model.generate(
            ids, decoder="static", max_new_tokens=5, return_dict_in_generate=True, output_logits=True
        )
        assert not launched
        forced = dict(logits_processor=[ForcedTokens(plain.sequences)], output_logits=True, max_new_tokens=5)
        fast = _decode(model, ids, True, **forced)
        assert launched
        reference = exact.generate(ids, decoder="dynamic", return_dict_in_generate=True, **forced)
    assert torch.equal(fast.sequences, plain.sequences)
    plain_logits, fast_logits, exact_logits = (torch.stack(out.logits)[1:] for out in (plain, fast, reference))
    plain_error = (plain_logits - exact_logits).abs().max()
    assert 0 < plain_error and (fast_logits - exact_logits).abs().max() <= 4 * plain_error


def test_static_decoding_reads_the_chosen_blocks_in_the_kernels(interpreter, monkeypatch):
    """Block retrieval in the Triton step: the chosen blocks (retrieval.step_blocks), gathered, are the memory the
    decoding kernel reads; the same tokens and scores as the general step, which reads them through
    retrieval.attend."""
    model = sharp_tiny(attn_impl="fast", mem_retrieval="blocks", mem_blocks=2, mem_block_size=8)
    ids = torch.randint(3, 320, (1, 144))  # 104 memory keys, 168 after the flush: whole blocks, as the kernel takes
    budget = model.plan.mem_blocks * model.plan.mem_block_size
    read = []
    real = decode_attention.attend

    def attend(q, keys, values, slot, memory=None, *args, **kwargs):
        read.append(None if memory is None else memory[0].shape[2])
        return real(q, keys, values, slot, memory, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "attend", attend)
    with torch.no_grad():
        plain = _decode(model, ids, False, max_new_tokens=40, last_context_length=40)  # crosses a flush
        fast = _decode(model, ids, True, max_new_tokens=40, last_context_length=40)
    assert budget in read  # memory layers read `budget` gathered keys, not their whole memory
    assert torch.equal(plain.sequences, fast.sequences)
    assert (torch.stack(plain.scores) - torch.stack(fast.scores)).abs().max() < 1e-4


def test_kernels_only_where_they_can_run():
    assert not kernels.usable(torch.zeros(1))  # CPU tensors unless asked for (and only in the interpreter)
    assert not decode_attention.applies(torch.zeros(1))
    assert kernels.usable(torch.zeros(1), cpu=True) == kernels.interpreting()


def test_the_static_decoder_takes_the_kernels_only_where_the_plan_says(interpreter, monkeypatch):
    model = sharp_tiny(attn_impl="fast")
    ids = torch.randint(3, 320, (1, 100))
    calls = []
    real = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    with torch.no_grad():
        model.generate(ids, decoder="static", max_new_tokens=3)  # CPU tensors, a plan without interpret_kernels
        assert not calls
        model.set_plan(interpret_kernels=True)
        model.generate(ids, decoder="static", max_new_tokens=3)
        assert calls
        calls.clear()
        model.config.attn_impl = "eager"  # the exact path decodes without them
        model.generate(ids, decoder="static", max_new_tokens=3)
    assert model.plan.interpret_kernels and not calls


def test_the_decoding_split_comes_from_the_plan(interpreter, monkeypatch):
    model = sharp_tiny(attn_impl="fast")
    ids = torch.randint(3, 320, (1, 100), generator=torch.Generator().manual_seed(4))
    seen = []
    real = decode_attention.attend
    monkeypatch.setattr(
        decode_attention, "attend", lambda *a, **k: seen.append((k["programs"], k["min_chunk"])) or real(*a, **k)
    )
    model.set_plan(interpret_kernels=True)
    with torch.no_grad():
        default = model.generate(ids, decoder="static", max_new_tokens=4)
        assert set(seen) == {(4096, 64)}
        seen.clear()
        model.set_plan(decode_programs=16, decode_min_chunk=8)  # many small chunks: the same softmax
        many = model.generate(ids, decoder="static", max_new_tokens=4)
    assert set(seen) == {(16, 8)}
    assert torch.equal(default, many)


def test_a_failing_kernel_falls_back_to_the_general_step(interpreter, monkeypatch, caplog):
    model = sharp_tiny(attn_impl="fast")
    ids = torch.randint(3, 320, (1, 100))
    with torch.no_grad():
        plain = _decode(model, ids, False, max_new_tokens=6)

        def broken(*args):
            raise RuntimeError("no Triton compiler here")

        monkeypatch.setattr(decode_attention, "attend", broken)
        model.set_plan(interpret_kernels=True, decode_kernels=True)
        fallen = model.generate(
            ids, decoder="static", max_new_tokens=6, output_scores=True, return_dict_in_generate=True
        )
    assert torch.equal(plain.sequences, fallen.sequences)
    assert sum("Triton step failed" in r.message for r in caplog.records) == 1


def test_split_attention_reads_no_column_past_the_next_multiple_of_16(interpreter):
    # A memory stored 128 wide for head_dim 100 (a plan's memory_width 64): columns 112..127 are never read, so
    # NaN there changes nothing, and the result is that of the memory stored 112 wide.
    torch.manual_seed(3)
    b, h, d, window, m = 1, 2, 100, 16, 70
    q = torch.randn(b, h, d)
    keys, values = (F.pad(torch.randn(b, h, window, d), (0, 4)) for _ in range(2))
    mem = [torch.randn(b, h, m, d) for _ in range(2)]
    narrow = [F.pad(x, (0, 12)) for x in mem]
    wide = [F.pad(x, (0, 28)) for x in mem]
    for x in wide:
        x[..., 112:] = float("nan")
    a = decode_attention.attend(q, keys, values, torch.tensor([9]), tuple(narrow))
    b_ = decode_attention.attend(q, keys, values, torch.tensor([9]), tuple(wide))
    assert torch.isfinite(b_).all() and torch.equal(a, b_)
    assert (a - _reference_attention(q, keys, values, 10, *mem)).abs().max() < 1e-5


def test_static_decoding_over_a_wider_stored_memory(interpreter, monkeypatch):
    # Memory rows stored 64 wide for head_dim 40 (as 128 for 100): decoding with the kernels equals the general step.
    # On the CPU a plan stores rows of 8: a stand-in gives the width a GPU plan with memory_width 64 gives.
    assert ExecutionPlan(device="cuda", memory_width=64).memory_storage_dim(40) == 64
    monkeypatch.setattr(ExecutionPlan, "memory_storage_dim", lambda self, head_dim: 64)
    model = sharp_tiny(attn_impl="fast", hidden_size=160)  # 4 heads of 40
    ids = torch.randint(3, 320, (1, 150))
    with torch.no_grad():
        plain = _decode(model, ids, False, max_new_tokens=30, last_context_length=40)
        fast = _decode(model, ids, True, max_new_tokens=30, last_context_length=40)
    assert {layer.memory.storage_dim for layer in fast.cache.layers if layer.memory is not None} == {64}
    assert torch.equal(plain.sequences, fast.sequences)
    assert (torch.stack(plain.scores) - torch.stack(fast.scores)).abs().max() < 1e-4


@pytest.mark.parametrize("batch_cos", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_pad_kernel_equals_the_function(interpreter, batch_cos, dtype):
    torch.manual_seed(0)
    b, n, h, hkv, d, width = 2, 7, 4, 2, 20, 24
    q, k, v = (torch.randn(b, n, heads, d, dtype=dtype) for heads in (h, hkv, hkv))
    cos, sin = (torch.randn(batch_cos, 1, n, d, dtype=dtype).transpose(1, 2) for _ in range(2))  # as the model has them
    for rotate in (True, False):
        assert fused.kernel_rope_pad(q, k, v, cos, sin, width, rotate) is None  # CPU tensors: only when asked
        got = fused.kernel_rope_pad(q, k, v, cos, sin, width, rotate, cpu=True)
        want = ops.rope_pad(*(t.float() for t in (q, k, v, cos, sin)), width, rotate)
        assert got is not None
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype and g.is_contiguous()
            # rotated in fp32 (1e-5, as in fp32), then stored once in `dtype`
            assert_within_steps(g, w, dtype=dtype, steps=0 if dtype == torch.float32 else STORE_STEPS, atol=1e-5)
            assert not g[..., d:].any()
    assert fused.kernel_rope_pad(q, k.transpose(1, 2), v, cos, sin, width, True, cpu=True) is None  # not contiguous
