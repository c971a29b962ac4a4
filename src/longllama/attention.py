"""Attention of one window over [local keys ; memory keys] with a single softmax, behind one signature.

`attend(q, k, v, ...)` is the entry point. Implementations:
    "eager"  the executable specification (SPEC B.4 steps 5-7): q.kT divided by sqrt(d) in the activation dtype,
             masked scores set to c_min = max(finfo.min, -1e6), one fp32 softmax over local and memory columns,
             probabilities cast back before they multiply the values. Supports `grouping` (heads, queries) chunks.
    "sdpa"   torch's scaled_dot_product_attention on the concatenated keys with a finite additive mask; the same
             function up to rounding (no -inf is ever produced, so fully masked rows give a uniform row, not NaN).

Shapes: q (b, h, q, d); k, v (b, h_kv, kv, d); visible (b or 1, 1, q, kv) bool or None (all visible);
mem_k, mem_v (b, h_kv, M, d) in the memory dtype; mem_valid (b, M) bool or None. Returns (b, h, q, d) and, for
"eager" with return_probs, the probabilities (b, h, q, kv + M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clamp_value(dtype: torch.dtype) -> float:
    """The score given to masked entries: max(finfo.min, -1e6) (the reference's clamp)."""
    return max(torch.finfo(dtype).min, -1e6)


def _scores(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None, c_min: float) -> torch.Tensor:
    """(b, h, q, kv) scores of grouped heads; q heads h_kv*g+j share kv head h_kv (no copy of k)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * n, d)  # (B, Hkv, G*Q, D)
    s = (qg @ k.transpose(-1, -2)).view(b, h, n, k.shape[2]) / math.sqrt(d)
    if visible is not None:
        s = s.masked_fill(~visible, c_min)
    return s.clamp_min(c_min)


def _weighted(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, n, kv = p.shape
    hkv = v.shape[1]
    out = p.reshape(b, hkv, (h // hkv) * n, kv) @ v  # (B, Hkv, G*Q, D)
    return out.view(b, h, n, v.shape[-1])


def _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs):
    c_min = clamp_value(q.dtype)
    scores = _scores(q, k, visible, c_min)
    values = v
    if mem_k is not None:
        mem_visible = None if mem_valid is None else mem_valid[:, None, None, :]
        mem_scores = _scores(q, mem_k.to(k.dtype), mem_visible, c_min)
        scores = torch.cat([scores, mem_scores], dim=-1)
        values = torch.cat([v, mem_v.to(v.dtype)], dim=2)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return _weighted(probs, values), (probs if return_probs else None)


def _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping):
    """Memory attention in (heads, queries) chunks, to bound the size of the score matrix."""
    gh, gq = grouping
    b, h, n, _ = q.shape
    rep = h // k.shape[1]
    out = torch.empty_like(q)
    for h0 in range(0, h, gh):
        kv_heads = torch.arange(h0, min(h, h0 + gh), device=q.device) // rep
        sel = [None if t is None else t.index_select(1, kv_heads) for t in (k, v, mem_k, mem_v)]
        for q0 in range(0, n, gq):
            vis = None if visible is None else visible[:, :, q0:q0 + gq]
            out[:, h0:h0 + gh, q0:q0 + gq] = _eager(
                q[:, h0:h0 + gh, q0:q0 + gq], sel[0], sel[1], vis, sel[2], sel[3], mem_valid, False)[0]
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
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, c_min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, visible: torch.Tensor | None = None,
           mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
           mem_valid: torch.Tensor | None = None, impl: str = "eager",
           grouping: tuple[int, int] | None = None,
           return_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One softmax over local and memory keys; see the module docstring for shapes."""
    if mem_k is not None and mem_k.shape[2] == 0:
        mem_k = mem_v = mem_valid = None
    if impl == "sdpa" and not return_probs:
        return _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid), None
    if grouping is not None and not return_probs:
        return _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping), None
    return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs)
