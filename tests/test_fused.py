"""compile_elementwise: RMSNorm, RoPE, SwiGLU and padding through torch.compile give the eager results (CPU); the
Triton kernels that serve them by default are tested in test_elementwise_kernels.py."""

import os

import pytest
import torch
from conftest import assert_within_steps

from longllama import LongLlamaForCausalLM, ops
from longllama.config import preset
from longllama.fast import attention, fused, gemv
from longllama.fast.attention import resolve_kernel
from longllama.plan import ExecutionPlan, build_plan


@pytest.mark.parametrize("top_k,batch", [(None, 1), (4, 1), (None, 3)])
def test_compiled_elementwise_equals_eager_in_forward_and_decoding(top_k, batch):
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", attn_impl="fast", mem_top_k=top_k)).eval()
    ids = torch.randint(3, 320, (batch, 200))  # batch 3: rows dynamic in the compiled functions (from 2 rows)
    with torch.no_grad():
        assert fused.ops_for(model.plan) is ops.EAGER
        eager = model(ids, use_cache=False).logits
        eager_tokens = model.generate(ids, max_new_tokens=12, decoder="static")
        model.set_plan(compile=True)
        assert fused.ops_for(model.plan) is fused.compiled()
        compiled = model(ids, use_cache=False).logits
        compiled_tokens = model.generate(ids, max_new_tokens=12, decoder="static")
    assert (compiled - eager).abs().max() < 1e-5
    assert torch.equal(compiled_tokens, eager_tokens)


def test_compiled_only_for_inference_and_only_where_asked(monkeypatch):
    config = preset("tiny", compile_elementwise=True, attn_impl="fast")
    plan = build_plan(config, "cpu")
    assert plan.compile
    with torch.enable_grad():
        assert fused.ops_for(plan) is ops.EAGER  # training: never
    with torch.no_grad():
        assert fused.ops_for(plan) is fused.compiled()
        assert fused.ops_for(plan.replace(gemv_max_rows=2, interpret_kernels=True)) is fused.compiled(
            rope_kernel=True, gemv_max_rows=2, cpu=True
        )  # one set per choice of the kernels' options
        assert preset("tiny").compile_elementwise == "auto"
        assert fused.ops_for(build_plan(preset("tiny", attn_impl="fast"), "cpu")) is ops.EAGER
        assert fused.ops_for(plan.replace(attention="eager")) is ops.EAGER  # the exact paths stay unfused
        assert fused.ops_for(plan.replace(attention="sdpa")) is ops.EAGER
        assert ExecutionPlan(device="cuda").compile is False  # a plan's own default: not compiled
    # only True compiles: "auto" leaves GPUs to the Triton kernels (the plan is built from the config for the
    # device; no GPU is asked whether FlashAttention 4 serves it).
    from longllama.fast import flash4

    monkeypatch.setattr(flash4, "installed_for", lambda device: False)
    assert not build_plan(preset("tiny"), "cuda").compile and not build_plan(preset("tiny"), "cpu").compile
    assert build_plan(preset("tiny", compile_elementwise=True), "cuda").compile
    assert not build_plan(preset("tiny", compile_elementwise=False), "cuda").compile


def test_compile_setting_is_checked():
    from longllama.config import ConfigError

    with pytest.raises(ConfigError, match="compile_elementwise"):
        preset("tiny", compile_elementwise="sometimes")


def test_a_failing_compile_falls_back_to_the_plain_function(caplog):
    def broken(*args):
        raise RuntimeError("no compiler here")

    call = fused._guarded("rotate", ops.rotate, broken)
    x, cos, sin = torch.randn(1, 1, 3, 4), torch.ones(3, 4), torch.zeros(3, 4)
    assert torch.equal(call(x, cos, sin), x)
    assert torch.equal(call(x, cos, sin), x)
    assert sum("running it unfused" in r.message for r in caplog.records) == 1


def test_fused_functions_match_their_definitions():
    torch.manual_seed(0)
    x, a = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w = torch.randn(16)
    h, normed = ops.add_rms_norm(x, a, w, 1e-6)
    assert torch.equal(h, x + a)
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert (normed - ref).abs().max() < 1e-5
    padded = ops.pad_to(x, 24)
    assert padded.shape == (2, 5, 24) and torch.equal(padded[..., :16], x) and not padded[..., 16:].any()
    assert ops.pad_to(x, 16) is x


def test_row_wise_functions_see_one_batch_of_rows_and_give_the_callers_shapes():
    seen = []

    def spy(*args):  # what the compiled function is called with
        seen.append([a.shape for a in args if isinstance(a, torch.Tensor)])
        return ops.add_rms_norm(*args) if len(args) == 4 else ops.swiglu(*args)

    call = fused._as_rows(spy)
    torch.manual_seed(0)
    x, a, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(16)
    h, normed = call(x, a, w, 1e-6)
    want_h, want_normed = ops.add_rms_norm(x, a, w, 1e-6)
    assert torch.equal(h, want_h) and torch.equal(normed, want_normed)
    assert seen[-1] == [(1, 15, 16), (1, 15, 16), (16,)]
    gate, up = torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    assert torch.equal(call(gate, up), ops.swiglu(gate, up)) and seen[-1] == [(1, 8, 24), (1, 8, 24)]
    call(gate[:1], up[:1])  # one sequence already is one batch of rows
    assert seen[-1] == [(1, 4, 24), (1, 4, 24)]


def test_auto_kernel_needs_cuda_bf16_and_a_supported_head_dim():
    assert resolve_kernel(torch.zeros(1, 1, 1, 104), "auto") == "flash"  # CPU tensors: no cuDNN
    assert resolve_kernel(torch.zeros(1, 1, 1, 104), "cudnn") == "cudnn"


def test_decoding_products_fall_back_to_torch_off_the_gpu():
    torch.manual_seed(0)
    x, w, u = torch.randn(1, 1, 16), torch.randn(24, 16), torch.randn(24, 16)
    assert not gemv.applies(x, w)  # CPU tensors: no Triton kernel
    assert torch.equal(gemv.linear(x, w), torch.nn.functional.linear(x, w))
    expected = torch.nn.functional.silu(x @ w.T) * (x @ u.T)
    assert (gemv.linear_swiglu(x, w, u) - expected).abs().max() < 1e-6
    assert torch.equal(fused.compiled().linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_residual_is_added_inside_the_product_for_many_rows(dtype):
    torch.manual_seed(0)
    x, w, r = torch.randn(2, 50, 64, dtype=dtype), torch.randn(24, 64, dtype=dtype), torch.randn(2, 50, 24, dtype=dtype)
    got = gemv.linear(x, w, residual=r)
    want = r.double() + x.double() @ w.double().T
    assert got.shape == r.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert (got.double() - want).abs().max() <= 1e-4
    else:  # addmm: the fp32 sum of 65 terms (within 65 fp32 eps of their scale), rounded once to bf16 (half a step)
        scale = r.double().abs() + x.double().abs() @ w.double().abs().T
        assert_within_steps(got, want, dtype=dtype, steps=0.5, atol=65 * torch.finfo(torch.float32).eps * scale)
    mixed = gemv.linear(x, w, residual=r.double())  # another dtype: added after the product, in the residual's
    assert mixed.dtype == torch.float64 and torch.equal(mixed, r.double() + torch.nn.functional.linear(x, w))


def test_rope_pad_and_merge_heads_match_their_definitions():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, 6), torch.randn(2, 5, 2, 6), torch.randn(2, 5, 2, 6)
    cos, sin = torch.randn(1, 5, 1, 6), torch.randn(1, 5, 1, 6)
    qp, kp, vp = ops.rope_pad(q, k, v, cos, sin, 8, True)
    assert qp.shape == (2, 5, 4, 8) and kp.shape == vp.shape == (2, 5, 2, 8)
    assert torch.equal(qp[..., :6], ops.rotate(q, cos, sin)) and torch.equal(kp[..., :6], ops.rotate(k, cos, sin))
    assert torch.equal(vp[..., :6], v) and not any(t[..., 6:].any() for t in (qp, kp, vp))
    assert torch.equal(ops.rope_pad(q, k, v, cos, sin, 8, False)[0][..., :6], q)  # no rotation asked
    out, mem_out = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    lse, mem_lse = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    got = ops.merge_heads(out, lse, mem_out, mem_lse, 6)
    want = ops.merge_partials(out[..., :6], lse, mem_out[..., :6], mem_lse).transpose(1, 2).reshape(2, 5, 24)
    assert got.shape == (2, 5, 24) and (got - want).abs().max() < 1e-6
    assert torch.equal(ops.heads(out, 6), out[..., :6].transpose(1, 2).reshape(2, 5, 24))


@pytest.mark.parametrize("compiled", [False, True])
def test_merge_heads_adds_partials_over_more_keys_for_the_last_rows(compiled):
    """A window group split in two memory calls (flash4.group_attention): the second covers rows 1.. only."""
    torch.manual_seed(0)
    b, h, n, d = 3, 2, 5, 6
    q = torch.randn(b, h, n, d)
    local, mem, extra = (torch.randn(b, h, s, d) for s in (n, 7, 4))
    want = []
    for i in range(b):  # one softmax over the local keys, the memory and (rows 1..) the extra keys
        keys = torch.cat([local[i], mem[i]] + ([extra[i]] if i else []), 1)
        want.append(
            torch.softmax(q[i] @ keys.transpose(-1, -2), -1)
            @ torch.cat([local[i], mem[i]] + ([extra[i]] if i else []), 1)
        )
    want = torch.stack(want).transpose(1, 2).reshape(b, n, h * d)
    parts = [attention.partial_attention(q, keys, keys, causal=False, scale=1.0) for keys in (local, mem)]
    o2, l2 = attention.partial_attention(q[1:], extra[1:], extra[1:], causal=False, scale=1.0)
    merge = fused.compiled().merge_heads if compiled else ops.merge_heads
    got = merge(*parts[0], *parts[1], d, more=((o2, l2),))
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5


def test_compiled_functions_take_any_number_of_rows_from_two_in_one_graph():
    """A window group of 4 windows, then the last group of 3 or 2, then one window: no new compilation (the row-wise
    functions see (1, rows, features)); one token alone is its own graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    norm = fused.compiled().rms_norm
    weight = torch.nn.Parameter(torch.randn(16))
    before = counters["stats"]["unique_graphs"]
    graphs = []
    for rows, tokens in ((4, 8), (3, 8), (2, 8), (5, 8), (1, 8), (1, 1), (1, 1)):
        x = torch.randn(rows, tokens, 16)
        with torch.no_grad():
            got = norm(x, weight, 1e-6)
        assert (got - ops.rms_norm(x, weight, 1e-6)).abs().max() < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    if graphs[0] == before and os.environ.get("ATEN_CPU_CAPABILITY"):
        # Inductor's C++ code may not build below the CPU's best kernels ("'at::vec' has not been declared"): the
        # functions then run unfused for the process (test_a_failing_compile_falls_back_to_the_plain_function)
        pytest.skip(f"nothing compiled with ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}")
    assert [b - a for a, b in zip(graphs, graphs[1:])] == [0, 0, 0, 0, 1, 0]
