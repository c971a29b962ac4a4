"""The Triton kernel of sampling.py (imported only where it runs: this module imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def _ordered(x):
    """float32 -> int32 keys in the floats' order (negative floats have their magnitude bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _float(key):
    """The inverse of _ordered."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def sample(
    logits_ptr,
    stride,
    out_ptr,
    floor_ptr,
    seed_ptr,
    V,
    temperature,
    top_k,
    top_p,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row. The kept tokens are those whose key (scaled logit, as ordered ints) is at least a floor:
    # with TOP_K the k-th largest key (ties kept), with TOP_P the least key whose tokens above it hold less than
    # top_p of the top-k mass. Both floors come from bisection over the 2^32 keys (33 halvings each, one masked
    # reduction per halving), so nothing is sorted. The token is then the Gumbel-max over the kept ones: logit plus
    # -log(-log(u)) noise, u uniform from Philox (seed from the caller's torch generator), which draws a token with
    # probability proportional to its softmax weight among the kept.
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < V
    x = tl.load(logits_ptr + row * stride + i, mask=valid, other=-float("inf")).to(tl.float32) / temperature
    key = tl.where(valid, _ordered(x), -2147483648)
    top = tl.max(key, axis=0)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
    hi = top.to(tl.int64)
    if TOP_K:  # the largest t with at least top_k keys >= t: the k-th largest key
        for _ in range(33):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0) >= top_k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
    floor = lo
    if TOP_P:  # the least t >= floor whose keys above t hold less than top_p of the kept mass
        p = tl.where(valid, tl.exp(x - _float(top)), 0.0)
        kept_mass = tl.sum(tl.where(key >= floor.to(tl.int32), p, 0.0), axis=0)
        hi = top.to(tl.int64)
        lo = floor
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            small = tl.sum(tl.where(key > mid.to(tl.int32), p, 0.0), axis=0) < top_p * kept_mass
            hi = tl.where(small, mid, hi)
            lo = tl.where(small, lo, mid + 1)
        floor = tl.minimum(lo, top.to(tl.int64))  # the top token stays (top_p 0), as the warper keeps one
    kept = valid & (key >= floor.to(tl.int32))
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, row * BLOCK + i)
    u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)
    score = tl.where(kept, x - tl.log(-tl.log(u)), -float("inf"))
    tl.store(out_ptr + row, tl.argmax(score, axis=0).to(tl.int64))
    tl.store(floor_ptr + row, _float(floor.to(tl.int32)))
