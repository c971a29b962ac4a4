"""Triton kernels for the elementwise functions of ops.py that the ingest runs on every token (imported only where
they run: this module imports Triton). Each computes in fp32 and rounds where the plain function rounds, except
inside a single expression (RoPE, SwiGLU's product), which it rounds once as a compiled function would.

They replace torch.compile's graphs on the default path: a Triton kernel compiles in under a second on a fresh
machine and loads from its cache in milliseconds, where a compiled graph costs seconds to build and, even from
Inductor's cache, a Dynamo trace in every new process.
"""

import triton
import triton.language as tl


@triton.jit
def rms_norm_rows(
    x_ptr,
    a_ptr,
    w_ptr,
    sum_ptr,
    out_ptr,
    eps,
    N: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row per program: out = w * (h * rsqrt(mean(h^2) + eps)) with h = x (+ a, stored to sum_ptr, rounded to
    x's dtype first, when ADD); the normalised row is rounded to x's dtype before the product with w."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_N)
    inside = c < N
    x = tl.load(x_ptr + row * N + c, mask=inside, other=0.0)
    if ADD:
        a = tl.load(a_ptr + row * N + c, mask=inside, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * N + c, x, mask=inside)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / N + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + c, (w * normed).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def swiglu_flat(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """silu(gate) * up over n contiguous elements; silu rounded to the inputs' dtype, as F.silu returns it."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    g = tl.load(gate_ptr + i, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + i, mask=inside, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + i, (silu * u).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def rotate_rows(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    rows,
    heads,
    n,
    s_xb,
    s_xh,
    s_xn,
    s_cb,
    s_ch,
    s_cn,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate-half RoPE of x (b, h, n, D) (any strides, unit stride in D) by cos, sin strided alike (0 where they
    broadcast) into a contiguous out; in fp32, rounded once."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rmask = r < rows
    inside = rmask[:, None] & (c < D)[None, :]
    bi = r // (heads * n)
    hi = (r // n) % heads
    ni = r % n
    base = (bi * s_xb + hi * s_xh + ni * s_xn)[:, None]
    half = D // 2
    partner = tl.where(c < half, c + half, c - half)
    x = tl.load(x_ptr + base + c[None, :], mask=inside, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + base + partner[None, :], mask=inside, other=0.0).to(tl.float32)
    at = (bi * s_cb + hi * s_ch + ni * s_cn)[:, None] + c[None, :]
    cos = tl.load(cos_ptr + at, mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + at, mask=inside, other=0.0).to(tl.float32)
    sign = tl.where(c < half, -1.0, 1.0)
    y = x * cos + xp * (sin * sign[None, :])
    tl.store(out_ptr + r[:, None] * D + c[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def merge_heads_rows(
    o1_ptr,
    l1_ptr,
    o2_ptr,
    l2_ptr,
    out_ptr,
    heads,
    n,
    s1b,
    s1h,
    s1n,
    sl1b,
    sl1h,
    s2b,
    s2h,
    s2n,
    sl2b,
    sl2h,
    HD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Two partial attentions (b, h, n, >= HD) with their log-sum-exps (b, h, n) (unit stride in n) merged in fp32
    into one softmax, rounded to out's dtype and written as o_proj's input out (b, n, heads * HD)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    rmask = i < n
    inside = rmask[:, None] & (c < HD)[None, :]
    l1 = tl.load(l1_ptr + b * sl1b + h * sl1h + i, mask=rmask, other=0.0)
    l2 = tl.load(l2_ptr + b * sl2b + h * sl2h + i, mask=rmask, other=0.0)
    top = tl.maximum(l1, l2)
    lse = top + tl.log(tl.exp(l1 - top) + tl.exp(l2 - top))
    w1 = tl.exp(l1 - lse)[:, None]
    w2 = tl.exp(l2 - lse)[:, None]
    o1 = tl.load(o1_ptr + b * s1b + h * s1h + i[:, None] * s1n + c[None, :], mask=inside, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + b * s2b + h * s2h + i[:, None] * s2n + c[None, :], mask=inside, other=0.0).to(tl.float32)
    y = o1 * w1 + o2 * w2
    at = (b * n + i)[:, None] * (heads * HD) + h * HD + c[None, :]
    tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=inside)
