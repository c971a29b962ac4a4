"""The elementwise work of a layer as small pure functions in plain PyTorch: RMSNorm, the residual add before it,
RoPE, SwiGLU, zero padding for kernels, the log-sum-exp merge of partial attentions and the heads' layout for the
output projection; and `Ops`, the set of them one forward uses. `EAGER` is these functions as written; the fast
wing builds the same set compiled by torch.compile, with Triton kernels where they apply (fast/fused.py). The maths
is the same; compiled kernels may round differently within the activation dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longllama.attention import few_query_attention, pad_to


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (the order of the reference and of LLaMA)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + a and its RMSNorm."""
    h = x + a
    return h, rms_norm(h, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def linear_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu(F.linear(x, gate), F.linear(x, up))


def rope_pad(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int, rotate_qk: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A window's attention inputs for the kernels: q (b, n, h, d) and k, v (b, n, h_kv, d) as projected (token-major,
    no transpose), q and k rotated by cos, sin (b|1, n, 1, d) when `rotate_qk`, all three zero-padded to `width`:
    (b, n, heads, width) each. Compiled, this is one pass over q, k and v instead of a rotation and three
    transposing pads."""
    if rotate_qk:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return pad_to(q, width), pad_to(k, width), pad_to(v, width)


def merge_partials(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor, *, with_lse: bool = False
):
    """Combine two attentions over disjoint key sets into the attention over their union (one softmax).
    o1 may be an fp32 accumulator; the result has o1's dtype (and its log-sum-exp too, with `with_lse`)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    out = (o1.float() * w1 + o2.float() * w2).to(o1.dtype)
    return (out, lse) if with_lse else out


def heads(out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """An attention output (b, h, n, w >= head_dim) laid out as o_proj's input (b, n, h * head_dim)."""
    b, h, n, _ = out.shape
    return out[..., :head_dim].transpose(1, 2).reshape(b, n, h * head_dim)


def merge_memory_parts(parts, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attentions (out (b', h, n, w), lse (b', h, n)) over disjoint memory key sets merged in fp32 into one
    (out (b, h, n, head_dim), lse), b the first part's rows; a later part of fewer rows covers the last rows (the
    others see none of its keys; flash4.group_attention)."""
    (mem, mem_lse), *more = parts
    mem = mem[..., :head_dim].float()
    for part, part_lse in more:
        skip = mem.shape[0] - part.shape[0]
        part = F.pad(part[..., :head_dim].float(), (0, 0, 0, 0, 0, 0, skip, 0))
        part_lse = F.pad(part_lse, (0, 0, 0, 0, skip, 0), value=-math.inf)  # weight 0 in the merge
        mem, mem_lse = merge_partials(mem, mem_lse, part, part_lse, with_lse=True)
    return mem, mem_lse


def merge_heads(
    out: torch.Tensor, lse: torch.Tensor, mem_out: torch.Tensor, mem_lse: torch.Tensor, head_dim: int, more: tuple = ()
) -> torch.Tensor:
    """Local and memory partial attentions (b, h, n, w) with their log-sum-exp (b, h, n) merged in fp32 into one
    softmax, in out's dtype, laid out as o_proj's input (b, n, h * head_dim). `more`: (out, lse) pairs over further
    memory keys, merged first (merge_memory_parts)."""
    mem, mem_lse = merge_memory_parts(((mem_out, mem_lse), *more), head_dim)
    merged = merge_partials(out[..., :head_dim].float(), lse, mem, mem_lse)
    return heads(merged.to(out.dtype), head_dim)


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    rotate: Callable
    swiglu: Callable
    pad_to: Callable
    rope_pad: Callable  # rotation and zero padding of a window's q, k, v for the kernels (the ingest path)
    merge_heads: Callable  # local and memory partials merged into one softmax, laid out as o_proj's input
    heads: Callable  # an attention output laid out as o_proj's input
    few_query_attention: Callable  # a decoding step's attention (scores, mask, softmax and the two products)
    linear: Callable  # x @ weight.T, plus an optional residual (the non-eager sets add it inside the product)
    linear_swiglu: Callable  # silu(x @ gate.T) * (x @ up.T)


EAGER = Ops(
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rotate=rotate,
    swiglu=swiglu,
    pad_to=pad_to,
    rope_pad=rope_pad,
    merge_heads=merge_heads,
    heads=heads,
    few_query_attention=few_query_attention,
    linear=F.linear,
    linear_swiglu=linear_swiglu,
)
