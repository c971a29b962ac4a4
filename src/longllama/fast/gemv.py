"""Matrix-vector products for decoding: y = x W^T for a few rows of x (bf16/fp16, CUDA), as Triton kernels that
stream W once at close to the memory bandwidth. A decoding step is bound by reading the weights; cuBLAS ran the 3B
model's 3200 x 3200 products at ~1.6 TB/s with cold weights on an H100 (bench_gemv.py), with a split-K
pass and a reduction kernel after it. One row of x: a program per block of output rows; more rows (beams, a batch
of independent sequences: batch_decode.py) go to several-row kernels that read each weight tile once for all rows
(tl.dot over a 16-row tile), where per-row programs would read the weights once per row.

`linear(x, weight, residual=None, norm=None)` takes the kernel where it applies (CUDA, bf16/fp16, at most
`max_rows` rows, contiguous weights) and F.linear elsewhere (`autotune`: the kernel's configuration by Triton's
autotuner, the plan's field; else from the tables or the rule, kernels.Kernel); with `residual`, the sum
residual + x W^T comes out of the same pass; with `norm` = (RMSNorm weight, eps), the product is of rms_norm(x),
each program normalising the row itself (the row is a few KB; this saves the norm's own kernel). `linear_stacked(x,
(w1, w2, ...))` is x [w1; w2; ...]^T without concatenating the weights (the q, k and v projections of a layer in one
launch). `linear_swiglu(x, gate, up)` computes silu(x gate^T) * (x up^T) in the same pass over both weights.
Weights are plain tensors in the activation dtype, or int8 weights quantized here (quantize.int8_rows: int8
values with one fp32 scale per output row), read as int8 (half the bytes) and scaled after the sum.
Accumulation is in fp32, as in cuBLAS; the order of the sums differs; results are rounded to the activation dtype
where the unfused functions round. The loop over K is unrolled (K is a compile-time constant), which keeps every
load of a program in flight at once (cold-weight products 5-15 % faster than the rolled loop, bench_gemv.py).

Under Triton's interpreter the kernels run on CPU tensors (the tests; see kernels.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from longllama import quantize
from longllama.fast import kernels
from longllama.ops import rms_norm

MAX_ROWS = 16  # default of max_rows (the plan's gemv_max_rows)
# One row: one program per block of output rows. More rows go to the several-row kernels, which read each weight
# tile once for all of them (at most ROWS_BLOCK rows): on an H100 (bench_gemv.py) a per-row program for each of 2-4
# rows ran the 3B products at 0.7-1.8 TB/s, the several-row kernels at 1.8-2.7 TB/s, as fast as cuBLAS or faster;
# for one row the per-row kernel is ~20 % faster.
PER_ROW = 1
ROWS_BLOCK = 16
# the interpreter's configurations (no autotuning there): the per-row kernels', the several-row kernels'
_DEFAULTS = {"BLOCK_N": 8, "BLOCK_K": 256}
_ROWS_DEFAULTS = {"BLOCK_N": 16, "BLOCK_K": 64}


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernels (gemv_kernels.py), imported on first use: Triton is only needed where they run."""
    from longllama.fast import gemv_kernels

    return gemv_kernels.gemv, gemv_kernels.gemv_swiglu, gemv_kernels.gemv_rows, gemv_kernels.gemv_rows_swiglu


def kernel_objects() -> tuple:
    """The kernels with their configuration choices (kernels.Kernel: `tuned`, `cache`), for `longllama tune`."""
    return _kernels()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _operand(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the kernels read for `weight`: (the weight, None) for a plain tensor, (int8 values, fp32 row scales)
    for an int8 weight (quantize.int8_rows), (the weight, None) for any other, which `applies` turns away."""
    if type(weight) in _PLAIN:
        return weight, None
    rows = quantize.int8_rows(weight)
    return rows if rows is not None else (weight, None)


def _grid(n: int, rows: int):
    """Launch grid: blocks of BLOCK_N output columns, one row of x each (the several-row kernels: every row)."""
    if rows > PER_ROW:
        return lambda meta: (-(-n // meta["BLOCK_N"]),)
    return lambda meta: (-(-n // meta["BLOCK_N"]), rows)


def _kernel(rows: int, swiglu: bool = False):
    """The kernel for `rows` rows, its interpreter configuration and its extra constants."""
    if rows <= PER_ROW:
        return _kernels()[swiglu], _DEFAULTS, {}
    constants = {"BLOCK_M": max(16, kernels.pow2(rows)), "UPCAST": kernels.interpreting()}
    return _kernels()[2 + swiglu], _ROWS_DEFAULTS, constants


def applies(x: torch.Tensor, *weights: torch.Tensor, norm=None, max_rows: int = MAX_ROWS, cpu: bool = False) -> bool:
    """Whether the kernel serves x (..., K) against these (N, K) weights (and the RMSNorm weight of `norm`): at most
    `max_rows` rows, weights all plain in x's dtype or all int8 (quantize.int8_rows); `cpu` lets CPU tensors through
    under the interpreter (kernels.usable)."""
    rows = x.numel() // x.shape[-1]
    if not (
        kernels.usable(x, cpu=cpu) and x.dtype in (torch.bfloat16, torch.float16) and rows <= min(max_rows, ROWS_BLOCK)
    ):
        return False
    operands = [_operand(w) for w in weights]
    scaled = {scale is not None for _, scale in operands}
    ok = len(scaled) == 1 and all(
        w.dtype == (torch.int8 if scale is not None else x.dtype)
        and type(w) in _PLAIN
        and w.device == x.device
        and w.is_contiguous()
        and w.shape[1] == x.shape[-1]
        and (scale is None or (scale.dtype == torch.float32 and scale.is_contiguous()))
        for w, scale in operands
    )
    return ok and (norm is None or (norm[0].dtype == x.dtype and norm[0].is_contiguous()))


def _normed(x: torch.Tensor, norm) -> torch.Tensor:
    return x if norm is None else rms_norm(x, norm[0], norm[1])


def _prepared(x: torch.Tensor, norm):
    """x as (rows, K) contiguous, and the kernel's norm arguments (weight pointer, eps, NORM)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if norm is None:
        return flat, (flat, 0.0), False
    return flat, (norm[0], float(norm[1])), True


def _offsets(tensors) -> list[int]:
    """Element offsets of tensors[1:] from tensors[0] (the kernels address stacked weights from the first), padded
    to two."""
    first = tensors[0]
    return [(t.data_ptr() - first.data_ptr()) // first.element_size() for t in tensors[1:]] + [0, 0]


def _stacked(x: torch.Tensor, weights, residual: torch.Tensor | None, norm, autotune: bool = False) -> torch.Tensor:
    operands = [_operand(w) for w in weights]
    weights = [w for w, _ in operands]
    scales = [s for _, s in operands]
    scaled = scales[0] is not None
    w0 = weights[0]
    sizes = [w.shape[0] for w in weights] + [0, 0]
    offsets = _offsets(weights)
    scale_offsets = _offsets(scales) if scaled else [0, 0]
    n = sum(w.shape[0] for w in weights)
    k = x.shape[-1]
    flat, norm_args, normed = _prepared(x, norm)
    rows = flat.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    r = y if residual is None else residual.reshape(rows, n).contiguous()
    kernel, defaults, extra = _kernel(rows)
    kernels.launch(
        kernel,
        _grid(n, rows),
        (
            flat,
            *norm_args,
            w0,
            *offsets[:2],
            scales[0] if scaled else w0,
            *scale_offsets[:2],
            r,
            y,
            rows,
            n,
            *sizes[:2],
            k,
        ),
        defaults,
        autotune=autotune,
        NORM=normed,
        RESIDUAL=residual is not None,
        SCALED=scaled,
        **extra,
    )
    return y.view(*x.shape[:-1], n)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    *,
    max_rows: int = MAX_ROWS,
    cpu: bool = False,
    autotune: bool = False,
) -> torch.Tensor:
    """x @ weight.T (no bias), plus `residual` when given; with norm = (weight, eps), of rms_norm(x) instead of x.
    Where the kernel does not apply (many rows: the ingest) the residual is added inside the matrix product
    (addmm: one rounding, no separate pass over the activations)."""
    if not applies(x, weight, norm=norm, max_rows=max_rows, cpu=cpu) or (
        residual is not None and residual.dtype != x.dtype
    ):
        x = _normed(x, norm)
        if residual is None:
            return F.linear(x, weight)
        # addmm reads plain weights; a quantized one (torchao's tensors) computes its own product
        if residual.dtype != x.dtype or residual.shape[:-1] != x.shape[:-1] or type(weight) not in _PLAIN:
            return residual + F.linear(x, weight)
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
        return out.view(residual.shape)
    return _stacked(x, (weight,), residual, norm, autotune)


def linear_stacked(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    norm: tuple[torch.Tensor, float] | None = None,
    *,
    max_rows: int = MAX_ROWS,
    cpu: bool = False,
    autotune: bool = False,
) -> torch.Tensor:
    """x @ cat(weights).T for two or three weights (N_i, K), in one launch where the kernel applies; `norm` as in
    `linear`."""
    if len(weights) > 3 or not applies(x, *weights, norm=norm, max_rows=max_rows, cpu=cpu):
        x = _normed(x, norm)
        return torch.cat([F.linear(x, w) for w in weights], dim=-1)
    return _stacked(x, weights, None, norm, autotune)


def linear_swiglu(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    norm: tuple[torch.Tensor, float] | None = None,
    *,
    max_rows: int = MAX_ROWS,
    cpu: bool = False,
    autotune: bool = False,
) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T), rounding as the unfused functions do; `norm` as in `linear`."""
    if not applies(x, gate, up, norm=norm, max_rows=max_rows, cpu=cpu):
        x = _normed(x, norm)
        return F.silu(F.linear(x, gate)) * F.linear(x, up)
    flat, norm_args, normed = _prepared(x, norm)
    (gate, gate_scale), (up, up_scale) = _operand(gate), _operand(up)
    scaled = gate_scale is not None
    rows, n, k = flat.shape[0], gate.shape[0], flat.shape[1]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    kernel, defaults, extra = _kernel(rows, swiglu=True)
    scale_args = (gate_scale, up_scale) if scaled else (gate, up)
    kernels.launch(
        kernel,
        _grid(n, rows),
        (flat, *norm_args, gate, up, *scale_args, y, rows, n, k),
        defaults,
        autotune=autotune,
        NORM=normed,
        SCALED=scaled,
        **extra,
    )
    return y.view(*x.shape[:-1], n)
