"""The Triton kernels of the elementwise functions (fast/elementwise_kernels.py, run by Triton's interpreter on the
CPU) give ops.py's results, within the rounding steps where they round in another order; and the default fast
path uses them, not torch.compile."""

import pytest
import torch
from conftest import assert_within_steps

from longllama import LongLlamaForCausalLM, ops, timings
from longllama.config import preset
from longllama.fast import fused
from longllama.plan import ExecutionPlan, build_plan

# float16, not bfloat16, for the rounding checks: Triton's interpreter truncates fp32 -> bf16 conversions (a GPU
# rounds them to nearest), which would move results by a step that a GPU never sees.
DTYPES = [torch.float32, torch.float16]


def _fp32(fn, *args):
    """fn on fp32 copies of its tensor arguments: the unrounded result the kernels round once."""
    return fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 7, 256), (2, 1, 48)])
def test_rms_norm_and_its_residual_add(dtype, shape):
    torch.manual_seed(0)
    x, a = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    got = fused.kernel_rms_norm(x, weight, 1e-6, cpu=True)
    want = ops.rms_norm(x, weight, 1e-6)
    assert got.dtype == want.dtype
    # the same two roundings (the normalised row, then its product with the weight); the sum of squares in
    # another order may move the first by a step, which the weight (~1) carries into the second
    assert_within_steps(got, want, dtype=dtype, steps=2 if dtype == torch.float16 else 64)
    total, normed = fused.kernel_add_rms_norm(x, a, weight, 1e-6, cpu=True)
    want_total, want_normed = ops.add_rms_norm(x, a, weight, 1e-6)
    assert torch.equal(total, want_total)  # one rounded addition, both ways
    assert_within_steps(normed, want_normed, dtype=dtype, steps=2 if dtype == torch.float16 else 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    torch.manual_seed(0)
    gate, up = (4 * torch.randn(3, 50, 70)).to(dtype), torch.randn(3, 50, 70).to(dtype)
    got = fused.kernel_swiglu(gate, up, cpu=True)
    # silu rounded to the dtype, then the rounded product: 1 step from the plain function's pair of roundings,
    # where exp's last bits differ
    assert_within_steps(got, ops.swiglu(gate, up), dtype=dtype, steps=1, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_rows", [1, 2])
def test_rotate_with_broadcast_tables_and_strided_input(dtype, cos_rows):
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 9, 12
    x = torch.randn(b, n, h, d).to(dtype).transpose(1, 2)  # (b, h, n, d), not contiguous: a view of the projection
    cos, sin = torch.randn(cos_rows, 1, n, d).to(dtype), torch.randn(cos_rows, 1, n, d).to(dtype)
    got = fused.kernel_rotate(x, cos, sin, cpu=True)
    want = _fp32(ops.rotate, x, cos, sin)  # the kernel rounds once, from fp32
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    assert_within_steps(got, want, dtype=dtype, steps=0.5, atol=1e-6)
    assert fused.kernel_rotate(x[..., :11], cos[..., :11], sin[..., :11], cpu=True) is None  # odd: plain function


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_heads_with_and_without_more_parts(dtype):
    torch.manual_seed(0)
    b, h, n, w, hd = 3, 4, 10, 16, 12
    out, mem_out = torch.randn(b, h, n, w).to(dtype), torch.randn(b, h, n, w).to(dtype)
    lse, mem_lse = 3 * torch.randn(b, h, n), 3 * torch.randn(b, h, n)
    got = fused.kernel_merge_heads(out, lse, mem_out, mem_lse, hd, cpu=True)
    want = ops.merge_heads(out, lse, mem_out, mem_lse, hd)
    assert got.shape == (b, n, h * hd) and got.dtype == dtype
    assert_within_steps(got, want, dtype=dtype, steps=1, atol=1e-5)  # fp32 maths in another order, one rounding
    extra, extra_lse = torch.randn(b - 1, h, n, w).to(dtype), torch.randn(b - 1, h, n)  # rows 1.. only
    more = ((extra, extra_lse),)
    got = fused.kernel_merge_heads(out, lse, mem_out, mem_lse, hd, more, cpu=True)
    assert_within_steps(got, ops.merge_heads(out, lse, mem_out, mem_lse, hd, more), dtype=dtype, steps=1, atol=1e-5)


def test_the_kernels_apply_only_where_they_can():
    x = torch.randn(2, 4, 8)
    w = torch.ones(8)
    assert fused.kernel_rms_norm(x, w, 1e-6) is None  # a CPU tensor without the interpreter's flag
    assert fused.kernel_rms_norm(x.transpose(0, 1), w, 1e-6, cpu=True) is None  # not contiguous
    assert fused.kernel_rms_norm(x, torch.ones(4), 1e-6, cpu=True) is None  # a weight of another size
    assert fused.kernel_swiglu(x, x.double(), cpu=True) is None  # dtypes that differ
    assert fused.kernel_rms_norm(x.long(), w, 1e-6, cpu=True) is None


def test_the_default_fast_path_uses_the_kernels_and_compiles_nothing(monkeypatch):
    from longllama.fast import flash4

    monkeypatch.setattr(flash4, "installed_for", lambda device: False)
    gpu = build_plan(preset("tiny"), "cuda")
    assert gpu.attention == "fast" and not gpu.compile and gpu.elementwise_kernels
    assert build_plan(preset("tiny", compile_elementwise=True), "cuda").compile  # asked for: compiled
    with torch.no_grad():
        assert fused.ops_for(gpu) is fused.with_kernels()
        assert fused.ops_for(gpu.replace(compile=True)) is fused.compiled()
        assert fused.ops_for(gpu.replace(elementwise_kernels=False)) is ops.EAGER
        assert fused.ops_for(ExecutionPlan(attention="fast")) is ops.EAGER  # CPU tensors: no kernel takes them
    with torch.enable_grad():
        assert fused.ops_for(gpu) is ops.EAGER  # training: the plain functions


@pytest.mark.parametrize("top_k,batch", [(None, 1), (None, 2)])
def test_model_with_the_kernels_equals_the_plain_functions(top_k, batch, monkeypatch):
    from longllama.fast import kernels

    monkeypatch.setattr(kernels, "_launched", set())  # as in a new process: every first launch reported
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", attn_impl="fast", mem_top_k=top_k)).eval()
    ids = torch.randint(3, 320, (batch, 150))
    start = timings.mark()
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        plain_tokens = model.generate(ids, max_new_tokens=6, decoder="static")
        model.set_plan(interpret_kernels=True, decode_kernels=False)
        assert fused.ops_for(model.plan) is fused.with_kernels(cpu=True)
        got = model(ids, use_cache=False).logits
        got_tokens = model.generate(ids, max_new_tokens=6, decoder="static")
    assert (got - plain).abs().max() < 1e-4  # fp32: sums in another order
    assert torch.equal(got_tokens, plain_tokens)
    compiled = [e.name for e in timings.since(start) if e.kind == "compile"]
    assert any(name.startswith("triton rms_norm") for name in compiled)  # first launches are reported
    assert any(name.startswith("triton swiglu") for name in compiled)
    assert not any(name.startswith("torch.compile") for name in compiled)
