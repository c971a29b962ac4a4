"""Attention of one window over [local keys ; memory keys] with a single softmax, behind one signature.

`attend(q, k, v, ...)` is the entry point. Implementations:
    "eager"  the executable specification (SPEC B.4 steps 5-7): q.kT divided by sqrt(d) in the activation dtype,
             masked scores set to c_min = max(finfo.min, -1e6), one fp32 softmax over local and memory columns,
             probabilities cast back before they multiply the values. Supports `grouping` (heads, queries) chunks.
    "sdpa"   torch's scaled_dot_product_attention on the concatenated keys with a finite additive mask; the same
             function up to rounding (no -inf is ever produced, so fully masked rows give a uniform row, not NaN).
    "fast"   no copy of the memory per call. Windows of many queries: local and memory attention run as two fused
             attentions that return their log-sum-exp, merged exactly into one softmax (cuDNN's or FlashAttention's
             kernel on CUDA, see CUDA_KERNEL / MEMORY_KERNEL; torch's blockwise kernel or explicit fp32 maths
             elsewhere); the memory is read as stored, zero-padded in the head dimension (a multiple of 16 on GPUs,
             memory_storage_dim), by FlashAttention 4 where it serves (flash4.py: one call, or for a window
             group two, flash4.group_attention), else in pieces of MEMORY_PIECE x 2^j keys for cuDNN.
             window_attention is the ingest path (windows with no local cache: inputs padded once by
             fused.rope_pad, several memory windows of one sequence as a batch, windows.WINDOW_GROUP_TOKENS, the
             merge fused with the heads' layout). With `mem_top_k`
             (kNN memory) each query's k best memory keys are chosen over chunks of scores and attended in fp32.
             A few queries (decoding): one joint softmax over local and memory scores, values applied as two
             products instead of a concatenation. Padded inputs and cross-batch training memory (masks over keys)
             take "sdpa" on GPUs and "eager" elsewhere.

Shapes: q (b, h, q, d); k, v (b, h_kv, kv, d); visible (b or 1, 1, q, kv) bool or None (all visible);
mem_k, mem_v (b, h_kv, M, d) in the memory dtype; mem_valid (b, M) bool or None. Returns (b, h, q, d) and, for
"eager" with return_probs, the probabilities (b, h, q, kv + M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longllama import flash4


def clamp_value(dtype: torch.dtype) -> float:
    """The score given to masked entries: max(finfo.min, -1e6) (the reference's clamp)."""
    return max(torch.finfo(dtype).min, -1e6)


def _scores(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None, c_min: float, *,
            head_dim: int | None = None) -> torch.Tensor:
    """(b, h, q, kv) scores of grouped heads; q heads h_kv*g+j share kv head h_kv (no copy of k). Divided by
    sqrt(head_dim), the true head dimension when q and k are zero-padded (default: q's last dimension)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * n, d)  # (B, Hkv, G*Q, D)
    s = (qg @ k.transpose(-1, -2)).view(b, h, n, k.shape[2]) / math.sqrt(head_dim or d)
    if visible is not None:
        s = s.masked_fill(~visible, c_min)
    return s.clamp_min(c_min)


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


def _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs, mem_top_k=None):
    c_min = clamp_value(q.dtype)
    scores = _scores(q, k, visible, c_min)
    values = v
    if mem_k is not None:
        mem_visible = None if mem_valid is None else mem_valid[:, None, None, :]
        mem_scores = _keep_top_k(_scores(q, mem_k.to(k.dtype), mem_visible, c_min), mem_top_k, c_min)
        scores = torch.cat([scores, mem_scores], dim=-1)
        values = torch.cat([v, mem_v.to(v.dtype)], dim=2)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return _weighted(probs, values), (probs if return_probs else None)


def _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping, mem_top_k=None):
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
                q[:, h0:h0 + gh, q0:q0 + gq], sel[0], sel[1], vis, sel[2], sel[3], mem_valid, False, mem_top_k)[0]
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
        q, k, v = _pad_to(q, dim), _pad_to(k, dim), _pad_to(v, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         enable_gqa=k.shape[1] != q.shape[1], scale=1.0 / math.sqrt(d))
    return out[..., :d]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kernel_head_dim(head_dim: int) -> int:
    """The head dimension fused kernels read: the next multiple of 8 (100 -> 104)."""
    return _round_up(head_dim, 8)


def _pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


# Fused CUDA kernels for bf16/fp16 partial attention: "flash", "cudnn" or "auto" (fp32 always uses "efficient").
# "auto" takes cuDNN's kernel where it applies (bf16/fp16, head dimension a multiple of 8 up to 128), else
# FlashAttention; cuDNN builds an execution plan per new shape (~38 ms on an H100), then reuses it.
# CUDA_KERNEL: local attention (one shape per window size). On an H100 (profile_step.py, 2026-11-26) FlashAttention
# ran the 3B model's causal 2048-token windows at ~134 TFLOP/s (head_dim 100 padded to 104).
CUDA_KERNEL = "auto"
# MEMORY_KERNEL: memory attention ("auto", "fa4", "cudnn" or "flash"). "auto" takes FlashAttention 4 where it is
# installed, on Hopper GPUs (flash4.py: level with cuDNN kernel for kernel at 112, no per-shape plans, one call per
# window group), else the CUDA_KERNEL choice. On an H100
# (2048 queries x 64k keys, 32 heads, head_dim 100 counted; profile_step.py, 2026-11-26) cuDNN ran 524 TFLOP/s
# with the head dimension padded to 112 (the memory's storage on GPUs) and 465 at 104, FlashAttention 2 236-263 at
# 104-128. cuDNN builds a plan for every new shape, so the memory is read in pieces of
# MEMORY_PIECE x 2^j keys (the binary digits of M / MEMORY_PIECE, largest first; a rest under MEMORY_PIECE keys goes
# to FlashAttention): a process builds at most ~log2(M / MEMORY_PIECE) plans per query count, not one per length.
MEMORY_KERNEL = "auto"
MEMORY_PIECE = 1024
# FlashAttention only: split the memory into equal chunks of this many keys run as the batch of one kernel call,
# merged by their log-sum-exp (split-KV). 0 (the default): one call. Measured on an H200 for the small model (4 heads,
# 512 queries, benchmarks/bench_memory_attention.py): 32 chunks of 2k keys took 0.27 ms against 0.15 ms for one call
# at 64k memory keys and saved 4 % at 1M, so no automatic split.
MEMORY_CHUNK = 0


# Zero-padded head dimensions on GPUs: the memory is stored as a multiple of MEMORY_WIDTH and local attention pads
# q, k and v to a multiple of LOCAL_WIDTH (memory layers pad them to the memory's width instead, so that one padded q
# serves both). Measured on an H100 for the 3B shape (head_dim 100; bench_inference.py, h100-2026-11-26.json runs
# k, m, m1, n, n0, n1, p2): LOCAL_WIDTH 16 (112 instead of 104, where cuDNN's causal kernel is faster) and the
# rope_pad kernel ingested 256k tokens in 5.87 s against 6.04 s with 104 and Inductor's rope_pad; the memory stored
# 128 wide (MEMORY_WIDTH 64) took it to 5.63 s but decoding after 256k from 7.03 to 7.50 ms/token. With
# FlashAttention 4's 192 x 144 tile (flash4.TILES) the memory 112 wide ingests 256k tokens in 5.45-5.56 s (runs q,
# q1, s). Stored 104 wide (MEMORY_WIDTH 8; h100-2026-11-26-session9.txt, tune-decode.txt, run p2) a decoding step
# reads its rows no faster (1193 against 1208 us per layer over 256k keys) and FlashAttention 4 ran ~27 % slower on
# them, even read 112 wide through overlapping strided views; so MEMORY_WIDTH stays 16.
# bench_inference.py --memory-width / --local-width time other settings.
MEMORY_WIDTH = 16
LOCAL_WIDTH = 16


def local_width(head_dim: int) -> int:
    """The head dimension local attention pads q, k and v to: a multiple of LOCAL_WIDTH."""
    return _round_up(head_dim, LOCAL_WIDTH)


def memory_storage_dim(head_dim: int, device: torch.device) -> int:
    """The head dimension a memory is stored with for attention on `device` (zero-padded): a multiple of MEMORY_WIDTH
    on GPUs (100 -> 112 by default), of 8 elsewhere."""
    return _round_up(head_dim, MEMORY_WIDTH) if device.type == "cuda" else kernel_head_dim(head_dim)


def memory_pieces(m: int, unit: int) -> list[tuple[int, int]]:
    """[start, end) pieces of m keys: lengths unit * 2^j for the binary digits of m // unit (largest first), then
    the rest (< unit keys), if any."""
    pieces, start = [], 0
    units = m // unit
    for bit in reversed(range(units.bit_length())):
        if units >> bit & 1:
            pieces.append((start, start + (unit << bit)))
            start += unit << bit
    if start < m:
        pieces.append((start, m))
    return pieces


def resolve_kernel(q: torch.Tensor, kernel: str) -> str:
    """The CUDA kernel "auto" stands for with inputs like q (see CUDA_KERNEL); other names are returned as given."""
    if kernel != "auto":
        return kernel
    usable = (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
              and q.shape[-1] <= 128 and torch.backends.cuda.cudnn_sdp_enabled())
    return "cudnn" if usable else "flash"


def resolve_memory_kernel(q: torch.Tensor, kernel: str | None = None) -> str:
    """The memory-attention kernel for queries like q: "auto" (see MEMORY_KERNEL) is "fa4" where FlashAttention 4
    serves (flash4.usable), else as resolve_kernel; "fa4" where it does not serve is "auto"'s other choice."""
    kernel = kernel or MEMORY_KERNEL
    if kernel in ("auto", "fa4"):
        return "fa4" if flash4.usable(q) else resolve_kernel(q, "auto")
    return kernel


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                     kernel: str | None = None, used: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_attention of q (b, h, n, d) over memory keys k, v (b, h_kv, M, d); out in fp32, or in q's dtype from
    FlashAttention 4 (one call). cuDNN reads the memory in pieces (see MEMORY_PIECE), FlashAttention 2 in one call or
    in MEMORY_CHUNK chunks; all views of the memory, no copy for h_kv = h. `used`: per row of q, the prefix of the
    memory (>= 1 keys, k and v then of batch 1) it sees, in one FlashAttention 4 call or one call per row."""
    kernel = resolve_memory_kernel(q, kernel)
    if kernel == "fa4":
        try:
            return flash4.memory_attention(q, k, v, scale=scale, used=used)
        except Exception as exc:  # noqa: BLE001 - reported once; cuDNN serves from here on
            flash4.failed(exc)
            kernel = resolve_kernel(q, "auto")
    if used is not None:
        rows = [memory_attention(q[i:i + 1], k[:, :, :m], v[:, :, :m], scale=scale, kernel=kernel)
                for i, m in enumerate(used)]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    h, m = q.shape[1], k.shape[2]
    if kernel != "cudnn":
        return _chunked_memory_attention(q, k, v, scale=scale, kernel=kernel)
    acc = None
    for start, end in memory_pieces(m, MEMORY_PIECE):
        out, lse = partial_attention(q, _expand_heads(k[:, :, start:end], h), _expand_heads(v[:, :, start:end], h),
                                     causal=False, scale=scale,
                                     kernel="cudnn" if end - start >= MEMORY_PIECE else "flash")
        acc = (out.float(), lse) if acc is None else merge_partials(*acc, out, lse, with_lse=True)
    return acc


def _chunked_memory_attention(q, k, v, *, scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    m = k.shape[2]
    chunk = MEMORY_CHUNK or m
    parts = []
    full = m // chunk * chunk if chunk < m else 0
    if full:
        c = full // chunk
        rows = []
        for i in range(b):  # per batch row, so that the chunk split is a view of the memory
            ck, cv = (_expand_heads(x[i:i + 1, :, :full], h).unflatten(2, (c, chunk)).transpose(1, 2)[0]
                      for x in (k, v))
            out, lse = partial_attention(q[i:i + 1].expand(c, h, n, d), ck, cv, causal=False, scale=scale,
                                         kernel=kernel)
            rows.append(_merge_chunks(out.float(), lse))
        parts.append((torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])))
    if full < m:
        out, lse = partial_attention(q, _expand_heads(k[:, :, full:], h), _expand_heads(v[:, :, full:], h),
                                     causal=False, scale=scale, kernel=kernel)
        parts.append((out.float(), lse))
    out, lse = parts[0]
    if len(parts) > 1:
        out, lse = merge_partials(out, lse, *parts[1], with_lse=True)
    return out, lse


_TOP_K_SCORES = 1 << 27  # score elements per chunk of keys when selecting the top k (256 MiB in bf16)
_TOP_K_GATHERED = 1 << 25  # gathered key elements per chunk of queries


def top_k_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its own `top_k` memory keys by inner product (exact kNN, FoT's kNN memory),
    with its log-sum-exp: q (b, h, n, d), k, v (b, h_kv, M, d) -> (b, h, n, d) fp32, (b, h, n) fp32.

    The keys are chosen by scores in q's dtype, over chunks of the memory (a running top k); the chosen keys' scores
    (recomputed unless q and k are fp32) and the weighted sum are then computed in fp32."""
    b, h, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    rows = (h // hkv) * n
    qg = q.reshape(b, hkv, rows, d)
    step = max(top_k, _TOP_K_SCORES // (b * h * n))
    best = index = None
    for start in range(0, m, step):
        s = qg @ k[:, :, start:start + step].transpose(-1, -2)  # (b, hkv, rows, chunk)
        vals, idx = s.topk(min(top_k, s.shape[-1]), dim=-1, sorted=False)
        idx = idx + start
        if best is not None:
            vals, idx = torch.cat([best, vals], dim=-1), torch.cat([index, idx], dim=-1)
            vals, pick = vals.topk(top_k, dim=-1, sorted=False)
            idx = idx.gather(-1, pick)
        best, index = vals, idx
    kk = index.shape[-1]
    out = q.new_empty(b, hkv, rows, v.shape[-1], dtype=torch.float32)
    lse = q.new_empty(b, hkv, rows, dtype=torch.float32)
    span = max(1, _TOP_K_GATHERED // (b * hkv * kk * d))
    batch = torch.arange(b, device=q.device)[:, None, None]
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    exact = q.dtype == torch.float32 and k.dtype == torch.float32  # the selection's scores are already fp32
    for r0 in range(0, rows, span):
        sel = index[:, :, r0:r0 + span]
        flat = sel.reshape(b, hkv, -1)  # advanced indexing: ~5x torch.gather with an expanded index on CPUs
        cv = v[batch, heads, flat].view(*sel.shape, v.shape[-1]).float()
        if exact:
            scores = best[:, :, r0:r0 + span] * scale
        else:
            ck = k[batch, heads, flat].view(*sel.shape, d).float()
            scores = torch.einsum("bhrkd,bhrd->bhrk", ck, qg[:, :, r0:r0 + span].float()) * scale
        lse[:, :, r0:r0 + span] = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[:, :, r0:r0 + span, None])
        out[:, :, r0:r0 + span] = torch.einsum("bhrk,bhrkd->bhrd", weights, cv)
    return out.view(b, h, n, -1), lse.view(b, h, n)


def _merge_chunks(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, h, n, d) attentions over c disjoint key sets with their (c, h, n) log-sum-exp -> (1, h, n, d), (1, h, n)."""
    total = torch.logsumexp(lse, dim=0, keepdim=True)
    weights = torch.exp(lse - total).unsqueeze(-1)
    return (out * weights).sum(0, keepdim=True), total


def kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype the fused kernels get: autocast's where it is on (fp32 weights under bf16 autocast give fp32
    rotated q/k next to a bf16 v), else the promotion of the inputs. The aten kernels called below do not check
    that q, k and v agree, and read mixed dtypes as garbage."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _cuda_partial(q, k, v, causal: bool, scale: float, kernel: str):
    ops = torch.ops.aten
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"partial attention needs one dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    kernel = resolve_kernel(q, kernel)
    if q.dtype == torch.float32:
        kernel = "efficient"
    if kernel == "cudnn":
        return ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    if kernel == "efficient":
        return ops._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]


_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes of torch's blockwise CPU kernel


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                      kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked (or top-left causal) attention that also returns its log-sum-exp (b, h, n) in fp32.
    q, k, v have the same number of heads and a head dimension that is a multiple of 8."""
    n = q.shape[2]
    if q.is_cuda:
        out, lse = _cuda_partial(q, k, v, causal, scale, kernel or CUDA_KERNEL)
        return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., :n].float()
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not differentiable and q.dtype == k.dtype == v.dtype and q.dtype in _CPU_FLASH_DTYPES:
        # torch's blockwise CPU kernel: never holds the (n, m) scores; ~5x the explicit maths at m = 32k.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse.float()
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype), lse


def merge_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor, *,
                   with_lse: bool = False):
    """Combine two attentions over disjoint key sets into the attention over their union (one softmax).
    o1 may be an fp32 accumulator; the result has o1's dtype (and its log-sum-exp too, with `with_lse`)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    out = (o1.float() * w1 + o2.float() * w2).to(o1.dtype)
    return (out, lse) if with_lse else out


class _JointAttention(torch.autograd.Function):
    """One softmax of every query over its causal window plus other key sets, each attended by a fused kernel that
    returns its log-sum-exp; differentiable. Part j is (rows_j, k_j, v_j): the queries q[rows_j] (batch entries)
    see all keys of k_j, v_j (one entry per row). Forward merges the parts' outputs by their log-sum-exp; backward
    runs each part's kernel backward with the merged output and log-sum-exp, which is exactly the gradient of the
    joint softmax restricted to that part's keys (no gradient through a log-sum-exp is needed)."""

    @staticmethod
    def forward(ctx, scale, rows, q, k, v, *parts):
        out, raw = _kernel_forward(q, k, v, True, scale)
        n = q.shape[2]
        lse = raw[..., :n].float()
        acc = out.float()
        for j, index in enumerate(rows):
            o_j, raw_j = _kernel_forward(q[index], parts[2 * j], parts[2 * j + 1], False, scale)
            acc[index], lse[index] = merge_partials(acc[index], lse[index], o_j, raw_j[..., :n].float(),
                                                    with_lse=True)
        out = acc.to(q.dtype)
        raw = raw.clone()
        raw[..., :n] = lse
        ctx.save_for_backward(q, k, v, out, raw, *parts)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, raw, *parts = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = _kernel_backward(grad, q, k, v, out, raw, True, ctx.scale)
        dq = dq.clone()
        grads = []
        for j, index in enumerate(ctx.rows):
            gq, gk, gv = _kernel_backward(grad[index], q[index], parts[2 * j], parts[2 * j + 1], out[index],
                                          raw[index], False, ctx.scale)
            dq.index_add_(0, index, gq)
            grads += [gk, gv]
        return None, None, dq, dk, dv, *grads


def _kernel_forward(q, k, v, causal: bool, scale: float):
    """Output and log-sum-exp as the kernel lays it out (what its backward takes)."""
    if q.is_cuda:
        return _cuda_partial(q, k, v, causal, scale, "flash")  # bf16 / fp16 only: joint_attention_supported
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _kernel_backward(grad, q, k, v, out, lse, causal: bool, scale: float):
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, scale=scale)
    n, m = q.shape[2], k.shape[2]
    # None: undefined tensors, as the forward returns them for a dense batch (no sequence offsets) without dropout
    # (no random state); an empty tensor would read as a variable-length batch.
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse.contiguous(), None, None, n, m, 0.0, causal, None, None, scale=scale)


def joint_attention_supported(*tensors: torch.Tensor) -> bool:
    """Whether joint_attention has fused kernels for these inputs: on CPUs always, on GPUs in bf16 / fp16
    (FlashAttention; fp32 CUDA training keeps the masked SDPA path)."""
    return not tensors[0].is_cuda or kernel_dtype(*tensors) in (torch.bfloat16, torch.float16)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Causal attention of q (b, h, n, d) over k, v (b, h_kv, n, d), joined in one softmax with, for each part
    (rows, k_j, v_j), all keys of k_j, v_j (len(rows), h_kv, m_j, d) for the queries of batch entries `rows`
    (an int64 index; an entry may appear in several parts). Differentiable; fused kernels (FlashAttention on CUDA,
    torch's blockwise kernel on CPUs) for the forward and backward passes. The cross-batch memory of FoT training."""
    dtype = kernel_dtype(q, k, v, *(t for part in parts for t in part[1:]))
    h, d = q.shape[1], q.shape[-1]
    dim = kernel_head_dim(d) if q.is_cuda else d

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return _pad_to(_expand_heads(x, h).to(dtype), dim)

    rows = [part[0] for part in parts]
    flat = [prepare(t) for part in parts for t in part[1:]]
    out = _JointAttention.apply(1.0 / math.sqrt(d), rows, prepare(q), prepare(k), prepare(v), *flat)
    return out[..., :d]


FEW_QUERIES = 16


def _fast(q, k, v, visible, is_causal, mem_k, mem_v, mem_valid, padded_mem, mem_top_k=None, pad=None):
    local_plain = visible is None or is_causal
    top_k = mem_top_k  # attend() leaves it None where the memory holds at most k keys
    if top_k is not None and (mem_valid is not None or (q.requires_grad and torch.is_grad_enabled())):
        # Padding or gradients with a top-k memory: the exact maths (a masked top k of the full scores).
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, top_k)[0]
    if top_k is not None and not local_plain and q.shape[2] > FEW_QUERIES:
        # A window after a local cache: the local part under its mask (explicit maths, every query sees itself),
        # the memory part by kNN, merged by their log-sum-exp; no copy of the memory.
        dtype = kernel_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scale = 1.0 / math.sqrt(q.shape[-1])
        h = q.shape[1]
        s = (q.float() @ _expand_heads(k, h).float().transpose(-1, -2)) * scale
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.exp(s - lse[..., None]) @ _expand_heads(v, h).float()
        mem_out, mem_lse = top_k_memory_attention(q, mem_k.to(dtype), mem_v.to(dtype), top_k=top_k, scale=scale)
        return merge_partials(out, lse, mem_out, mem_lse).to(dtype)
    if q.requires_grad and torch.is_grad_enabled() and q.is_cuda:
        # Training: torch's public SDPA (flash for the plain causal case) has the backward passes; the
        # log-sum-exp merge below is for inference only.
        if mem_k is None and mem_valid is None and local_plain:
            return _torch_sdpa(q, k, v, causal=bool(is_causal))
        return _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid)
    if mem_valid is not None or not local_plain:
        # Padding, or cross-batch training memory: one masked fused attention over the joined keys (differentiable)
        # on GPUs, the exact maths elsewhere.
        if q.is_cuda:
            return _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid)
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False)[0]
    dtype = kernel_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    d = q.shape[-1]
    if q.shape[2] <= FEW_QUERIES:
        return few_query_attention(q, k, v, visible, mem_k, mem_v, padded_mem, top_k)
    dim = kernel_head_dim(d)
    scale = 1.0 / math.sqrt(d)
    out, lse = _local_partial(q, k, v, bool(is_causal), scale, pad)
    if mem_k is not None:
        if top_k is not None:
            mem_out, mem_lse = top_k_memory_attention(q, mem_k.to(q.dtype), mem_v.to(q.dtype), top_k=top_k,
                                                      scale=scale)
        else:
            pk, pv = _as_stored(padded_mem if padded_mem is not None else (mem_k, mem_v), q.dtype, dim)
            mem_out, mem_lse = _over_memory(q, pk, pv, scale)
        out = merge_partials(out.float(), lse, mem_out[..., :d], mem_lse)  # the merge in fp32
    return out.to(q.dtype)


def _local_partial(q, k, v, causal: bool, scale: float, pad=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention with its log-sum-exp by the CUDA_KERNEL choice: q, k, v padded to a multiple of LOCAL_WIDTH (by
    `pad`, fused.pad_to compiled or not), the output cut back to q's head dimension."""
    pad = pad or _pad_to
    d, h = q.shape[-1], q.shape[1]
    dim = local_width(d)
    out, lse = partial_attention(pad(q, dim), _expand_heads(pad(k, dim), h), _expand_heads(pad(v, dim), h),
                                 causal=causal, scale=scale, kernel=CUDA_KERNEL)
    return out[..., :d], lse


def _as_stored(padded_mem: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
               dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory keys and values in `dtype`, in their stored (padded) head dimension when kernels can read it (a
    multiple of 8), else padded to `dim`."""
    pk, pv = padded_mem
    mdim = pk.shape[-1] if pk.shape[-1] % 8 == 0 else dim
    return _pad_to(pk.to(dtype), mdim), _pad_to(pv.to(dtype), mdim)


def _over_memory(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float, used: list[int] | None = None):
    """memory_attention of q (true head dimension) over memory keys/values as _as_stored gives them (`used` as
    there); the output cut back to q's head dimension."""
    out, lse = memory_attention(_pad_to(q, pk.shape[-1]), pk, pv, scale=scale, used=used)
    return out[..., :q.shape[-1]], lse


def _group_over_memory(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float,
                       used: list[int] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """_over_memory for the rows of a window group, as partial attentions for merge_heads: by
    flash4.group_attention where FlashAttention 4 serves and flash4.splits_group says so, else one part."""
    if (used is not None and len(used) > 1 and flash4.splits_group(pk.shape[-1], q.shape[2])
            and resolve_memory_kernel(q) == "fa4"):
        try:
            parts = flash4.group_attention(_pad_to(q, pk.shape[-1]), pk, pv, scale=scale, used=used)
        except ValueError:  # prefixes it does not split: the one call below
            pass
        except Exception as exc:  # noqa: BLE001 - reported once; the one call below from here on
            flash4.split_failed(exc)
        else:
            return [(out[..., :q.shape[-1]], lse) for out, lse in parts]
    return [_over_memory(q, pk, pv, scale, used=used)]


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


def merge_heads(out: torch.Tensor, lse: torch.Tensor, mem_out: torch.Tensor, mem_lse: torch.Tensor,
                head_dim: int, more: tuple = ()) -> torch.Tensor:
    """Local and memory partial attentions (b, h, n, w) with their log-sum-exp (b, h, n) merged in fp32 into one
    softmax, in out's dtype, laid out as o_proj's input (b, n, h * head_dim). `more`: (out, lse) pairs over further
    memory keys, merged first (merge_memory_parts)."""
    mem, mem_lse = merge_memory_parts(((mem_out, mem_lse), *more), head_dim)
    merged = merge_partials(out[..., :head_dim].float(), lse, mem, mem_lse)
    return heads(merged.to(out.dtype), head_dim)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, *,
                     padded_mem: tuple[torch.Tensor, torch.Tensor] | None = None, used: list[int] | None = None,
                     ops=None) -> torch.Tensor:
    """The ingest path: windows with no local cache and no padding (causal), each in one softmax over its causal
    keys and, with `padded_mem`, the memory. q (b, h, n, w), k, v (b, h_kv, n, w) are rotated as the layer needs
    and zero-padded to w, a multiple of 8 >= head_dim (the memory's stored width where there is a memory:
    fused.rope_pad); padded_mem (1 or b, h_kv, M, w') the memory as stored; `used`: per row, the prefix of the
    memory it sees (0: none; None: all M; the rows of a window group, see windows.WINDOW_GROUP_TOKENS). `ops`:
    merge_heads and heads, compiled or not (fused.Ops; default the plain ones). Returns o_proj's input
    (b, n, h * head_dim) in the kernels' dtype."""
    merge, lay_out = (ops.merge_heads, ops.heads) if ops is not None else (merge_heads, heads)
    dtype = kernel_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    h = q.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = partial_attention(q, _expand_heads(k, h), _expand_heads(v, h), causal=True, scale=scale,
                                 kernel=CUDA_KERNEL)
    first = 0 if used is None else next((j for j, m in enumerate(used) if m), len(used))  # prefixes increase
    if padded_mem is None or padded_mem[0].shape[2] == 0 or first == q.shape[0]:
        return lay_out(out, head_dim)
    pk, pv = _as_stored(padded_mem, dtype, q.shape[-1])
    parts = _group_over_memory(q[first:], pk, pv, scale, None if used is None else used[first:])
    merged = merge(out[first:], lse[first:], *parts[0], head_dim, more=tuple(parts[1:]))
    return merged if first == 0 else torch.cat([lay_out(out[:first], head_dim), merged])


def few_query_attention(q, k, v, visible, mem_k, mem_v, padded_mem, mem_top_k=None):
    """Decoding: scores against local and memory keys in one softmax; no concatenation of the memory values.
    The memory is read as stored (zero-padded head dimension, contiguous rows), with q padded to match; with
    `mem_top_k`, each query keeps only its k best memory scores."""
    c_min = clamp_value(q.dtype)
    local = _scores(q, k, visible, c_min)
    if mem_k is None:
        probs = torch.softmax(local, dim=-1, dtype=torch.float32).to(q.dtype)
        return _weighted(probs, v)
    d = q.shape[-1]
    if padded_mem is not None:
        mem_k, mem_v = padded_mem
    mem_k, mem_v = mem_k.to(q.dtype), mem_v.to(q.dtype)
    qp = _pad_to(q, mem_k.shape[-1])
    mem_scores = _keep_top_k(_scores(qp, mem_k, None, c_min, head_dim=d), mem_top_k, c_min)
    scores = torch.cat([local, mem_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    kv = k.shape[2]
    return _weighted(probs[..., :kv], v) + _weighted(probs[..., kv:], mem_v)[..., :d]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, visible: torch.Tensor | None = None,
           mem_k: torch.Tensor | None = None, mem_v: torch.Tensor | None = None,
           mem_valid: torch.Tensor | None = None, impl: str = "eager",
           grouping: tuple[int, int] | None = None, is_causal: bool = False,
           padded_mem: tuple[torch.Tensor, torch.Tensor] | None = None, mem_top_k: int | None = None,
           return_probs: bool = False, pad=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One softmax over local and memory keys; see the module docstring for shapes. With `mem_top_k`, each query
    sees only its k highest-scoring memory keys (kNN memory; dense when the memory holds at most k keys).

    `is_causal` tells that `visible` is exactly the top-left causal mask of a window with no local cache and no
    padding (fast kernels then need no mask); `padded_mem` are the memory keys/values as stored, zero-padded in the
    head dimension (MemoryCache.padded()); `pad(x, dim)` zero-pads local inputs for kernels (fused.pad_to, compiled
    or not)."""
    if mem_k is not None and mem_k.shape[2] == 0:
        mem_k = mem_v = mem_valid = padded_mem = None
    if mem_k is None or mem_k.shape[2] <= (mem_top_k or 0):
        mem_top_k = None
    if impl == "fast" and not return_probs:
        return _fast(q, k, v, visible, is_causal, mem_k, mem_v, mem_valid, padded_mem, mem_top_k, pad), None
    if impl == "sdpa" and not return_probs and mem_top_k is None:
        return _sdpa(q, k, v, visible, mem_k, mem_v, mem_valid), None
    if grouping is not None and not return_probs:
        return _eager_grouped(q, k, v, visible, mem_k, mem_v, mem_valid, grouping, mem_top_k), None
    return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, return_probs, mem_top_k)
