"""The fast attention path (the plan's attention "fast"): the same function as the exact attention (attention.py),
with no copy of the memory per call.

Windows of many queries: local and memory attention run as two fused attentions that return their log-sum-exp,
merged exactly into one softmax (ops.merge_partials): cuDNN's or FlashAttention's kernel on CUDA (the plan's
local_kernel / memory_kernel), torch's blockwise kernel or explicit fp32 maths elsewhere. The memory is read as
stored, zero-padded in the head dimension (plan.memory_storage_dim), by FlashAttention 4 where the plan takes it
(flash4.py: one call, or for a window group two, flash4.group_attention), else in pieces of memory_piece x 2^j keys
for cuDNN (a bounded number of per-shape execution plans). `window_attention` is the ingest path (windows with no
local cache: inputs padded once by ops.rope_pad, several memory windows of one sequence as a batch, the merge fused
with the heads' layout). With `mem_top_k` (kNN memory) each query's k best memory keys are chosen over chunks of
scores and attended in fp32. A few queries (decoding): attention.few_query_attention. Padded inputs and cross-batch
training memory (masks over keys) take the exact "sdpa" on GPUs and "eager" elsewhere. `joint_attention` is FoT
training's differentiable cross-batch attention on fused kernels.
"""

from __future__ import annotations

import math

import torch

from longllama.attention import (
    FEW_QUERIES,
    _eager,
    _expand_heads,
    _sdpa,
    _torch_sdpa,
    few_query_attention,
    fold_rows,
    kernel_head_dim,
    memory_inputs,
    pad_to,
    unfold_rows,
)
from longllama.fast import flash4, kernels
from longllama.ops import heads, merge_heads, merge_partials
from longllama.plan import ExecutionPlan


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
    """The CUDA kernel "auto" stands for with inputs like q: cuDNN's where it applies (bf16/fp16, head dimension a
    multiple of 8 up to 128), else FlashAttention; other names are returned as given."""
    if kernel != "auto":
        return kernel
    usable = (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
    )
    return "cudnn" if usable else "flash"


def resolve_memory_kernel(q: torch.Tensor, plan: ExecutionPlan) -> str:
    """The memory-attention kernel for queries like q under `plan`: "auto" and "fa4" are FlashAttention 4 where it
    serves these inputs (flash4.usable), else resolve_kernel's "auto" choice; "cudnn" and "flash" as given."""
    kernel = plan.memory_kernel
    if kernel in ("auto", "fa4"):
        return "fa4" if flash4.usable(q, plan) else resolve_kernel(q, "auto")
    return kernel


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    plan: ExecutionPlan,
    kernel: str | None = None,
    used: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_attention of q (b, h, n, d) over memory keys k, v (b, h_kv, M, d); out in fp32, or in q's dtype from
    FlashAttention 4 (one call). cuDNN reads the memory in pieces (plan.memory_piece), FlashAttention 2 in one call;
    all views of the memory, no copy for h_kv = h. `used`: per row of q, the prefix of the memory (>= 1 keys, k and
    v then of batch 1) it sees, in one FlashAttention 4 call or one call per row. `kernel`: the plan's choice
    resolved (resolve_memory_kernel) unless given."""
    kernel = kernel or resolve_memory_kernel(q, plan)
    if kernel == "fa4":
        try:
            return flash4.memory_attention(q, k, v, scale=scale, plan=plan, used=used)
        except Exception as exc:  # noqa: BLE001 - reported once; cuDNN serves from here on
            flash4.failed(exc, plan)
            kernel = resolve_kernel(q, "auto")
    if used is not None:
        rows = [
            memory_attention(q[i : i + 1], k[:, :, :m], v[:, :, :m], scale=scale, plan=plan, kernel=kernel)
            for i, m in enumerate(used)
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    h, m = q.shape[1], k.shape[2]
    if kernel != "cudnn":
        out, lse = partial_attention(
            q, _expand_heads(k, h), _expand_heads(v, h), causal=False, scale=scale, kernel=kernel
        )
        return out.float(), lse
    acc = None
    piece = plan.memory_piece
    for start, end in memory_pieces(m, piece):
        out, lse = partial_attention(
            q,
            _expand_heads(k[:, :, start:end], h),
            _expand_heads(v[:, :, start:end], h),
            causal=False,
            scale=scale,
            kernel="cudnn" if end - start >= piece else "flash",
        )
        acc = (out.float(), lse) if acc is None else merge_partials(*acc, out, lse, with_lse=True)
    return acc


_TOP_K_SCORES = 1 << 27  # score elements per chunk of keys when selecting the top k (256 MiB in bf16)
_TOP_K_GATHERED = 1 << 25  # gathered key elements per chunk of queries


def top_k_memory_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
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
        s = qg @ k[:, :, start : start + step].transpose(-1, -2)  # (b, hkv, rows, chunk)
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
        sel = index[:, :, r0 : r0 + span]
        flat = sel.reshape(b, hkv, -1)  # advanced indexing: ~5x torch.gather with an expanded index on CPUs
        cv = v[batch, heads, flat].view(*sel.shape, v.shape[-1]).float()
        if exact:
            scores = best[:, :, r0 : r0 + span] * scale
        else:
            ck = k[batch, heads, flat].view(*sel.shape, d).float()
            scores = torch.einsum("bhrkd,bhrd->bhrk", ck, qg[:, :, r0 : r0 + span].float()) * scale
        lse[:, :, r0 : r0 + span] = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[:, :, r0 : r0 + span, None])
        out[:, :, r0 : r0 + span] = torch.einsum("bhrk,bhrkd->bhrd", weights, cv)
    return out.view(b, h, n, -1), lse.view(b, h, n)


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


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked (or top-left causal) attention that also returns its log-sum-exp (b, h, n) in fp32.
    q, k, v have the same number of heads and a head dimension that is a multiple of 8; `kernel` the CUDA kernel
    (resolve_kernel)."""
    n = q.shape[2]
    if kernels.compiling_ahead():
        # A dry pass reads no attention output. cuDNN would build a graph for each of its shapes (~50 ms each on an
        # H100), keyed also by the throwaway cache's strides, so the real pass could not reuse them.
        return q.new_zeros(*q.shape[:3], v.shape[-1]), q.new_zeros(q.shape[:3], dtype=torch.float32)
    if q.is_cuda:
        out, lse = _cuda_partial(q, k, v, causal, scale, kernel)
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
            acc[index], lse[index] = merge_partials(acc[index], lse[index], o_j, raw_j[..., :n].float(), with_lse=True)
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
            gq, gk, gv = _kernel_backward(
                grad[index], q[index], parts[2 * j], parts[2 * j + 1], out[index], raw[index], False, ctx.scale
            )
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
            grad, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    n, m = q.shape[2], k.shape[2]
    # None: undefined tensors, as the forward returns them for a dense batch (no sequence offsets) without dropout
    # (no random state); an empty tensor would read as a variable-length batch.
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse.contiguous(), None, None, n, m, 0.0, causal, None, None, scale=scale
    )


def joint_attention_supported(*tensors: torch.Tensor) -> bool:
    """Whether joint_attention has fused kernels for these inputs: on CPUs always, on GPUs in bf16 / fp16
    (FlashAttention; fp32 CUDA training keeps the masked SDPA path)."""
    return not tensors[0].is_cuda or kernel_dtype(*tensors) in (torch.bfloat16, torch.float16)


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Causal attention of q (b, h, n, d) over k, v (b, h_kv, n, d), joined in one softmax with, for each part
    (rows, k_j, v_j), all keys of k_j, v_j (len(rows), h_kv, m_j, d) for the queries of batch entries `rows`
    (an int64 index; an entry may appear in several parts). Differentiable; fused kernels (FlashAttention on CUDA,
    torch's blockwise kernel on CPUs) for the forward and backward passes. The cross-batch memory of FoT training."""
    dtype = kernel_dtype(q, k, v, *(t for part in parts for t in part[1:]))
    h, d = q.shape[1], q.shape[-1]
    dim = kernel_head_dim(d) if q.is_cuda else d

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return pad_to(_expand_heads(x, h).to(dtype), dim)

    rows = [part[0] for part in parts]
    flat = [prepare(t) for part in parts for t in part[1:]]
    out = _JointAttention.apply(1.0 / math.sqrt(d), rows, prepare(q), prepare(k), prepare(v), *flat)
    return out[..., :d]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    plan: ExecutionPlan,
    visible: torch.Tensor | None = None,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    mem_valid: torch.Tensor | None = None,
    is_causal: bool = False,
    padded_mem: tuple[torch.Tensor, torch.Tensor] | None = None,
    mem_top_k: int | None = None,
    pad=None,
    mem_share: int = 1,
    mem_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """attention.attend's function by the fast path (shapes there; `mem_scales` of an int8 memory too). `is_causal`
    tells that `visible` is exactly the top-left causal mask of a window with no local cache and no padding (fast
    kernels then need no mask);
    `padded_mem` are the memory keys/values as stored, zero-padded in the head dimension (MemoryCache.padded());
    `pad(x, dim)` zero-pads local inputs for kernels (ops.pad_to, compiled or not); `mem_share` query rows per
    memory row (attention.py's module docstring: the rows are folded into the queries of the memory part)."""
    mem_k, mem_v, mem_valid, padded_mem, top_k = memory_inputs(mem_k, mem_v, mem_valid, padded_mem, mem_top_k)
    share = mem_share if mem_k is not None else 1
    local_plain = visible is None or is_causal
    if mem_k is not None and mem_scales is not None:
        return _attend_int8(
            q, k, v, visible, is_causal, mem_k, mem_v, mem_valid, mem_scales, padded_mem, top_k, share, plan, pad
        )
    if share > 1 and (mem_valid is not None or not local_plain or top_k is not None):
        if q.shape[2] <= FEW_QUERIES or not q.is_cuda:
            # Masks or kNN with a shared memory: the exact maths, folded (decoding steps on GPUs too: few scores).
            return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, top_k, share)[0]
        # Many masked queries on a GPU: the masked SDPA takes one key set per row, so the memory is expanded here
        # (a copy per call; beam search decodes one token per step and never comes here).
        mem_k, mem_v = (t.repeat_interleave(share, dim=0) for t in (mem_k, mem_v))
        mem_valid = None if mem_valid is None else mem_valid.repeat_interleave(share, dim=0)
        padded_mem, share = None, 1
    if top_k is not None and (mem_valid is not None or (q.requires_grad and torch.is_grad_enabled())):
        # Padding or gradients with a top-k memory: the exact maths (a masked top k of the full scores).
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, top_k)[0]
    if top_k is not None and not local_plain:
        if q.shape[2] > FEW_QUERIES:
            return _local_then_top_k(q, k, v, visible, mem_k, mem_v, top_k)
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, top_k)[0]  # a few masked queries: exact
    if share > 1 and q.requires_grad and torch.is_grad_enabled():
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, None, share)[0]
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
        return few_query_attention(q, k, v, visible, mem_k, mem_v, padded_mem, top_k, share)
    dim = kernel_head_dim(d)
    scale = 1.0 / math.sqrt(d)
    out, lse = _local_partial(q, k, v, bool(is_causal), scale, plan, pad)
    if mem_k is not None:
        qm = fold_rows(q, share)  # rows sharing a memory row as more queries (no causal mask over memory)
        if top_k is not None:
            mem_out, mem_lse = top_k_memory_attention(
                qm, mem_k.to(q.dtype), mem_v.to(q.dtype), top_k=top_k, scale=scale
            )
        else:
            pk, pv = _as_stored(padded_mem if padded_mem is not None else (mem_k, mem_v), q.dtype, dim)
            mem_out, mem_lse = _over_memory(qm, pk, pv, scale, plan)
        mem_out, mem_lse = unfold_rows(mem_out, share), unfold_rows(mem_lse, share)
        out = merge_partials(out.float(), lse, mem_out[..., :d], mem_lse)  # the merge in fp32
    return out.to(q.dtype)


def _attend_int8(q, k, v, visible, is_causal, mem_k, mem_v, mem_valid, scales, padded_mem, top_k, share, plan, pad):
    """attend over an int8 memory. A few queries: few_query_attention, scales folded in. Many queries on a GPU with a
    dense memory of one row per query row: the local part by its kernel (causal) or explicitly (under a mask), the
    memory by the kernels one dequantized piece at a time (_over_int8_memory), merged by log-sum-exp. The rest
    (padding, kNN, shared rows, CPUs, gradients): the exact maths with the scales folded in, chunk by chunk."""
    if q.shape[2] <= FEW_QUERIES and mem_valid is None:
        return few_query_attention(q, k, v, visible, mem_k, mem_v, padded_mem, top_k, share, mem_scales=scales)
    dense = mem_valid is None and top_k is None and share == 1
    if not dense or not _on_kernels(q) or (q.requires_grad and torch.is_grad_enabled()):
        return _eager(q, k, v, visible, mem_k, mem_v, mem_valid, False, top_k, share, scales)[0]
    dtype = kernel_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    out, lse = local_with_lse(q, k, v, visible, is_causal, scale, plan, pad)
    pk, pv = padded_mem if padded_mem is not None else (mem_k, mem_v)
    mem_out, mem_lse = _over_int8_memory(q, pk, pv, scales, scale, plan, kernel_head_dim(d))
    return merge_partials(out.float(), lse, mem_out[..., :d], mem_lse).to(q.dtype)


def local_with_lse(q, k, v, visible, is_causal, scale: float, plan: ExecutionPlan, pad=None):
    """A window's local attention and its log-sum-exp (fp32), for a merge with a memory part: by the plan's local
    kernel where the window is causal (or sees everything), else under its mask explicitly (a window after a local
    cache)."""
    if visible is None or is_causal:
        return _local_partial(q, k, v, bool(is_causal), scale, plan, pad)
    h = q.shape[1]
    sc = (q.float() @ _expand_heads(k, h).float().transpose(-1, -2)) * scale
    sc = sc.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    return torch.exp(sc - lse[..., None]) @ _expand_heads(v, h).float(), lse


def _on_kernels(q: torch.Tensor) -> bool:
    """Whether the attention kernels (CUDA) serve inputs like q."""
    return q.is_cuda


_INT8_PIECE = 16384  # int8 memory keys dequantized at a time for the attention kernels (32 MiB per head of 128 in bf16)


def _over_int8_memory(q, pk, pv, scales, scale: float, plan: ExecutionPlan, dim: int):
    """_over_memory over an int8 memory (b, h_kv, M, w) with its (key, value) scales: _INT8_PIECE keys dequantized to
    q's dtype at a time (one piece's copy, never the whole memory), the pieces merged by log-sum-exp (fp32)."""
    acc = None
    m = pk.shape[2]
    for start in range(0, m, _INT8_PIECE):
        end = min(m, start + _INT8_PIECE)
        piece = [_dequantized(t[:, :, start:end], s[:, :, start:end], q.dtype, dim) for t, s in zip((pk, pv), scales)]
        out, lse = _over_memory(q, *piece, scale, plan)
        acc = (out.float(), lse) if acc is None else merge_partials(*acc, out, lse, with_lse=True)
    return acc


def _dequantized(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """int8 rows (..., w) times their scales (...), in `dtype`, padded to a kernel width (w if a multiple of 8)."""
    x = (t.float() * s[..., None]).to(dtype)
    return pad_to(x, t.shape[-1] if t.shape[-1] % 8 == 0 else dim)


def _local_then_top_k(q, k, v, visible, mem_k, mem_v, top_k: int) -> torch.Tensor:
    """A window after a local cache with a kNN memory: the local part under its mask (explicit maths, every query
    sees itself), the memory part by kNN, merged by their log-sum-exp; no copy of the memory."""
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


def _local_partial(
    q, k, v, causal: bool, scale: float, plan: ExecutionPlan, pad=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention with its log-sum-exp by the plan's local_kernel: q, k, v padded to the plan's local width (by
    `pad`, ops.pad_to compiled or not), the output cut back to q's head dimension."""
    pad = pad or pad_to
    d, h = q.shape[-1], q.shape[1]
    dim = plan.local_storage_dim(d)
    out, lse = partial_attention(
        pad(q, dim),
        _expand_heads(pad(k, dim), h),
        _expand_heads(pad(v, dim), h),
        causal=causal,
        scale=scale,
        kernel=plan.local_kernel,
    )
    return out[..., :d], lse


def _as_stored(
    padded_mem: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory keys and values in `dtype`, in their stored (padded) head dimension when kernels can read it (a
    multiple of 8), else padded to `dim`."""
    pk, pv = padded_mem
    mdim = pk.shape[-1] if pk.shape[-1] % 8 == 0 else dim
    return pad_to(pk.to(dtype), mdim), pad_to(pv.to(dtype), mdim)


def _over_memory(
    q: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    scale: float,
    plan: ExecutionPlan,
    used: list[int] | None = None,
):
    """memory_attention of q (true head dimension) over memory keys/values as _as_stored gives them (`used` as
    there); the output cut back to q's head dimension."""
    out, lse = memory_attention(pad_to(q, pk.shape[-1]), pk, pv, scale=scale, plan=plan, used=used)
    return out[..., : q.shape[-1]], lse


def _group_over_memory(
    q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float, plan: ExecutionPlan, used: list[int] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """_over_memory for the rows of a window group, as partial attentions for merge_heads: by
    flash4.group_attention where FlashAttention 4 serves and flash4.splits_group says so, else one part."""
    if (
        used is not None
        and len(used) > 1
        and flash4.splits_group(pk.shape[-1], q.shape[2], plan)
        and resolve_memory_kernel(q, plan) == "fa4"
    ):
        try:
            parts = flash4.group_attention(pad_to(q, pk.shape[-1]), pk, pv, scale=scale, used=used, plan=plan)
        except ValueError:  # prefixes it does not split: the one call below
            pass
        except Exception as exc:  # noqa: BLE001 - reported once; the one call below from here on
            flash4.split_failed(exc, plan)
        else:
            return [(out[..., : q.shape[-1]], lse) for out, lse in parts]
    return [_over_memory(q, pk, pv, scale, plan, used=used)]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_dim: int,
    *,
    plan: ExecutionPlan,
    padded_mem: tuple[torch.Tensor, torch.Tensor] | None = None,
    used: list[int] | None = None,
    ops=None,
    mem_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ingest path: windows with no local cache and no padding (causal), each in one softmax over its causal
    keys and, with `padded_mem`, the memory. q (b, h, n, w), k, v (b, h_kv, n, w) are rotated as the layer needs
    and zero-padded to w, a multiple of 8 >= head_dim (the memory's stored width where there is a memory:
    ops.rope_pad); padded_mem (1 or b, h_kv, M, w') the memory as stored; `used`: per row, the prefix of the
    memory it sees (0: none; None: all M; the rows of a window group, see plan.window_group_tokens). `ops`:
    merge_heads and heads, compiled or not (ops.Ops; default the plain ones). `mem_scales`: an int8 memory's
    (key, value) scales; its pieces are dequantized one at a time (no window groups: windows._groupable). Returns
    o_proj's input (b, n, h * head_dim) in the kernels' dtype."""
    merge, lay_out = (ops.merge_heads, ops.heads) if ops is not None else (merge_heads, heads)
    dtype = kernel_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    h = q.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = partial_attention(
        q, _expand_heads(k, h), _expand_heads(v, h), causal=True, scale=scale, kernel=plan.local_kernel
    )
    first = 0 if used is None else next((j for j, m in enumerate(used) if m), len(used))  # prefixes increase
    if padded_mem is None or padded_mem[0].shape[2] == 0 or first == q.shape[0]:
        return lay_out(out, head_dim)
    if mem_scales is not None:
        if used is not None:
            raise RuntimeError("a window group reached int8 memory attention (windows._groupable let it through)")
        parts = [_over_int8_memory(q, *padded_mem, mem_scales, scale, plan, q.shape[-1])]
        return merge(out, lse, *parts[0], head_dim, more=())
    pk, pv = _as_stored(padded_mem, dtype, q.shape[-1])
    parts = _group_over_memory(q[first:], pk, pv, scale, plan, None if used is None else used[first:])
    merged = merge(out[first:], lse[first:], *parts[0], head_dim, more=tuple(parts[1:]))
    return merged if first == 0 else torch.cat([lay_out(out[:first], head_dim), merged])
