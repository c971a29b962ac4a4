"""The Triton kernels of gemv.py that read int4 weights in place (int4.py's layout), and the one that dequantizes
them (imported only where they run: this module imports Triton).

A program reads a tile of packed bytes (BLOCK_N weight rows x BLOCK_KB bytes, 2 BLOCK_KB columns) and the scales
and offsets of the groups it covers, and makes two weight tiles in registers: the low nibbles (even columns) and
the high nibbles (odd columns), each multiplied with x's even or odd columns (x loaded whole and split in pairs), so
the weights need no interleaving shuffle.
Each weight is q * scale + offset in fp32 rounded once to the activation dtype, as int4.dequantize computes it.
"""

import triton
import triton.language as tl

from longllama.fast import kernels, tables
from longllama.fast.gemv_kernels import inv_rms, row_offsets, x_block, x_rows

# BLOCK_KB bytes per step: at least half of the largest group (128), so that a step covers whole groups.
_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w)
    for n in (1, 2, 4, 8, 16)
    for kb in (128, 256, 512)
    for w in (2, 4, 8)
    if n * kb <= 4096
]
_KEY = ["N", "K", "M", "NORM", "G"]
_ROWS_KEY = ["N", "K", "M", "G"]  # the several-row kernels take rows normalised before them


@triton.jit
def rounded(v, dtype: tl.constexpr, ROUND: tl.constexpr):
    """v (fp32) rounded to the nearest `dtype` value. ROUND (Triton's interpreter and bf16 only: the interpreter
    truncates fp32 to bf16, a GPU rounds to nearest even): the same rounding by integer operations."""
    if ROUND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def int4_tile(
    q_ptr,
    qrow,
    s_ptr,
    srow,
    o_ptr,
    orow,
    valid,
    kb0,
    K,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    ROUND: tl.constexpr,
):
    """The weights of bytes [kb0, kb0 + BLOCK_KB) of BLOCK_N rows: (low-nibble tile, high-nibble tile), each
    (BLOCK_N, BLOCK_KB) in scale's dtype (columns 2b and 2b + 1 of byte b), zero where ~valid or past K. qrow, srow,
    orow: each row's element offset in qdata, scale and offset. A step covers whole groups (BLOCK_KB a multiple of
    G // 2; kb0 a multiple of BLOCK_KB): the group's scale and offset broadcast over its G // 2 bytes."""
    bs = kb0 + tl.arange(0, BLOCK_KB)
    q = tl.load(q_ptr + qrow[:, None] + bs[None, :], mask=valid[:, None] & (bs[None, :] < K // 2), other=0)
    gs = kb0 // (G // 2) + tl.arange(0, BLOCK_KB // (G // 2))
    gmask = valid[:, None] & (gs[None, :] < K // G)
    s = tl.load(s_ptr + srow[:, None] + gs[None, :], mask=gmask, other=0.0)
    o = tl.load(o_ptr + orow[:, None] + gs[None, :], mask=gmask, other=0.0)
    s3 = s.to(tl.float32)[:, :, None]
    o3 = o.to(tl.float32)[:, :, None]
    q3 = tl.reshape(q, (BLOCK_N, BLOCK_KB // (G // 2), G // 2))
    # q * scale is exact in fp32 (4 + 11 significant bits at most), so a fused multiply-add rounds the same
    lo = rounded(code_value(q3 & 0xF) * s3 + o3, s.dtype, ROUND)
    hi = rounded(code_value(q3 >> 4) * s3 + o3, s.dtype, ROUND)
    return tl.reshape(lo, (BLOCK_N, BLOCK_KB)), tl.reshape(hi, (BLOCK_N, BLOCK_KB))


@triton.jit
def code_value(c):
    """The 4-bit codes c (0..15) as fp32, exactly: the bits of 2^23 + c less 2^23 (an OR and an add). The
    integer-to-float conversion instruction issues at a fraction of fp32 arithmetic's rate, and a matrix-vector
    product converts every code of the weight (two a byte)."""
    return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def x_pairs(x_ptr, nw_ptr, row, kb0, inv, K: tl.constexpr, NORM: tl.constexpr, BLOCK_KB: tl.constexpr):
    """x_block of columns [2 kb0, 2 kb0 + 2 BLOCK_KB) of row `row`, loaded whole, as (even columns, odd columns)."""
    ks = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
    return tl.split(tl.reshape(x_block(x_ptr, nw_ptr, row, ks, inv, K, NORM), (BLOCK_KB, 2)))


@triton.jit
def x_rows_pairs(x_ptr, rows, M, kb0, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KB: tl.constexpr):
    """x_rows of columns [2 kb0, 2 kb0 + 2 BLOCK_KB), loaded whole, as (even columns, odd columns) (BLOCK_M,
    BLOCK_KB) each."""
    ks = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
    return tl.split(tl.reshape(x_rows(x_ptr, rows, M, ks, K), (BLOCK_M, BLOCK_KB, 2)))


@triton.jit
def gemv_int4_kernel(
    x_ptr,
    nw_ptr,
    eps,
    q_ptr,
    qoff1,
    qoff2,
    s_ptr,
    soff1,
    soff2,
    o_ptr,
    ooff1,
    ooff2,
    r_ptr,
    y_ptr,
    M,
    N,
    N0,
    N1,
    K: tl.constexpr,
    G: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    # gemv_kernel on int4 weights: stacked weights have their qdata, scales and offsets each off1/off2 elements
    # after the first weight's.
    pid = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qrow = row_offsets(cols, qoff1, qoff2, N0, N1, K // 2)
    srow = row_offsets(cols, soff1, soff2, N0, N1, K // G)
    orow = row_offsets(cols, ooff1, ooff2, N0, N1, K // G)
    inv = inv_rms(x_ptr, row, eps, K, 2 * BLOCK_KB) if NORM else 1.0
    acc = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for kb0 in tl.static_range(0, K // 2, BLOCK_KB):  # unrolled: every load in flight at once
        lo, hi = int4_tile(q_ptr, qrow, s_ptr, srow, o_ptr, orow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        even, odd = x_pairs(x_ptr, nw_ptr, row, kb0, inv, K, NORM, BLOCK_KB)
        acc += lo.to(tl.float32) * even[None, :] + hi.to(tl.float32) * odd[None, :]
    y = tl.sum(acc, axis=1)
    if RESIDUAL:  # rounded as the unfused residual + linear(x): the product first, then the sum
        r = tl.load(r_ptr + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def gemv_int4_swiglu_kernel(
    x_ptr,
    nw_ptr,
    eps,
    gq_ptr,
    uq_ptr,
    gs_ptr,
    us_ptr,
    go_ptr,
    uo_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,
    G: tl.constexpr,
    NORM: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qrow = cols.to(tl.int64) * (K // 2)
    srow = cols.to(tl.int64) * (K // G)
    inv = inv_rms(x_ptr, row, eps, K, 2 * BLOCK_KB) if NORM else 1.0
    acc_g = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for kb0 in tl.static_range(0, K // 2, BLOCK_KB):  # unrolled: every load in flight at once
        even, odd = x_pairs(x_ptr, nw_ptr, row, kb0, inv, K, NORM, BLOCK_KB)
        even, odd = even[None, :], odd[None, :]
        g_lo, g_hi = int4_tile(gq_ptr, qrow, gs_ptr, srow, go_ptr, srow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        u_lo, u_hi = int4_tile(uq_ptr, qrow, us_ptr, srow, uo_ptr, srow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        acc_g += g_lo.to(tl.float32) * even + g_hi.to(tl.float32) * odd
        acc_u += u_lo.to(tl.float32) * even + u_hi.to(tl.float32) * odd
    # Rounded to the activation dtype before the SwiGLU, as the unfused path rounds its two products.
    g = tl.sum(acc_g, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=cols < N)


# The several-row kernels (gemv_rows_kernel's scheme): the two weight tiles, made in registers in x's dtype, go to
# tl.dot with x's even and odd columns. UPCAST as there (the interpreter's tl.dot misreads bf16 operands).
_ROWS_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w, num_stages=s)
    for n in (16, 32, 64)
    for kb in (64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]


@triton.jit
def gemv_int4_rows_kernel(
    x_ptr,
    q_ptr,
    qoff1,
    qoff2,
    s_ptr,
    soff1,
    soff2,
    o_ptr,
    ooff1,
    ooff2,
    r_ptr,
    y_ptr,
    M,
    N,
    N0,
    N1,
    K: tl.constexpr,
    G: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qrow = row_offsets(cols, qoff1, qoff2, N0, N1, K // 2)
    srow = row_offsets(cols, soff1, soff2, N0, N1, K // G)
    orow = row_offsets(cols, ooff1, ooff2, N0, N1, K // G)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, K // 2, BLOCK_KB):
        even, odd = x_rows_pairs(x_ptr, rows, M, kb0, K, BLOCK_M, BLOCK_KB)
        lo, hi = int4_tile(q_ptr, qrow, s_ptr, srow, o_ptr, orow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        if UPCAST:
            even, odd, lo, hi = even.to(tl.float32), odd.to(tl.float32), lo.to(tl.float32), hi.to(tl.float32)
        acc = tl.dot(even, tl.trans(lo), acc)
        acc = tl.dot(odd, tl.trans(hi), acc)
    out = (rows[:, None] < M) & (cols[None, :] < N)
    y = acc
    if RESIDUAL:  # rounded as the unfused residual + linear(x): the product first, then the sum
        r = tl.load(r_ptr + rows[:, None] * N + cols[None, :], mask=out, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def gemv_int4_rows_swiglu_kernel(
    x_ptr,
    gq_ptr,
    uq_ptr,
    gs_ptr,
    us_ptr,
    go_ptr,
    uo_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,
    G: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    qrow = cols.to(tl.int64) * (K // 2)
    srow = cols.to(tl.int64) * (K // G)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, K // 2, BLOCK_KB):
        even, odd = x_rows_pairs(x_ptr, rows, M, kb0, K, BLOCK_M, BLOCK_KB)
        g_lo, g_hi = int4_tile(gq_ptr, qrow, gs_ptr, srow, go_ptr, srow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        u_lo, u_hi = int4_tile(uq_ptr, qrow, us_ptr, srow, uo_ptr, srow, cols < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
        if UPCAST:
            even, odd = even.to(tl.float32), odd.to(tl.float32)
            g_lo, g_hi, u_lo, u_hi = g_lo.to(tl.float32), g_hi.to(tl.float32), u_lo.to(tl.float32), u_hi.to(tl.float32)
        acc_g = tl.dot(odd, tl.trans(g_hi), tl.dot(even, tl.trans(g_lo), acc_g))
        acc_u = tl.dot(odd, tl.trans(u_hi), tl.dot(even, tl.trans(u_lo), acc_u))
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    out = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], (silu * u).to(y_ptr.dtype.element_ty), mask=out)


# The dequantizing pass (a prompt's products: many rows, F.linear on the whole weight): a program per tile of
# BLOCK_N rows x 2 BLOCK_KB columns, stored interleaved as whole rows.
_DEQUANTIZE_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w)
    for n in (8, 16, 32)
    for kb in (64, 128, 256)
    for w in (4, 8)
    if n * kb <= 4096
]


@triton.jit
def dequantize_int4_kernel(
    q_ptr,
    s_ptr,
    o_ptr,
    w_ptr,
    N,
    K,
    G: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb0 = tl.program_id(1) * BLOCK_KB
    r64 = rows.to(tl.int64)
    srow = r64 * (K // G)
    lo, hi = int4_tile(q_ptr, r64 * (K // 2), s_ptr, srow, o_ptr, srow, rows < N, kb0, K, G, BLOCK_N, BLOCK_KB, ROUND)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_KB))  # (BLOCK_N, BLOCK_KB, 2): columns 2b, 2b + 1
    ks = 2 * kb0 + tl.arange(0, 2 * BLOCK_KB)
    tl.store(w_ptr + r64[:, None] * K + ks[None, :], w, mask=(rows[:, None] < N) & (ks[None, :] < K))


gemv_int4 = kernels.Kernel("gemv_int4", gemv_int4_kernel, _CONFIGS, _KEY, tables.GEMV_INT4, tables.gemv_int4_rule)
gemv_int4_swiglu = kernels.Kernel(
    "gemv_int4_swiglu", gemv_int4_swiglu_kernel, _CONFIGS, _KEY, tables.GEMV_INT4_SWIGLU, tables.gemv_int4_rule
)
gemv_int4_rows = kernels.Kernel(
    "gemv_int4_rows", gemv_int4_rows_kernel, _ROWS_CONFIGS, _ROWS_KEY, {}, tables.gemv_int4_rows_rule
)
gemv_int4_rows_swiglu = kernels.Kernel(
    "gemv_int4_rows_swiglu", gemv_int4_rows_swiglu_kernel, _ROWS_CONFIGS, _ROWS_KEY, {}, tables.gemv_int4_rows_rule
)
dequantize_int4 = kernels.Kernel(
    "dequantize_int4", dequantize_int4_kernel, _DEQUANTIZE_CONFIGS, ["N", "K", "G"], {}, tables.dequantize_int4_rule
)
