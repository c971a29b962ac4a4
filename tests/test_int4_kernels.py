"""The kernels that read int4 weights in place (fast/gemv_int4_kernels.py through fast/gemv.py), run by Triton's
interpreter on the CPU: products (one row and several), stacked, with the residual, the RMSNorm or the SwiGLU fused,
against fp32 maths on int4.dequantize's weights; and the dequantizing kernel against int4.dequantize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_steps, rounding_step

from longllama import ops
from longllama.fast import gemv

pytest.importorskip("triton")
pytest.importorskip("torchao")
from longllama import int4  # noqa: E402  (needs torchao)

# Triton's interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest): a kernel's bf16 store is up to
# one step (not half a step) from the fp32 value it computed. The dequantized weights are rounded to nearest there
# too (the kernels' ROUND), so they equal int4.dequantize's.
STORE_STEPS = 1
KW = dict(cpu=True, max_rows=16)


def _int4(n: int, k: int, group: int, seed: int, dtype=torch.bfloat16) -> tuple[int4.Int4Weight, torch.Tensor]:
    """An int4 weight (n, k) of a random one whose groups differ in spread and centre (a scale or offset read from
    the wrong group shows), and its dequantized value in fp32."""
    gen = torch.Generator().manual_seed(seed)
    spread = (torch.rand(n, k // group, generator=gen) * 1.5 + 0.1).repeat_interleave(group, 1)
    centre = (torch.randn(n, k // group, generator=gen) / 4).repeat_interleave(group, 1)
    weight = int4.Int4Weight.from_float((torch.randn(n, k, generator=gen) * spread + centre).to(dtype), group)
    return weight, int4.dequantize(weight.qdata, weight.scale, weight.offset, group).float()


def _product(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x w^T in fp32 and the bound its sums meet in any order: K 2^-24 sum_k |x_k w_k| (the kernels add the same
    exact products, in another order)."""
    x = x.float()
    return F.linear(x, w), x.shape[-1] * 2.0**-24 * F.linear(x.abs(), w.abs())


def _assert_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None):
    """got = [residual +] x w^T: the fp32 product, rounded once at the store (STORE_STEPS); with the residual, the
    product is rounded before the sum too (one step of it), as the unfused residual + linear(x)."""
    want, atol = _product(x, w)
    if residual is not None:
        atol = atol + rounding_step(torch.bfloat16, want)
        want = residual.float() + want
    assert_within_steps(got, want, dtype=torch.bfloat16, steps=STORE_STEPS, atol=atol)


def _assert_swiglu(got: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """got = silu(x gate^T) * (x up^T), whose two products and silu are rounded to bf16 before the last product
    (one step each; silu's slope is at most 1.1), then stored (STORE_STEPS)."""
    (g, g_atol), (u, u_atol) = _product(x, gate), _product(x, up)
    silu = F.silu(g)
    g_err = g_atol + rounding_step(torch.bfloat16, g)
    u_err = u_atol + rounding_step(torch.bfloat16, u)
    atol = u.abs() * (1.1 * g_err + rounding_step(torch.bfloat16, silu)) + (silu.abs() + 1.1 * g_err) * u_err
    assert_within_steps(got, silu * u, dtype=torch.bfloat16, steps=STORE_STEPS, atol=atol)


def _assert_close_in_bf16(got: torch.Tensor, want: torch.Tensor):
    """Within four bf16 steps at the reference's largest magnitude (as tests/test_decode_kernels.py): the fused
    RMSNorm rounds the normalised row and its product with the norm's weight by truncation here, rms_norm to
    nearest, so the two multiply slightly different rows."""
    assert_within_steps(got, want, dtype=torch.bfloat16, steps=4, magnitude=want.float().abs().max())


def _k(group: int) -> int:
    """K for a group: a whole number of groups that is no whole number of the kernels' 128-byte (one row) or 64-byte
    (several rows, group 32 and 64) steps."""
    return 384 if group == 128 else 320


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])  # a program per row; the several-row kernels (tl.dot, 16 rows)
def test_int4_products_equal_fp32_maths_on_the_dequantized_weights(interpreter, rows, group):
    k = _k(group)
    torch.manual_seed(rows)
    x = torch.randn(rows, 1, k, dtype=torch.bfloat16)
    # q's 44 rows end inside an 8-row block: that block reads q and k
    (q, qf), (kw, kf), (v, vf), (up, upf) = (_int4(n, k, group, seed) for seed, n in enumerate((44, 12, 12, 44)))
    assert gemv.applies(x, q, kw, v, **KW)
    stacked = gemv.linear_stacked(x, (q, kw, v), **KW)
    assert stacked.shape == (rows, 1, 68)
    _assert_product(stacked, x, torch.cat([qf, kf, vf]))
    _assert_product(gemv.linear(x, v, **KW), x, vf)
    residual = torch.randn(rows, 1, 44, dtype=torch.bfloat16)
    _assert_product(gemv.linear(x, q, residual=residual, **KW), x, qf, residual)
    _assert_swiglu(gemv.linear_swiglu(x, q, up, **KW), x, qf, upf)


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_products_with_the_rmsnorm_inside(interpreter, rows):
    torch.manual_seed(7)
    x = torch.randn(rows, 1, 320, dtype=torch.bfloat16) * 3
    (q, qf), (k, kf), (up, upf) = (_int4(n, 320, 64, seed) for seed, n in enumerate((44, 12, 44)))
    norm = (torch.rand(320, dtype=torch.bfloat16) + 0.5, 1e-6)
    normed = ops.rms_norm(x, *norm).float()
    _assert_close_in_bf16(gemv.linear(x, q, norm=norm, **KW), F.linear(normed, qf))
    _assert_close_in_bf16(gemv.linear_stacked(x, (q, k), norm=norm, **KW), F.linear(normed, torch.cat([qf, kf])))
    g, u = F.linear(normed, qf), F.linear(normed, upf)
    want = F.silu(g.bfloat16()) * u.bfloat16()
    magnitude = (u.abs() * (g.abs() + F.silu(g).abs())).max()  # a step of g or u moves the result by the other's
    assert_within_steps(
        gemv.linear_swiglu(x, q, up, norm=norm, **KW), want, dtype=torch.bfloat16, steps=4, magnitude=magnitude
    )


@pytest.mark.parametrize("rows", [1, 3])
def test_int4_products_in_fp16(interpreter, rows):
    """fp16 weights and activations: the kernels round with the plain conversion (the interpreter rounds fp32 to
    fp16 to nearest)."""
    torch.manual_seed(5)
    x = torch.randn(rows, 320, dtype=torch.float16)
    (q, qf), (up, upf) = (_int4(n, 320, 32, seed, torch.float16) for seed, n in enumerate((24, 24)))
    want, atol = _product(x, qf)
    assert_within_steps(gemv.linear(x, q, **KW), want, dtype=torch.float16, steps=STORE_STEPS, atol=atol)
    g, u = F.linear(x.float(), qf), F.linear(x.float(), upf)
    magnitude = (u.abs() * (g.abs() + F.silu(g).abs())).max()
    got = gemv.linear_swiglu(x, q, up, **KW)
    assert_within_steps(got, F.silu(g) * u, dtype=torch.float16, steps=4, magnitude=magnitude)


def test_applies_takes_int4_weights_of_one_kind_and_group(interpreter):
    """One launch reads weights of one kind: int4 with plain weights, or int4 of two group sizes, go to F.linear
    (through the tensor subclass), which computes the same product."""
    torch.manual_seed(8)
    x = torch.randn(1, 320, dtype=torch.bfloat16)
    (a, af), (b, bf) = _int4(16, 320, 32, 0), _int4(16, 320, 64, 1)
    plain = torch.randn(16, 320, dtype=torch.bfloat16)
    assert gemv.applies(x, a, **KW) and gemv.applies(x, b, **KW)
    assert not gemv.applies(x, a, plain, **KW)  # int4 and plain
    assert not gemv.applies(x, a, b, **KW)  # two group sizes
    assert not gemv.applies(x.half(), a, **KW)  # scales of another dtype than x
    assert not gemv.applies(x, a, **{**KW, "cpu": False})  # CPU tensors only when asked
    mixed = gemv.linear_stacked(x, (a, plain), **KW)
    torch.testing.assert_close(mixed, torch.cat([F.linear(x, a.dequantize()), F.linear(x, plain)], -1))
    two_groups = gemv.linear_stacked(x, (a, b), **KW)
    torch.testing.assert_close(two_groups, F.linear(x, torch.cat([af, bf]).bfloat16()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_kernel_equals_dequantize(interpreter, group, dtype):
    """Bitwise: both compute q * scale + offset in fp32 (the product exact: a 4-bit code times an 8- or 11-bit
    scale, so a fused multiply-add rounds the same) and round once to nearest. 40 rows and 320 or 384 columns:
    partial tiles of the kernel's 16 rows x 256 columns."""
    weight, _ = _int4(40, _k(group), group, 3, dtype)
    parts = (weight.qdata, weight.scale, weight.offset, group)
    got = gemv.dequantize_int4(*parts)
    assert got.dtype == dtype and torch.equal(got, int4.dequantize(*parts))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_rule_configurations_step_over_whole_groups(group):
    """The kernels need BLOCK_KB a power of two and a multiple of half a group (a step covers whole groups), for any
    shape the rules see (decoding shapes of the 3B and 7B models, and small ones)."""
    from longllama.fast import tables

    rules = (tables.gemv_int4_rule, tables.gemv_int4_rows_rule)  # the SwiGLU kernel takes gemv_int4_rule
    for n, k in ((12, 128), (96, 384), (9600, 3200), (3200, 8640), (32000, 3200), (11008, 4096), (4096, 11008)):
        if k % group:
            continue
        key = dict(N=n, K=k, M=1, NORM=True, G=group)
        for meta, _, _ in [rule(key, {}, "torch.bfloat16") for rule in rules] + [
            tables.dequantize_int4_rule(dict(N=n, K=k, G=group), {}, "torch.uint8")
        ]:
            kb = meta["BLOCK_KB"]
            assert kb & (kb - 1) == 0 and kb % (group // 2) == 0 and meta["BLOCK_N"] & (meta["BLOCK_N"] - 1) == 0
