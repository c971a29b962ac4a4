"""Memory attention by FlashAttention 4 (the optional `flash-attn-4` package, CuTe DSL kernels) on Hopper GPUs.

Measured on an H100 (benchmarks/bench_attention_kernels.py; 32 heads, memory stored head-major and 112 wide for a
head_dim-100 model): kernel for kernel it is level with cuDNN at width 112 (within the ~8 % spread between runs) and
ahead at head_dim 128. What it brings end to end: one call reads the whole memory (no pieces, no per-shape plans as
with cuDNN, whose plans cost ~35 ms per new shape), and a group of windows with different memory prefixes is one
batched call (`used`: keys each batch row sees, the memory itself shared, not copied); the 3B shape read 256k tokens
~3 % faster than on cuDNN (benchmarks/RESULTS.md). cuDNN stays faster on the causal local windows, so only memory
attention comes here. Where the tile shape leaves query rows unused in a window (192-row tiles, 2048-row windows), a
window group goes as all its queries over the common prefix plus a small call for the group's own windows
(group_attention).

The package compiles each kernel configuration on its first use in a process (~1.5-2 s); its on-disk cache of
compiled kernels is switched on, in longllama.caches' directory (unless the user set its variables), for later
processes to load them; each call that compiled or loaded a kernel is logged (longllama.timings). Any failure
(import, compilation, an unsupported shape) is reported
once (the plan's failure record) and the caller falls back to cuDNN from then on.
"""

from __future__ import annotations

import functools
import time

import torch

from longllama import caches, timings
from longllama.fast import kernels
from longllama.plan import ExecutionPlan

FAILED = "FlashAttention 4"  # the failure records' names (ExecutionPlan.failures)
SPLIT_FAILED = "FlashAttention 4's split window groups"


@functools.lru_cache(maxsize=1)
def _varlen_func():
    caches.configure()  # the package reads its cache settings at import
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - not installed, or its CUDA libraries do not load: cuDNN serves instead
        return None
    return flash_attn_varlen_func


def _forward():
    """The package's forward entry point that takes a tile shape (private: a change there fails like any other
    failure, once, and cuDNN serves)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd


def installed_for(device: torch.device) -> bool:
    """Whether FlashAttention 4 is installed and loads, on an SM 9.x GPU (where it was measured faster than cuDNN):
    the plan then takes it for memory attention."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9 and _varlen_func() is not None


def usable(q: torch.Tensor, plan: ExecutionPlan) -> bool:
    """Whether FlashAttention 4 serves memory attention for queries like q under `plan`: bf16/fp16 tensors on an
    SM 9.x GPU, head dimension a multiple of 8 up to 256, no failure so far."""
    if FAILED in plan.failures or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] % 8 or q.shape[-1] > 256 or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return _varlen_func() is not None


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    plan: ExecutionPlan,
    used: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (b, h, n, d) over memory keys and values k, v (b or 1, h_kv, M, d) in one kernel call, with
    its log-sum-exp (b, h, n) fp32; out (b, h, n, d) in q's dtype. `used`: per row of q, how many memory keys (a
    prefix, >= 1) it sees (default: all M). Views only: the memory is neither copied nor expanded in memory. The
    tile is the plan's for this width (fa4_tiles; measured: 192 x 144 at width 112 took a window group over 256k keys
    in ~47 ms against ~56 with the package's tile, H100), else the package's own choice, through the package's
    private forward entry point (a change there fails like any other failure, once, and cuDNN serves)."""
    func = _varlen_func()
    b = q.shape[0]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (b, M, h_kv, d): the kernel's layout, as strides
    if kt.shape[0] != b:
        kt, vt = kt.expand(b, -1, -1, -1), vt.expand(b, -1, -1, -1)
    seqused = None
    if used is not None:  # from pinned memory: an asynchronous copy (a pageable one would wait for the stream)
        seqused = torch.tensor(used, dtype=torch.int32)
        seqused = seqused.pin_memory().to(q.device, non_blocking=True) if q.is_cuda else seqused
    args = (q.transpose(1, 2), kt, vt)
    options = dict(seqused_k=seqused, softmax_scale=scale, causal=False, return_lse=True)
    tile = plan.tile(q.shape[-1])
    built = _compiled_count()
    start = time.perf_counter()
    if tile is None:
        out, lse = func(*args, **options)
    else:
        out, lse = _forward()(*args, **options, tile_mn=tile[:2], mma_pv_is_rs=tile[2], intra_wg_overlap=tile[3])[:2]
    if _compiled_count() != built:
        timings.record("compile", f"FlashAttention 4 width {q.shape[-1]} tile {tile}", time.perf_counter() - start)
    return out.transpose(1, 2), lse


def _compiled_count() -> int:
    """Kernels the package holds compiled in this process (its forward's compile cache; 0 where it has none)."""
    try:
        return len(getattr(_forward(), "compile_cache", None) or ())
    except Exception:  # noqa: BLE001 - a package without that entry point: nothing to count
        return 0


# The common prefix of a window group goes in PARTS parts from PARTS_FROM keys on (more query tiles than the SMs
# hold at once go in rounds; in parts each tile's work is smaller and the last round less empty), one part below.
# The package's own split-KV is not there for SM 9.0. Measurements: benchmarks/RESULTS.md (FlashAttention 4).
PARTS, PARTS_FROM = 3, 131072


def key_parts(keys: int, plan: ExecutionPlan) -> int:
    """In how many parts group_attention reads a common prefix of `keys` memory keys: the plan's key_parts, else
    PARTS from PARTS_FROM keys on."""
    return plan.key_parts or (PARTS if keys >= PARTS_FROM else 1)


def splits_group(width: int, rows: int, plan: ExecutionPlan) -> bool:
    """Whether group_attention serves window groups of `rows` queries per window at a stored width: where the plan
    asks for it (split_groups) and the width's tile does not divide a window (rows computed in vain)."""
    tile = plan.tile(width)
    return plan.split_groups and SPLIT_FAILED not in plan.failures and tile is not None and rows % tile[0] != 0


def split_failed(exc: BaseException, plan: ExecutionPlan) -> None:
    """Record a failure of group_attention: one warning, and window groups go as one call from here on (a failure
    of that one call is then handled by `failed`)."""
    plan.failures.record(SPLIT_FAILED, exc, "one call per group from here on")


def group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, used: list[int], plan: ExecutionPlan
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """memory_attention of a window group's rows q (b, h, n, d) over increasing prefixes `used` of one memory k, v
    (1, h_kv, M, d), as partial attentions to merge by log-sum-exp: all b * n queries as one sequence over the prefix
    every row sees (used[0] keys, in key_parts parts: batch rows of one call, folded into one), then rows 1..
    over the rest of theirs (the group's own earlier windows, a few thousand keys). Returns (out (b, h, n, d), lse
    (b, h, n)) over the common prefix, then, where rows see more than used[0] keys, (out, lse) of rows 1.. only
    (b - 1 rows). Why: a tile of queries (192 rows) then spans the group's windows (2048 rows each: 11 tiles
    compute 2112 rows, 43 tiles 8256 rows for 4 windows), the tiles reading one head's keys at once are ~4x as many
    (shared in the L2 cache), and the parts fill the SMs' last round of tiles (PARTS). Raises ValueError where
    this does not apply (a row with no memory, a prefix shorter than row 0's, a memory of several batch rows)."""
    b, h, n, d = q.shape
    rest = [m - used[0] for m in used[1:]]
    if len(used) != b or used[0] < 1 or k.shape[0] != 1 or any(m < 1 for m in rest):
        raise ValueError(f"group_attention needs increasing memory prefixes (>= 1 key) of one memory, got {used}")
    flat = q.transpose(1, 2).reshape(1, b * n, h, d).transpose(1, 2)  # a view if q is token-major (the ingest's)
    pieces = key_parts(used[0], plan)
    share = -(-used[0] // pieces)
    length = -(-share // 8) * 8  # keys per part, a multiple of 8 (aligned rows for the kernel)
    last = used[0] - (pieces - 1) * length
    if pieces > 1 and last >= 1 and pieces * length <= k.shape[2]:  # parts: batch rows of strided views, no copy
        size, stride = (pieces, k.shape[1], length, d), (length * k.stride(2), *k.stride()[1:])
        kp, vp = (x.as_strided(size, stride, x.storage_offset()) for x in (k, v))
        out, lse = memory_attention(
            flat.expand(pieces, -1, -1, -1), kp, vp, scale=scale, plan=plan, used=[length] * (pieces - 1) + [last]
        )
        out, lse = fold(out, lse, cpu=plan.interpret_kernels)
    else:
        out, lse = memory_attention(flat, k[:, :, : used[0]], v[:, :, : used[0]], scale=scale, plan=plan)
    parts = [(o.unflatten(1, (b, n)).transpose(0, 1), x.unflatten(1, (b, n)).transpose(0, 1)) for o, x in zip(out, lse)]
    if rest:
        end = used[0] + max(rest)
        parts.append(
            memory_attention(q[1:], k[:, :, used[0] : end], v[:, :, used[0] : end], scale=scale, plan=plan, used=rest)
        )
    return parts


_FOLD_ROWS = 32  # query rows per program of the fold kernel


@functools.lru_cache(maxsize=1)
def _fold_kernel():
    from longllama.fast.fold_kernels import fold as kernel

    return kernel


def fold(out: torch.Tensor, lse: torch.Tensor, *, cpu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attentions of the same queries over P disjoint key sets, out (P, h, n, w) and lse (P, h, n) fp32 as
    memory_attention returns them, as one partial attention over all their keys: out (1, h, n, w) in out's dtype,
    laid out as memory_attention lays out a single part (token-major), and lse (1, h, n). So the compiled merge with
    local attention (attention.merge_heads) sees the same tensors with or without key parts and compiles nothing
    new when a long input first reaches PARTS_FROM keys (merging three parts there cost ~0.85 s in a process whose
    caches held it, 6.7 s on a machine that had never compiled it; H100, ingest_trace.py). A Triton kernel on GPUs
    (fold_kernels.py), the same maths in torch elsewhere; the result is rounded to out's dtype once, as a single
    part's output is."""
    parts, h, n, w = out.shape
    res = torch.empty(1, n, h, w, dtype=out.dtype, device=out.device).transpose(1, 2)
    res_lse = torch.empty(1, h, n, dtype=torch.float32, device=out.device)
    if kernels.usable(out, cpu=cpu) and out.stride(-1) == 1 and lse.stride(-1) == 1:
        grid = (-(-n // _FOLD_ROWS), h)
        kernels.launch_fixed(
            "fold",
            _fold_kernel(),
            grid,
            (
                out,
                lse,
                res,
                res_lse,
                parts,
                n,
                w,
                out.stride(0),
                out.stride(2),
                out.stride(1),
                lse.stride(0),
                lse.stride(1),
                res.stride(2),
                res.stride(1),
                res_lse.stride(1),
            ),
            BLOCK_R=_FOLD_ROWS,
            BLOCK_W=kernels.pow2(w),
        )
        return res, res_lse
    total = torch.logsumexp(lse, 0, keepdim=True)
    weight = torch.where(torch.isinf(total), 0.0, (lse - total).exp())  # rows with no keys at all: weight 0
    res.copy_((out.float() * weight[..., None]).sum(0, keepdim=True))
    res_lse.copy_(total)
    return res, res_lse


def failed(exc: BaseException, plan: ExecutionPlan) -> None:
    """Record a failure: one warning, and FlashAttention 4 is not used again under this plan."""
    plan.failures.record(FAILED, exc, "memory attention falls back to cuDNN")
