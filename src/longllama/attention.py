"""The exact attention of one window over [local keys ; memory keys] with a single softmax: the executable
specification that every fast implementation is tested against (docs/inference.md#attention).

`attend(q, k, v, ...)` is the entry point of the exact implementations:
    "eager"  q.kT divided by sqrt(d) in the activation dtype, masked scores set to c_min = max(finfo.min, -1e6),
             one fp32 softmax over local and memory columns, probabilities cast back before they multiply the
             values. Supports `grouping` (heads, queries) chunks and kNN memory (`mem_top_k`).
    "sdpa"   torch's scaled_dot_product_attention on the concatenated keys with a finite additive mask; the same
             function up to rounding (no -inf is ever produced, so fully masked rows give a uniform row, not NaN).
The fused GPU path ("fast": no copy of the memory per call, partial attentions merged by log-sum-exp) lives in the
fast/ wing (fast/attention.py) and is chosen by the execution plan (plan.py). `few_query_attention` is a decoding
step's attention in plain PyTorch (one joint softmax, no concatenated values), shared by both.

Shapes: q (b, h, q, d); k, v (b, h_kv, kv, d); visible (b or 1, 1, q, kv) bool or None (all visible);
mem_k, mem_v (b, h_kv, M, d) in the memory dtype; mem_valid (b, M) bool or None. Returns (b, h, q, d) and, for
"eager" with return_probs, the probabilities (b, h, q, kv + M).

Shared memory (`mem_share` = s > 1, beams of one prompt, memory.py): q, k, v and visible have b * s rows while
mem_k, mem_v and mem_valid have b, row i of the memory serving query rows i*s .. i*s+s-1. Memory attention has no
causal mask, so the s query rows of one memory row are folded into its query dimension (fold_rows: (b*s, h, q, d)
-> (b, h, s*q, d)) against the memory, and the memory scores or partial results unfolded back into the same softmax
as the per-row local part: the same maths, no copy of the memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longllama.plan import round_up


def clamp_value(dtype: torch.dtype) -> float:
    """The score given to masked entries: max(finfo.min, -1e6) (the reference's clamp)."""
    return max(torch.finfo(dtype).min, -1e6)


def _scores(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None, c_min: float, *, head_dim: int | None = None
) -> torch.Tensor:
    """(b, h, q, kv) scores of grouped heads; q heads h_kv*g+j share kv head h_kv (no copy of k). Divided by
    sqrt(head_dim), the true head dimension when q and k are zero-padded (default: q's last dimension)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * n, d)  # (B, Hkv, G*Q, D)
    s = (qg @ k.transpose(-1, -2)).view(b, h, n, k.shape[2]) / math.sqrt(head_dim or d)
    if visible is not None:
        s = s.masked_fill(~visible, c_min)
    return s.clamp_min(c_min)


def fold_rows(x: torch.Tensor, share: int) -> torch.Tensor:
    """(b*s, h, t, ...) -> (b, h, s*t, ...): the s consecutive rows that share one memory row, as more queries."""
    if share == 1:
        return x
    bs, h, t, *rest = x.shape
    return x.reshape(bs // share, share, h, t, *rest).transpose(1, 2).reshape(bs // share, h, share * t, *rest)


def unfold_rows(x: torch.Tensor, share: int) -> torch.Tensor:
    """fold_rows undone: (b, h, s*t, ...) -> (b*s, h, t, ...)."""
    if share == 1:
        return x
    b, h, st, *rest = x.shape
    return x.reshape(b, h, share, st // share, *rest).transpose(1, 2).reshape(b * share, h, st // share, *rest)


_INT8_CHUNK = 8192  # int8 memory keys converted to the activation dtype at a time (never the whole memory)


def _int8_scores(
    q: torch.Tensor, mem_k: torch.Tensor, k_scale: torch.Tensor, visible, c_min: float, head_dim: int | None
) -> torch.Tensor:
    """_scores over int8 keys (b, h_kv, M, d) with per-key scales (b, h_kv, M): the key scale is a factor of each
    score, so q.kq^T is taken chunk by chunk (_INT8_CHUNK keys converted at a time) and scaled per column."""
    b, h, n, d = q.shape
    hkv, m = mem_k.shape[1], mem_k.shape[2]
    qg = q.reshape(b, hkv, (h // hkv) * n, d)
    s = torch.empty(b, hkv, qg.shape[2], m, dtype=q.dtype, device=q.device)
    for c0 in range(0, m, _INT8_CHUNK):
        c1 = min(m, c0 + _INT8_CHUNK)
        part = qg @ mem_k[:, :, c0:c1].to(q.dtype).transpose(-1, -2)
        s[..., c0:c1] = part * k_scale[:, :, None, c0:c1].to(q.dtype)
    s = s.view(b, h, n, m) / math.sqrt(head_dim or d)
    if visible is not None:
        s = s.masked_fill(~visible, c_min)
    return s.clamp_min(c_min)


def _int8_weighted(p: torch.Tensor, mem_v: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """_weighted over int8 values with per-value scales: each value's scale folded into its probability, chunk by
    chunk, accumulated in fp32."""
    b, h, n, m = p.shape
    hkv = mem_v.shape[1]
    pg = p.reshape(b, hkv, (h // hkv) * n, m)
    out = torch.zeros(b, hkv, pg.shape[2], mem_v.shape[-1], dtype=torch.float32, device=p.device)
    for c0 in range(0, m, _INT8_CHUNK):
        c1 = min(m, c0 + _INT8_CHUNK)
        scaled = (pg[..., c0:c1].float() * v_scale[:, :, None, c0:c1]).to(p.dtype)
        out += (scaled @ mem_v[:, :, c0:c1].to(p.dtype)).float()
    return out.to(p.dtype).view(b, h, n, mem_v.shape[-1])


def _memory_scores(q, mem_k, mem_valid, c_min, mem_top_k, share: int, head_dim: int | None = None, k_scale=None):
    """Scores (b*s, h, q, M) of every query row over its (possibly shared) memory, top k applied; `k_scale` the
    per-key scales of an int8 memory."""
    mem_visible = None if mem_valid is None else mem_valid[:, None, None, :]
    if k_scale is not None:
        scores = _int8_scores(fold_rows(q, share), mem_k, k_scale, mem_visible, c_min, head_dim)
    else:
        scores = _scores(fold_rows(q, share), mem_k, mem_visible, c_min, head_dim=head_dim)
    return unfold_rows(_keep_top_k(scores, mem_top_k, c_min), share)


def _memory_weighted(p: torch.Tensor, mem_v: torch.Tensor, share: int, v_scale=None) -> torch.Tensor:
    """The memory part of the output: probabilities (b*s, h, q, M) times the (shared, maybe int8) memory values."""
    folded = fold_rows(p, share)
    out = _weighted(folded, mem_v.to(p.dtype)) if v_scale is None else _int8_weighted(folded, mem_v, v_scale)
    return unfold_rows(out, share)


def _weighted(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, n, kv = p.shape
    hkv = v.shape[1]
    out = p.reshape(b, hkv, (h // hkv) * n, kv) @ v  # (B, Hkv, G*Q, D)
    return out.view(b, h, n, v.shape[-1])


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at each row's k largest scores (last dimension)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)


def _keep_top_k(scores: torch.Tensor, k: int | None, c_min: float) -> torch.Tensor:
    """Memory scores with all but each query's k best set to c_min (their softmax weight is then 0)."""
    if k is None or scores.shape[-1] <= k:
        return scores
    return scores.masked_fill(~top_k_mask(scores, k), c_min)


def _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs, mem_top_k=None, mem_share=1, mem_scales=None):
    c_min = clamp_value(q.dtype)
    scores = _scores(q, k, visible, c_min)
    values = v
    if mem_k is not None:
        k_scale, v_scale = mem_scales if mem_scales is not None else (None, None)
        mem_k = mem_k if k_scale is not None else mem_k.to(k.dtype)
        mem_scores = _memory_scores(q, mem_k, mem_valid, c_min, mem_top_k, mem_share, k_scale=k_scale)
        scores = torch.cat([scores, mem_scores], dim=-1)
        if mem_share > 1 or v_scale is not None:  # shared or int8 values: the two parts weighted apart, then added
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            kv = k.shape[2]
            mem_part = _memory_weighted(probs[..., kv:], mem_v, mem_share, v_scale)
            return _weighted(probs[..., :kv], v) + mem_part, (probs if return_probs else None)
        values = torch.cat([v, mem_v.to(v.dtype)], dim=2)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return _weighted(probs, values), (probs if return_probs else None)


def _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping, mem_top_k=None, mem_share=1, mem_scales=None):
    """Memory attention in (heads, queries) chunks, to bound the size of the score matrix."""
    gh, gq = grouping
    b, h, n, _ = q.shape
    rep = h // k.shape[1]
    out = torch.empty_like(q)
    for h0 in range(0, h, gh):
        kv_heads = torch.arange(h0, min(h, h0 + gh), device=q.device) // rep
        sel = [None if t is None else t.index_select(1, kv_heads) for t in (k, v, mem_k, mem_v)]
        scales = None if mem_scales is None else tuple(t.index_select(1, kv_heads) for t in mem_scales)
        for q0 in range(0, n, gq):
            vis = None if visible is None else visible[:, :, q0 : q0 + gq]
            out[:, h0 : h0 + gh, q0 : q0 + gq] = _eager(
                q[:, h0 : h0 + gh, q0 : q0 + gq],
                sel[0],
                sel[1],
                vis,
                sel[2],
                sel[3],
                mem_valid,
                False,
                mem_top_k,
                mem_share,
                scales,
            )[0]
    return out


def _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid):
    c_min = clamp_value(q.dtype)
    if mem_k is not None:
        k = torch.cat([k, mem_k.to(k.dtype)], dim=2)
        v = torch.cat([v, mem_v.to(v.dtype)], dim=2)
        if visible is not None or mem_valid is not None:
            b, n = q.shape[0], q.shape[2]
            local_vis = visible if visible is not None else q.new_ones(1, 1, 1, 1, dtype=torch.bool)
            mem_vis = mem_valid[:, None, None, :] if mem_valid is not None else q.new_ones(1, 1, 1, 1, dtype=torch.bool)
            local_vis = local_vis.expand(b, 1, n, k.shape[2] - mem_k.shape[2])
            visible = torch.cat([local_vis, mem_vis.expand(b, 1, n, mem_k.shape[2])], dim=-1)
    mask = None
    if visible is not None:
        if q.is_cuda:
            # Query rows that see no key at all (left pads) are never read. Training on an H100 with bf16 autocast
            # and left-padded batches gave NaN gradients (fp32 did not); such rows are the suspected cause (not yet
            # verified on the GPU), so they see every key instead. Real rows are unaffected.
            visible = visible | ~visible.any(dim=-1, keepdim=True)
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, c_min)
    return _torch_sdpa(q, k, v, mask=mask)


def _torch_sdpa(q, k, v, *, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """torch's SDPA with the true 1/sqrt(d) scale; on GPUs the head dimension is zero-padded to a multiple of 8,
    which the fused kernels need (zero columns change no score or output)."""
    d = q.shape[-1]
    if q.is_cuda and d % 8:
        dim = kernel_head_dim(d)
        q, k, v = pad_to(q, dim), pad_to(k, dim), pad_to(v, dim)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1], scale=1.0 / math.sqrt(d)
    )
    return out[..., :d]


def kernel_head_dim(head_dim: int) -> int:
    """The head dimension fused kernels read: the next multiple of 8 (100 -> 104)."""
    return round_up(head_dim, 8)


def pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x zero-padded in the last dimension to `dim` (x itself when it is that wide already)."""
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


FEW_QUERIES = 16  # at most this many queries: a decoding step (few_query_attention)


def few_query_attention(q, k, v, visible, mem_k, mem_v, padded_mem, mem_top_k=None, mem_share=1, mem_scales=None):
    """Decoding: scores against local and memory keys in one softmax; no concatenation of the memory values.
    The memory is read as stored (zero-padded head dimension, contiguous rows), with q padded to match; with
    `mem_top_k`, each query keeps only its k best memory scores; `mem_share` as in the module docstring;
    `mem_scales` the (key, value) scales of an int8 memory (read chunk by chunk, never dequantized whole)."""
    c_min = clamp_value(q.dtype)
    local = _scores(q, k, visible, c_min)
    if mem_k is None:
        probs = torch.softmax(local, dim=-1, dtype=torch.float32).to(q.dtype)
        return _weighted(probs, v)
    d = q.shape[-1]
    if padded_mem is not None:
        mem_k, mem_v = padded_mem
    k_scale, v_scale = mem_scales if mem_scales is not None else (None, None)
    if k_scale is None:
        mem_k, mem_v = mem_k.to(q.dtype), mem_v.to(q.dtype)
    qp = pad_to(q, mem_k.shape[-1])
    mem_scores = _memory_scores(qp, mem_k, None, c_min, mem_top_k, mem_share, head_dim=d, k_scale=k_scale)
    scores = torch.cat([local, mem_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    kv = k.shape[2]
    mem_part = _memory_weighted(probs[..., kv:], mem_v, mem_share, v_scale)
    return _weighted(probs[..., :kv], v) + mem_part[..., :d]


def memory_inputs(mem_k, mem_v, mem_valid, padded_mem, mem_top_k):
    """The memory arguments as every implementation takes them: an empty memory as none, and no top k where the
    memory holds at most k keys (dense attention is then the same)."""
    if mem_k is not None and mem_k.shape[2] == 0:
        mem_k = mem_v = mem_valid = padded_mem = None
    if mem_k is None or mem_k.shape[2] <= (mem_top_k or 0):
        mem_top_k = None
    return mem_k, mem_v, mem_valid, padded_mem, mem_top_k


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None = None,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    mem_valid: torch.Tensor | None = None,
    impl: str = "eager",
    grouping: tuple[int, int] | None = None,
    mem_top_k: int | None = None,
    return_probs: bool = False,
    mem_share: int = 1,
    mem_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One softmax over local and memory keys by the exact implementation `impl` ("eager" or "sdpa"); see the
    module docstring for shapes. With `mem_top_k`, each query sees only its k highest-scoring memory keys (kNN
    memory; dense when the memory holds at most k keys). Probabilities (`return_probs`) come from "eager".
    `mem_share`: query rows per memory row (module docstring). `mem_scales`: the (key, value) scales (b, h_kv, M)
    of an int8 memory (memory.py), folded into the scores and probabilities chunk by chunk."""
    mem_k, mem_v, mem_valid, _, mem_top_k = memory_inputs(mem_k, mem_v, mem_valid, None, mem_top_k)
    share = mem_share if mem_k is not None else 1
    scales = mem_scales if mem_k is not None else None
    # SDPA takes one key set per row: a shared or int8 memory goes through the explicit joint softmax, not a copy.
    if impl == "sdpa" and not return_probs and mem_top_k is None and share == 1 and scales is None:
        return _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid), None
    if grouping is not None and not return_probs:
        return _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping, mem_top_k, share, scales), None
    return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs, mem_top_k, share, scales)
