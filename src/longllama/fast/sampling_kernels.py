"""The Triton kernels of sampling.py (imported only where they run: this module imports Triton)."""

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
def _draw(x, valid, noise, top_k, top_p, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    """(token, least kept scaled logit) of one row: x its scaled logits (BLOCK,) fp32, valid where a token is, noise
    its uniform draws (BLOCK,). The kept tokens are those whose key (scaled logit, as ordered ints) is at least a floor:
    with TOP_K the k-th largest key (ties kept; top_k >= the vocabulary keeps all), with TOP_P and top_p < 1 the least
    key whose tokens above it hold less than top_p of the top-k mass. Both floors come from bisection over the 2^32
    keys (33 halvings each, one masked reduction per halving), so nothing is sorted. The token is then the Gumbel-max
    over the kept ones: logit plus -log(-log(u)) noise, which draws a token with probability proportional to its
    softmax weight among the kept."""
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
        # the top token stays (top_p 0), as the warper keeps one; top_p 1 keeps the top-k floor
        floor = tl.where(top_p < 1.0, tl.minimum(lo, top.to(tl.int64)), floor)
    kept = valid & (key >= floor.to(tl.int32))
    u = tl.minimum(tl.maximum(noise, 1e-12), 1.0 - 1e-7)
    score = tl.where(kept, x - tl.log(-tl.log(u)), -float("inf"))
    return tl.argmax(score, axis=0).to(tl.int64), _float(floor.to(tl.int32))


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
    # One program per row, every row with the same settings; the uniforms from Philox, one seed (from the caller's
    # torch generator) for the whole call, each row its own counters.
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < V
    x = tl.load(logits_ptr + row * stride + i, mask=valid, other=-float("inf")).to(tl.float32) / temperature
    noise = tl.rand(tl.load(seed_ptr), row * BLOCK + i)
    token, floor = _draw(x, valid, noise, top_k, top_p, TOP_K, TOP_P)
    tl.store(out_ptr + row, token)
    tl.store(floor_ptr + row, floor)


@triton.jit
def sample_rows(
    logits_ptr,
    stride,
    rows_ptr,
    out_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    seed_ptr,
    V,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per drawn row, each with its own settings and its own Philox key (seed), the counters the token
    # ids: a row's draw depends on its logits, settings and key only, not on the other rows.
    j = tl.program_id(0)
    row = tl.load(rows_ptr + j)
    i = tl.arange(0, BLOCK)
    valid = i < V
    x = tl.load(logits_ptr + row * stride + i, mask=valid, other=-float("inf")).to(tl.float32)
    x = x / tl.load(temperature_ptr + j)
    noise = tl.rand(tl.load(seed_ptr + j), i)
    token, _ = _draw(x, valid, noise, tl.load(top_k_ptr + j), tl.load(top_p_ptr + j), TOP_K, TOP_P)
    tl.store(out_ptr + row, token)
