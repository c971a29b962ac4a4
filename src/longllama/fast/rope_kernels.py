"""fused.rope_pad as a Triton kernel (imported only where it runs: this module imports Triton).

Each program takes BLOCK_R rows of a token-major (tokens, heads, d) tensor, which lie back to back in memory, and
writes them rotated (rotate-half RoPE, in fp32, rounded once) and zero-padded to `width`. Inductor's kernel for the
same function ran at ~1 TB/s on an H100 (it flattens the padded output and divides each index by the width; the
100-wide input rows are not 16-byte aligned; the profile is in benchmarks/RESULTS.md).
"""

import triton
import triton.language as tl


@triton.jit
def rope_pad_rows(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    rows,
    heads,
    n,
    s_cb,
    s_cn,
    D: tl.constexpr,
    W: tl.constexpr,
    ROTATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    r64 = r.to(tl.int64)
    rmask = r < rows
    inside = rmask[:, None] & (c < D)[None, :]
    x = tl.load(x_ptr + r64[:, None] * D + c[None, :], mask=inside, other=0.0)
    if ROTATE:
        half = D // 2
        partner = tl.where(c < half, c + half, c - half)
        xp = tl.load(x_ptr + r64[:, None] * D + partner[None, :], mask=inside, other=0.0).to(tl.float32)
        token = r64 // heads  # b * n + position
        at = (token // n)[:, None] * s_cb + (token % n)[:, None] * s_cn + c[None, :]
        cos = tl.load(cos_ptr + at, mask=inside, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + at, mask=inside, other=0.0).to(tl.float32)
        sign = tl.where(c < half, -1.0, 1.0)
        y = x.to(tl.float32) * cos + xp * (sin * sign[None, :])
    else:
        y = x.to(tl.float32)
    tl.store(
        out_ptr + r64[:, None] * W + c[None, :], y.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (c < W)[None, :]
    )
