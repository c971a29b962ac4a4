"""The Triton kernels of gemv.py (imported only where they run: this module imports Triton)."""

import triton
import triton.language as tl

from longllama.fast import kernels, tables

# Down to one output row per program: 3200 rows in 8-row blocks are 400 programs, which 132 SMs share
# unevenly (3 or 4 each); small blocks even the load out.
_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for n in (1, 2, 4, 8, 16)
    for k in (256, 512, 1024)
    for w in (2, 4, 8)
    if n * k <= 8192
]
_KEY = ["N", "K", "M", "NORM"]


@triton.jit
def inv_rms(x_ptr, row, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of row `row` of x (fp32), as rms_norm computes it."""
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        sq += x * x
    return 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)


@triton.jit
def x_block(x_ptr, nw_ptr, row, ks, inv, K: tl.constexpr, NORM: tl.constexpr):
    """Columns ks of row `row` of x in fp32; with NORM, of rms_norm(x) * weight, rounded where rms_norm rounds
    (the normalised row, then its product with the weight, in the activation dtype)."""
    x = tl.load(x_ptr + row * K + ks, mask=ks < K, other=0.0)
    if NORM:
        xn = (x.to(tl.float32) * inv).to(x.dtype)
        nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0)
        x = (nw.to(tl.float32) * xn.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def gemv_kernel(
    x_ptr,
    nw_ptr,
    eps,
    w_ptr,
    off1,
    off2,
    r_ptr,
    y_ptr,
    M,
    N,
    N0,
    N1,
    K: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Output rows [0, N0) come from the weight at w_ptr, [N0, N0 + N1) from the one off1 elements after it,
    # the rest from the one off2 elements after it (the stacked weights need not be adjacent in memory).
    pid = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c64 = cols.to(tl.int64)
    base = tl.where(
        cols < N0,
        c64 * K,
        tl.where(cols < N0 + N1, off1.to(tl.int64) + (c64 - N0) * K, off2.to(tl.int64) + (c64 - N0 - N1) * K),
    )
    inv = inv_rms(x_ptr, row, eps, K, BLOCK_K) if NORM else 1.0
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every load in flight at once
        ks = k0 + tl.arange(0, BLOCK_K)
        x = x_block(x_ptr, nw_ptr, row, ks, inv, K, NORM)
        w = tl.load(w_ptr + base[:, None] + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if RESIDUAL:  # rounded as the unfused residual + linear(x): the product first, then the sum
        r = tl.load(r_ptr + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def gemv_swiglu_kernel(
    x_ptr,
    nw_ptr,
    eps,
    g_ptr,
    u_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    inv = inv_rms(x_ptr, row, eps, K, BLOCK_K) if NORM else 1.0
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every load in flight at once
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (cols[:, None] < N) & (ks[None, :] < K)
        x = x_block(x_ptr, nw_ptr, row, ks, inv, K, NORM)
        g = tl.load(g_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
        acc_g += g.to(tl.float32) * x[None, :]
        acc_u += u.to(tl.float32) * x[None, :]
    # Rounded to the activation dtype before the SwiGLU, as the unfused path rounds its two products.
    g = tl.sum(acc_g, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=cols < N)


gemv = kernels.Kernel("gemv", gemv_kernel, _CONFIGS, _KEY, tables.GEMV, tables.gemv_rule)
gemv_swiglu = kernels.Kernel(
    "gemv_swiglu", gemv_swiglu_kernel, _CONFIGS, _KEY, tables.GEMV_SWIGLU, tables.gemv_swiglu_rule
)
