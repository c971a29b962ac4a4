"""Matrix-vector products for decoding: y = x W^T for a few rows of x (bf16/fp16, CUDA), as one Triton kernel that
streams W once at close to the memory bandwidth. A decoding step is bound by reading the weights; cuBLAS ran the 3B
model's 3200 x 3200 products at ~2.05 TB/s on an H100 (profile_step.py, 2026-11-26), with a split-K pass and a
reduction kernel after it.

`linear(x, weight)` takes the kernel where it applies (CUDA, bf16/fp16, at most MAX_ROWS rows, contiguous weight)
and F.linear elsewhere. `linear_swiglu(x, gate, up)` computes silu(x gate^T) * (x up^T) in the same pass over both
weights. Accumulation is in fp32, as in cuBLAS; the order of the sums differs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MAX_ROWS = 4


@functools.lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, built on first use (Triton is only needed, and only imported, on GPUs)."""
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
               for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8)]

    @triton.autotune(configs=configs, key=["N", "K", "M"])
    @triton.jit
    def gemv(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        row = tl.program_id(1)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * K + ks, mask=ks < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)

    @triton.autotune(configs=configs, key=["N", "K", "M"])
    @triton.jit
    def gemv_swiglu(x_ptr, g_ptr, u_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        row = tl.program_id(1)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (cols[:, None] < N) & (ks[None, :] < K)
            x = tl.load(x_ptr + row * K + ks, mask=ks < K, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
            u = tl.load(u_ptr + cols[:, None] * K + ks[None, :], mask=mask, other=0.0)
            acc_g += g.to(tl.float32) * x[None, :]
            acc_u += u.to(tl.float32) * x[None, :]
        # Rounded to the activation dtype before the SwiGLU, as the unfused path rounds its two products.
        g = tl.sum(acc_g, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
        u = tl.sum(acc_u, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (silu * u).to(y_ptr.dtype.element_ty), mask=cols < N)

    return triton, gemv, gemv_swiglu


def applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernel serves x (..., K) against these (N, K) weights."""
    rows = x.numel() // x.shape[-1]
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and rows <= MAX_ROWS
            and all(w.dtype == x.dtype and w.is_contiguous() and w.shape[1] == x.shape[-1] for w in weights))


def _launch(kernel, x: torch.Tensor, weights, n: int) -> torch.Tensor:
    triton = _kernels()[0]
    k = x.shape[-1]
    flat = x.reshape(-1, k).contiguous()
    rows = flat.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), rows)
    kernel[grid](flat, *weights, y, rows, n, k)
    return y.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (no bias)."""
    if not applies(x, weight):
        return F.linear(x, weight)
    return _launch(_kernels()[1], x, (weight,), weight.shape[0])


def linear_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T), rounding as the unfused functions do."""
    if not applies(x, gate, up):
        return F.silu(F.linear(x, gate)) * F.linear(x, up)
    return _launch(_kernels()[2], x, (gate, up), gate.shape[0])
