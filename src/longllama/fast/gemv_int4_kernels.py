"""The Triton kernels of gemv.py that read int4 weights in place (int4.py's layout), and the one that dequantizes
them (imported only where they run: this module imports Triton).

The products (1 to 16 rows of x, gemv.ROWS_BLOCK) run on tensor cores: a program takes BLOCK_N output columns of
every row (padded to BLOCK_M >= 16) and steps through the weight one group at a time. Each step loads the group's
packed codes, makes them activation-dtype values BIAS + code with no conversion instruction (code_tiles: a code in
the lowest mantissa bits of BIAS), multiplies the low and high nibbles with x's even and odd columns by tl.dot, and
applies the group's scale and offset to the dot's result and to the group's sum of x (group_product). A weight is
thus q * scale + offset unrounded, within half a rounding step of int4.dequantize's; dequantizing each weight in
fp32 before the product took 14-22 instructions a weight and ran at a fifth of the memory's speed
(benchmarks/HISTORY.md).
"""

import triton
import triton.language as tl

from longllama.fast import kernels, tables
from longllama.fast.gemv_kernels import inv_rms, row_offsets

_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n in (16, 32, 64, 128) for w in (4, 8) for s in (3, 5)
]
_KEY = ["N", "K", "M", "NORM", "G"]


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


def _codes_asm(magic: int) -> str:
    """PTX turning 4 packed bytes (8 codes) into the 16-bit values of magic's bits + code: the low nibbles of bytes
    0-1 and 2-3, then the high ones, two values a 32-bit register (a byte permute spreads two bytes to the halves'
    low bytes; one three-input logical operation masks a nibble in each half and ORs the magic bits in)."""
    m = f"0x{magic:04X}{magic:04X}"
    return (
        "{ .reg .b32 t0, t1, u0, u1; "
        "prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342; "
        f"lop3.b32 $0, t0, 0x000F000F, {m}, 0xEA; lop3.b32 $1, t1, 0x000F000F, {m}, 0xEA; "
        "shr.u32 u0, t0, 4; shr.u32 u1, t1, 4; "
        f"lop3.b32 $2, u0, 0x000F000F, {m}, 0xEA; lop3.b32 $3, u1, 0x000F000F, {m}, 0xEA; }}"
    )


# Codes as activation-dtype values BIAS + code, exactly: the bits of BIAS (2^7 in bf16, 2^10 in fp16: a unit in the
# last place of 1) with the code in the lowest mantissa bits, so no conversion instruction.
BF16_BITS, BF16_BIAS = tl.constexpr(0x4300), tl.constexpr(128.0)
FP16_BITS, FP16_BIAS = tl.constexpr(0x6400), tl.constexpr(1024.0)
BF16_ASM, FP16_ASM = tl.constexpr(_codes_asm(0x4300)), tl.constexpr(_codes_asm(0x6400))


@triton.jit
def code_tiles(q, dtype: tl.constexpr, ASM: tl.constexpr):
    """(low nibbles, high nibbles) of packed bytes q as dtype values BIAS + code (bf16 or fp16). ASM (GPUs): a few
    instructions per 8 codes in PTX; otherwise (the interpreter) the same bits by integer operations."""
    if ASM:
        if dtype == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(BF16_ASM, "=r,=r,=r,=r,r", [q], (tl.bfloat16, tl.bfloat16), True, 4)
        else:
            lo, hi = tl.inline_asm_elementwise(FP16_ASM, "=r,=r,=r,=r,r", [q], (tl.float16, tl.float16), True, 4)
    else:
        bits = BF16_BITS if dtype == tl.bfloat16 else FP16_BITS
        lo = ((q & 0xF).to(tl.uint16) | bits).to(tl.uint16).to(dtype, bitcast=True)
        hi = ((q >> 4).to(tl.uint16) | bits).to(tl.uint16).to(dtype, bitcast=True)
    return lo, hi


@triton.jit
def x_load(x_ptr, nw_ptr, rows, M, g, NG: tl.constexpr, G: tl.constexpr, NORM: tl.constexpr, ONE: tl.constexpr):
    """Group g's columns of x as loaded, and of the RMSNorm's weight with NORM (else x again), zero past the last
    group (NG groups). ONE (one row of x): the row (G,); else every row (BLOCK_M, G)."""
    ks = g * G + tl.arange(0, G)
    inside = g < NG
    if ONE:
        x = tl.load(x_ptr + ks, mask=inside, other=0.0)
    else:
        x = tl.load(x_ptr + rows[:, None] * (NG * G) + ks[None, :], mask=(rows[:, None] < M) & inside, other=0.0)
    nw = tl.load(nw_ptr + ks, mask=inside, other=0.0) if NORM else x
    return x, nw


@triton.jit
def x_operands(x, nw, rows, inv, G: tl.constexpr, NORM: tl.constexpr, ONE: tl.constexpr):
    """A group's x (x_load) as tl.dot operands: (even columns, odd columns) (BLOCK_M, G // 2) each in the activation
    dtype, and each row's sum over the group (BLOCK_M,) in fp32. ONE: the row is normalised with NORM (`inv` its
    inv_rms; rms_norm(x) * weight rounded as x_block rounds it) and summed once, and placed in the operands' first
    row (the rest zero), where the padded tile would cost 16 times the work; more rows come normalised."""
    if ONE:
        if NORM:
            xn = (x.to(tl.float32) * inv).to(x.dtype)
            x = (nw.to(tl.float32) * xn.to(tl.float32)).to(x.dtype)
        even1, odd1 = tl.split(tl.reshape(x, (G // 2, 2)))
        first = rows[:, None] == 0
        even = tl.where(first, even1[None, :], 0.0).to(x.dtype)
        odd = tl.where(first, odd1[None, :], 0.0).to(x.dtype)
        xs = tl.where(rows == 0, tl.sum(x.to(tl.float32), axis=0), 0.0)
    else:
        even, odd = tl.split(tl.reshape(x, (x.shape[0], G // 2, 2)))
        xs = tl.sum(x.to(tl.float32), axis=1)
    return even, odd, xs


@triton.jit
def weight_load(q_ptr, qrow, s_ptr, srow, o_ptr, orow, valid, g, NG: tl.constexpr, G: tl.constexpr):
    """Group g's packed codes (BLOCK_N, G // 2) and scales and offsets (BLOCK_N,) of the program's columns, zero
    past the last group."""
    bs = g * (G // 2) + tl.arange(0, G // 2)
    inside = valid & (g < NG)
    q = tl.load(q_ptr + qrow[:, None] + bs[None, :], mask=inside[:, None], other=0)
    s = tl.load(s_ptr + srow + g, mask=inside, other=0.0)
    o = tl.load(o_ptr + orow + g, mask=inside, other=0.0)
    return q, s, o


@triton.jit
def group_product(even, odd, xs, q, s, o, BIAS: tl.constexpr, ASM: tl.constexpr, UPCAST: tl.constexpr):
    """One group's share of x W^T (BLOCK_M, BLOCK_N) in fp32 for x's operands (x_group) and the group's packed codes
    q (BLOCK_N, G // 2), scales s and offsets o (BLOCK_N,) in fp32: the codes enter tl.dot as exact values BIAS + c
    (code_tiles) with x's even and odd columns; s times that sum, plus (offset - BIAS s) times the sum of x, is the
    sum over the group of (c s + offset) x: each weight q * scale + offset unrounded."""
    lo, hi = code_tiles(q, even.dtype, ASM)
    if UPCAST:
        even, odd, lo, hi = even.to(tl.float32), odd.to(tl.float32), lo.to(tl.float32), hi.to(tl.float32)
    d = tl.dot(odd, tl.trans(hi), tl.dot(even, tl.trans(lo)))
    return s[None, :] * d + (o - BIAS * s)[None, :] * xs[:, None]


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
    BIAS: tl.constexpr,
    ASM: tl.constexpr,
    UPCAST: tl.constexpr,
    ONE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A program: BLOCK_N output columns of every row of x, one group per step. Stacked weights have their qdata,
    # scales and offsets each off1/off2 elements after the first weight's.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = cols < N
    # whole 16-byte rows (gemv._readable): the codes load in 16-byte pieces
    qrow = tl.multiple_of(row_offsets(cols, qoff1, qoff2, N0, N1, K // 2), 16)
    srow = row_offsets(cols, soff1, soff2, N0, N1, K // G)
    orow = row_offsets(cols, ooff1, ooff2, N0, N1, K // G)
    inv = inv_rms(x_ptr, 0, eps, K, 256) if NORM else 1.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    NG: tl.constexpr = K // G
    # Every load lands two steps before its use: a step's own loads would leave it waiting a memory latency each
    # (the scales and offsets, a few bytes a column, are no candidates for Triton's pipelining)
    q0, s0, o0 = weight_load(q_ptr, qrow, s_ptr, srow, o_ptr, orow, valid, 0, NG, G)
    x0, n0 = x_load(x_ptr, nw_ptr, rows, M, 0, NG, G, NORM, ONE)
    q1, s1, o1 = weight_load(q_ptr, qrow, s_ptr, srow, o_ptr, orow, valid, 1, NG, G)
    x1, n1 = x_load(x_ptr, nw_ptr, rows, M, 1, NG, G, NORM, ONE)
    for g in range(0, NG):
        q2, s2, o2 = weight_load(q_ptr, qrow, s_ptr, srow, o_ptr, orow, valid, g + 2, NG, G)
        x2, n2 = x_load(x_ptr, nw_ptr, rows, M, g + 2, NG, G, NORM, ONE)
        even, odd, xs = x_operands(x0, n0, rows, inv, G, NORM, ONE)
        acc += group_product(even, odd, xs, q0, s0.to(tl.float32), o0.to(tl.float32), BIAS, ASM, UPCAST)
        q0, s0, o0, x0, n0 = q1, s1, o1, x1, n1
        q1, s1, o1, x1, n1 = q2, s2, o2, x2, n2
    out = (rows[:, None] < M) & valid[None, :]
    y = acc
    if RESIDUAL:  # rounded as the unfused residual + linear(x): the product first, then the sum
        r = tl.load(r_ptr + rows[:, None] * N + cols[None, :], mask=out, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=out)


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
    BIAS: tl.constexpr,
    ASM: tl.constexpr,
    UPCAST: tl.constexpr,
    ONE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = cols < N
    qrow = tl.multiple_of(cols.to(tl.int64) * (K // 2), 16)
    srow = cols.to(tl.int64) * (K // G)
    inv = inv_rms(x_ptr, 0, eps, K, 256) if NORM else 1.0
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    NG: tl.constexpr = K // G
    gq0, gs0, go0 = weight_load(gq_ptr, qrow, gs_ptr, srow, go_ptr, srow, valid, 0, NG, G)  # as gemv_int4_kernel
    uq0, us0, uo0 = weight_load(uq_ptr, qrow, us_ptr, srow, uo_ptr, srow, valid, 0, NG, G)
    x0, n0 = x_load(x_ptr, nw_ptr, rows, M, 0, NG, G, NORM, ONE)
    gq1, gs1, go1 = weight_load(gq_ptr, qrow, gs_ptr, srow, go_ptr, srow, valid, 1, NG, G)
    uq1, us1, uo1 = weight_load(uq_ptr, qrow, us_ptr, srow, uo_ptr, srow, valid, 1, NG, G)
    x1, n1 = x_load(x_ptr, nw_ptr, rows, M, 1, NG, G, NORM, ONE)
    for g in range(0, NG):
        gq2, gs2, go2 = weight_load(gq_ptr, qrow, gs_ptr, srow, go_ptr, srow, valid, g + 2, NG, G)
        uq2, us2, uo2 = weight_load(uq_ptr, qrow, us_ptr, srow, uo_ptr, srow, valid, g + 2, NG, G)
        x2, n2 = x_load(x_ptr, nw_ptr, rows, M, g + 2, NG, G, NORM, ONE)
        even, odd, xs = x_operands(x0, n0, rows, inv, G, NORM, ONE)
        acc_g += group_product(even, odd, xs, gq0, gs0.to(tl.float32), go0.to(tl.float32), BIAS, ASM, UPCAST)
        acc_u += group_product(even, odd, xs, uq0, us0.to(tl.float32), uo0.to(tl.float32), BIAS, ASM, UPCAST)
        gq0, gs0, go0, uq0, us0, uo0, x0, n0 = gq1, gs1, go1, uq1, us1, uo1, x1, n1
        gq1, gs1, go1, uq1, us1, uo1, x1, n1 = gq2, gs2, go2, uq2, us2, uo2, x2, n2
    # Rounded to the activation dtype before the SwiGLU, as the unfused path rounds its two products.
    g = acc_g.to(y_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    out = (rows[:, None] < M) & valid[None, :]
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
dequantize_int4 = kernels.Kernel(
    "dequantize_int4", dequantize_int4_kernel, _DEQUANTIZE_CONFIGS, ["N", "K", "G"], {}, tables.dequantize_int4_rule
)
