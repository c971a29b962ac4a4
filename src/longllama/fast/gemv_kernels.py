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
_ROWS_KEY = ["N", "K", "M"]  # the several-row kernels take rows normalised before them


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
def row_offsets(cols, off1, off2, N0, N1, K: tl.constexpr):
    """Element offset of each output column's weight row: columns [0, N0) in the weight at w_ptr, [N0, N0 + N1) in
    the one off1 elements after it, the rest in the one off2 elements after it (stacked weights need not be
    adjacent in memory)."""
    c64 = cols.to(tl.int64)
    return tl.where(
        cols < N0,
        c64 * K,
        tl.where(cols < N0 + N1, off1.to(tl.int64) + (c64 - N0) * K, off2.to(tl.int64) + (c64 - N0 - N1) * K),
    )


@triton.jit
def row_scales(s_ptr, cols, soff1, soff2, N, N0, N1):
    """The fp32 scale of each output column's int8 weight row (one per row, stacked as row_offsets stacks rows)."""
    return tl.load(s_ptr + row_offsets(cols, soff1, soff2, N0, N1, 1), mask=cols < N, other=0.0)


@triton.jit
def gemv_kernel(
    x_ptr,
    nw_ptr,
    eps,
    w_ptr,
    off1,
    off2,
    s_ptr,
    soff1,
    soff2,
    r_ptr,
    y_ptr,
    M,
    N,
    N0,
    N1,
    K: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    base = row_offsets(cols, off1, off2, N0, N1, K)
    inv = inv_rms(x_ptr, row, eps, K, BLOCK_K) if NORM else 1.0
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every load in flight at once
        ks = k0 + tl.arange(0, BLOCK_K)
        x = x_block(x_ptr, nw_ptr, row, ks, inv, K, NORM)
        w = tl.load(w_ptr + base[:, None] + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SCALED:
        y = y * row_scales(s_ptr, cols, soff1, soff2, N, N0, N1)
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
    gs_ptr,
    us_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,
    NORM: tl.constexpr,
    SCALED: tl.constexpr,
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
    g, u = tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)
    if SCALED:
        g = g * tl.load(gs_ptr + cols, mask=cols < N, other=0.0)
        u = u * tl.load(us_ptr + cols, mask=cols < N, other=0.0)
    # Rounded to the activation dtype before the SwiGLU, as the unfused path rounds its two products.
    g = g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=cols < N)


# The several-row kernels: tl.dot needs tiles of at least 16 in every dimension; the K loop is pipelined (num_stages).
# UPCAST (Triton's interpreter only, whose tl.dot misreads bf16 operands): the exact products in fp32 instead.
_ROWS_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n in (16, 32, 64)
    for k in (64, 128, 256)
    for w in (4, 8)
    for s in (2, 3, 4)
]


@triton.jit
def x_rows(x_ptr, rows, M, ks, K: tl.constexpr):
    """Columns ks of every row of x (BLOCK_M, BLOCK_K) in the activation dtype, zero past M."""
    return tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)


@triton.jit
def rms_norm_rows_kernel(x_ptr, nw_ptr, y_ptr, eps, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """rms_norm(x) * weight of row `program_id` (x_block's roundings), whole (BLOCK_K >= K): the several-row
    products take rows normalised before them."""
    row = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    x = x_block(x_ptr, nw_ptr, row, ks, inv_rms(x_ptr, row, eps, K, BLOCK_K), K, True)
    tl.store(y_ptr + row * K + ks, x.to(y_ptr.dtype.element_ty), mask=ks < K)


@triton.jit
def gemv_rows_kernel(
    x_ptr,
    w_ptr,
    off1,
    off2,
    s_ptr,
    soff1,
    soff2,
    r_ptr,
    y_ptr,
    M,
    N,
    N0,
    N1,
    K: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # gemv_kernel for up to BLOCK_M rows at once: each weight tile is read once and multiplied with every row
    # (fp32 sums of exact bf16 products, as there), instead of once per row.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    base = row_offsets(cols, off1, off2, N0, N1, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = x_rows(x_ptr, rows, M, ks, K)
        w = tl.load(w_ptr + base[:, None] + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        elif SCALED:  # int8 values are exact in bf16 and fp16
            w = w.to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    out = (rows[:, None] < M) & (cols[None, :] < N)
    y = acc
    if SCALED:
        y = y * row_scales(s_ptr, cols, soff1, soff2, N, N0, N1)[None, :]
    if RESIDUAL:  # rounded as the unfused residual + linear(x): the product first, then the sum
        r = tl.load(r_ptr + rows[:, None] * N + cols[None, :], mask=out, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def gemv_rows_swiglu_kernel(
    x_ptr,
    g_ptr,
    u_ptr,
    gs_ptr,
    us_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (cols[:, None] < N) & (ks[None, :] < K)
        x = x_rows(x_ptr, rows, M, ks, K)
        g = tl.load(g_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
        if UPCAST:
            x, g, u = x.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        elif SCALED:
            g, u = g.to(x.dtype), u.to(x.dtype)
        acc_g = tl.dot(x, tl.trans(g), acc_g)
        acc_u = tl.dot(x, tl.trans(u), acc_u)
    if SCALED:
        acc_g = acc_g * tl.load(gs_ptr + cols, mask=cols < N, other=0.0)[None, :]
        acc_u = acc_u * tl.load(us_ptr + cols, mask=cols < N, other=0.0)[None, :]
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    out = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], (silu * u).to(y_ptr.dtype.element_ty), mask=out)


gemv = kernels.Kernel("gemv", gemv_kernel, _CONFIGS, _KEY, tables.GEMV, tables.gemv_rule)
gemv_swiglu = kernels.Kernel(
    "gemv_swiglu", gemv_swiglu_kernel, _CONFIGS, _KEY, tables.GEMV_SWIGLU, tables.gemv_swiglu_rule
)
gemv_rows = kernels.Kernel("gemv_rows", gemv_rows_kernel, _ROWS_CONFIGS, _ROWS_KEY, {}, tables.gemv_rows_rule)
gemv_rows_swiglu = kernels.Kernel(
    "gemv_rows_swiglu", gemv_rows_swiglu_kernel, _ROWS_CONFIGS, _ROWS_KEY, {}, tables.gemv_rows_rule
)
