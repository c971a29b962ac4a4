"""The Triton kernel of flash4.fold (imported only where it runs: this module imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def fold(
    out_ptr,
    lse_ptr,
    res_ptr,
    res_lse_ptr,
    parts,
    rows,
    W,
    s_op,
    s_on,
    s_oh,
    s_lp,
    s_lh,
    s_rn,
    s_rh,
    s_rl,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program: BLOCK_R query rows of one head. The parts come one after another into a running softmax (max,
    # sum of weights, weighted outputs in fp32), as the kernel would have kept it over all their keys.
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    rmask = r < rows
    mask = rmask[:, None] & (w < W)[None, :]
    r64 = r.to(tl.int64)
    m = tl.full((BLOCK_R,), -float("inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    lse_at = lse_ptr + h * s_lh + r64  # pointers of part 0, moved on by a part's stride (64-bit addresses)
    out_at = out_ptr + h * s_oh + r64[:, None] * s_on + w[None, :]
    for _ in range(parts):
        lse = tl.load(lse_at, mask=rmask, other=-float("inf"))
        new = tl.maximum(m, lse)
        base = tl.where(new == -float("inf"), 0.0, new)  # rows with no keys so far: weights 0, not NaN
        keep, add = tl.exp(m - base), tl.exp(lse - base)
        o = tl.load(out_at, mask=mask, other=0.0)
        acc = acc * keep[:, None] + o.to(tl.float32) * add[:, None]
        total = total * keep + add
        m = new
        lse_at += s_lp
        out_at += s_op
    seen = total > 0
    res = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(res_ptr + r64[:, None] * s_rn + h * s_rh + w[None, :], res.to(res_ptr.dtype.element_ty), mask=mask)
    lse_out = tl.where(seen, tl.where(m == -float("inf"), 0.0, m) + tl.log(tl.where(seen, total, 1.0)), -float("inf"))
    tl.store(res_lse_ptr + h * s_rl + r64, lse_out, mask=rmask)
