"""Block retrieval's read of a window on the kernels' path: the same maths as retrieval.attend, without its copies.

retrieval.attend gathers every query group's chosen blocks into a new tensor, scores them against the group's
queries and takes one softmax over those scores and the local ones, all as PyTorch tensors: at 1M tokens (3B shape,
64 blocks of 64 keys per group) that is several GB of gathered keys, scores and probabilities per memory layer and
window. Here the bounds that rank the blocks come from one Triton kernel (best_bounds: each group's best bound per
block, the rows x blocks products never stored; retrieval.choose keeps the top blocks), and another
(block_kernels.py) reads each group's blocks in place from the stored memory with an online softmax, giving the
memory part and its log-sum-exp; the local part comes from the local kernel with its log-sum-exp
(fast/attention.local_with_lse), and the two are merged exactly (ops.merge_partials), as the dense memory is.

Where it applies (`applies`): the plan's fast attention with `block_kernel` on, the kernels usable for the inputs
(CUDA; CPU tensors under Triton's interpreter for the tests), a float memory on the queries' device, or offloaded to
page-locked CPU memory with the plan's `offload_in_place` (read over the bus where it is stored), with one stored
row per query row, no gradients. Elsewhere (int8 memory, an offloaded one without `offload_in_place`, beams
sharing a memory, training) retrieval.attend runs.
"""

from __future__ import annotations

import functools
import math

import torch

from longllama import retrieval
from longllama.fast import kernels
from longllama.fast.attention import kernel_dtype, local_with_lse
from longllama.memory import MemoryCache
from longllama.ops import merge_partials
from longllama.plan import ExecutionPlan

_BOUND_BLOCKS = 64  # memory blocks one program of the bounds kernel scores
_STEP_ROWS = 8  # a single query group of at most this many rows (a decoding step) takes step_bounds_kernel
_STEP_BLOCKS = 32  # memory blocks one program of the step's bounds kernel scores


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernels (block_kernels.py), imported on first use: Triton is only needed where they run."""
    from longllama.fast import block_kernels

    return (
        block_kernels.block_attention_kernel,
        block_kernels.block_bounds_kernel,
        block_kernels.step_bounds_kernel,
        block_kernels.gather_blocks_kernel,
    )


def best_bounds(
    qg: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, any_valid: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """retrieval.select_blocks' bounds by a kernel: each query group's best bound per block (b, kv_heads, groups,
    B) fp32, the group's rows x blocks products kept in registers (select_blocks materialises them). On GPUs the
    products are TF32 tensor-core products: a near tie between two blocks may go the other way than in fp32. A
    single group of a few rows (a decoding step) is one fp32 pass over the summaries instead (step_bounds_kernel)."""
    b, hkv, groups, rows, d = qg.shape
    n_blocks = kmax.shape[2]
    qg = qg if qg.stride(-1) == 1 else qg.contiguous()
    if kmax.stride() != kmin.stride() or kmax.stride(-1) != 1:  # the kernel reads both with one set of strides
        kmax, kmin = kmax.contiguous(), kmin.contiguous()
    real = real.to(torch.uint8).contiguous()
    valid = any_valid.to(torch.uint8)
    best = torch.empty(b, hkv, groups, n_blocks, dtype=torch.float32, device=qg.device)
    if groups == 1 and rows <= _STEP_ROWS:  # a decoding step: no rows to pad to a tensor-core product
        kernels.launch_fixed(
            "step_bounds",
            _kernels()[2],
            (b * hkv, -(-n_blocks // _STEP_BLOCKS)),
            (qg, real, kmax, kmin, valid, best, hkv, n_blocks, qg.stride(0), qg.stride(1), qg.stride(3))
            + (*kmax.stride()[:3], valid.stride(0)),
            D=d,
            ROWS=rows,
            BLOCK_B=_STEP_BLOCKS,
            BLOCK_D=max(16, kernels.pow2(d)),
        )
        return best
    grid = (groups, b * hkv, -(-n_blocks // _BOUND_BLOCKS))
    kernels.launch_fixed(
        "block_bounds",
        _kernels()[1],
        grid,
        (
            qg,
            real,
            kmax,
            kmin,
            valid,
            best,
            hkv,
            groups,
            rows,
            n_blocks,
            *qg.stride()[:4],
            *kmax.stride()[:3],
            valid.stride(0),
        ),
        D=d,
        BLOCK_R=max(16, kernels.pow2(rows)),
        BLOCK_B=_BOUND_BLOCKS,
        BLOCK_D=max(16, kernels.pow2(d)),
    )
    return best


def gather_blocks(memory: MemoryCache, chosen: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """retrieval.step_blocks' gather by a kernel: the stored (padded) keys and values of the chosen blocks (b,
    kv_heads, keep), every one whole inside the memory, block after block: (b, kv_heads, keep * block_size,
    storage_dim), on the device of `chosen` (the memory may be offloaded to page-locked CPU memory, read over the
    bus: reads_in_place). One program copies one block, in 16-byte vectors (benchmarks/probe_decode_blocks.py
    measures it against PyTorch's indexing)."""
    b, hkv, keep = chosen.shape
    pk, pv = memory.padded()
    width = pk.shape[-1]
    if pk.stride() != pv.stride() or pk.stride()[2:] != (width, 1):  # the kernel takes rows `width` apart
        pk, pv = pk.contiguous(), pv.contiguous()
    k = torch.empty(b, hkv, keep * block_size, width, dtype=pk.dtype, device=chosen.device)
    v = torch.empty_like(k)
    chosen = chosen.contiguous()
    kernels.launch_fixed(
        "gather_blocks",
        _kernels()[3],
        (b * hkv, keep),
        (pk, pv, chosen, k, v, hkv, keep, pk.stride(0) // width, pk.stride(1) // width),
        BLOCK_SIZE=block_size,
        WIDTH=width,
        BLOCK_R=max(16, kernels.pow2(block_size)),
        BLOCK_W=max(16, kernels.pow2(width)),
    )
    return k, v


def applies(q: torch.Tensor, memory: MemoryCache, plan: ExecutionPlan) -> bool:
    """Whether the kernel reads `memory` for the queries q (module docstring)."""
    return (
        plan.attention == "fast"
        and plan.block_kernel
        and kernels.usable(q, cpu=plan.interpret_kernels)
        and not memory.quantized
        and memory.share == 1
        and reads_in_place(memory, q.device, plan)
        and not (q.requires_grad and torch.is_grad_enabled())
    )


def reads_in_place(memory: MemoryCache, device: torch.device, plan: ExecutionPlan) -> bool:
    """Whether kernels on `device` read `memory` where it is stored: it is there, or it is offloaded to page-locked
    CPU memory and the plan's offload_in_place lets them read it over the bus."""
    return memory.device == device or (plan.offload_in_place and memory.mapped_to(device))


def memory_part(
    q: torch.Tensor, memory: MemoryCache, choice: retrieval.BlockChoice, group: int = retrieval.QUERY_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (b, h, n, d) over the blocks each query group chooses under `choice`: the output (b, h, n, d)
    and the log-sum-exp of the scores (b, h, n), both fp32 (-inf and zeros where a query's blocks hold no valid
    key)."""
    _, chosen, group = retrieval.choose(q, memory, choice, group, bounds=best_bounds)
    block_size = choice.block_size
    b, h, n, d = q.shape
    pk, pv = memory.padded()  # (b, kv_heads, M, width), read in place; keys and values are laid out alike
    if q.stride(-1) != 1:
        q = q.contiguous()
    valid = None if memory.all_valid() else memory.valid.view(torch.uint8)
    out = torch.empty(b, h, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    groups, keep = chosen.shape[2], chosen.shape[3]
    chosen = chosen.contiguous()
    kernels.launch_fixed(
        "block_attention",
        _kernels()[0],
        (groups, b * h),
        (
            q,
            pk,
            pv,
            pk if valid is None else valid,
            chosen,
            out,
            lse,
            h,
            memory.kv_heads,
            n,
            memory.length,
            groups,
            group,
            1.0 / math.sqrt(d),
            q.stride(0),
            q.stride(1),
            q.stride(2),
            pk.stride(0),
            pk.stride(1),
            pk.stride(2),
            0 if valid is None else valid.stride(0),
        ),
        D=d,
        KEEP=keep,
        BLOCK_SIZE=block_size,
        BLOCK_Q=max(16, kernels.pow2(group)),
        BLOCK_K=max(16, kernels.pow2(block_size)),
        BLOCK_D=max(16, kernels.pow2(d)),
        HAS_VALID=valid is not None,
        UPCAST=kernels.interpreting(),
    )
    return out, lse


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    is_causal: bool,
    memory: MemoryCache,
    plan: ExecutionPlan,
    pad=None,
) -> torch.Tensor:
    """retrieval.attend on the kernels' path: q (b, h, n, d) rotated queries, k, v (b, h_kv, kv, d) the local keys
    (rotated) and values, `visible` / `is_causal` the local mask as the window gives it; returns (b, h, n, d) in the
    dtype the kernels take for q, k and v together (kernel_dtype), as the dense path does."""
    dtype = kernel_dtype(q, k, v)  # one dtype for the kernels, as the dense path casts
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    d = q.shape[-1]
    out, lse = local_with_lse(q, k, v, visible, is_causal, 1.0 / math.sqrt(d), plan, pad)
    mem_out, mem_lse = memory_part(q, memory, retrieval.BlockChoice.of(plan))
    return merge_partials(out.float(), lse, mem_out, mem_lse).to(q.dtype)
