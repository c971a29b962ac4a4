"""Matrix-vector products for decoding: y = x W^T for a few rows of x (bf16/fp16, CUDA), as Triton kernels that
stream W once at close to the memory bandwidth. A decoding step is bound by reading the weights; cuBLAS ran the 3B
model's 3200 x 3200 products at ~1.6 TB/s with cold weights on an H100 (bench_gemv.py), with a split-K
pass and a reduction kernel after it. One row of x: a program per block of output rows; more rows (beams, a batch
of independent sequences: batch_decode.py) go to several-row kernels that read each weight tile once for all rows
(tl.dot over a 16-row tile), where per-row programs would read the weights once per row.

`linear(x, weight, residual=None, norm=None)` takes the kernel where it applies (CUDA, bf16/fp16, at most
`max_rows` rows, contiguous weights) and F.linear elsewhere (`autotune`: the kernel's configuration by Triton's
autotuner, the plan's field; else from the tables or the rule, kernels.Kernel); with `residual`, the sum
residual + x W^T comes out of the same pass; with `norm` = (RMSNorm weight, eps), the product is of rms_norm(x):
for one row each program normalises the row itself (a few KB; this saves the norm's own kernel), several rows are
normalised by a kernel of their own before the product (_prepared says why). `linear_stacked(x,
(w1, w2, ...))` is x [w1; w2; ...]^T without concatenating the weights (the q, k and v projections of a layer in one
launch). `linear_swiglu(x, gate, up)` computes silu(x gate^T) * (x up^T) in the same pass over both weights.
Weights are plain tensors in the activation dtype, or int8 weights quantized here (quantize.int8_rows: int8
values with one fp32 scale per output row), read as int8 (half the bytes) and scaled after the sum, or int4 weights
in this package's layout (quantize.int4_parts, int4.py), read in place (a quarter of bf16's bytes plus a scale and
an offset per group) and dequantized in registers, each weight as int4.dequantize computes it, before the product
(gemv_int4_kernels.py). All weights of one call are of one kind (int4: one group size); `dequantize_int4` is the
one-pass dequantizing kernel for products of many rows (a prompt's reading: F.linear on the whole weight).
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
_INT4_DEFAULTS = {"BLOCK_N": 8, "BLOCK_KB": 128}
_INT4_ROWS_DEFAULTS = {"BLOCK_N": 16, "BLOCK_KB": 64}
_DEQUANTIZE_DEFAULTS = {"BLOCK_N": 16, "BLOCK_KB": 128}
MAX_INT4_GROUP = 128  # a kernel step covers whole groups: at least 64 bytes per step (gemv_int4_kernels.py)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernels (gemv_kernels.py), imported on first use: Triton is only needed where they run."""
    from longllama.fast import gemv_kernels

    return gemv_kernels.gemv, gemv_kernels.gemv_swiglu, gemv_kernels.gemv_rows, gemv_kernels.gemv_rows_swiglu


@functools.lru_cache(maxsize=1)
def _int4_kernels():
    """The int4 kernels (gemv_int4_kernels.py), imported on first use."""
    from longllama.fast import gemv_int4_kernels as k

    return k.gemv_int4, k.gemv_int4_swiglu, k.gemv_int4_rows, k.gemv_int4_rows_swiglu, k.dequantize_int4


def kernel_objects() -> tuple:
    """The kernels with their configuration choices (kernels.Kernel: `tuned`, `cache`), for `longllama tune`."""
    return _kernels() + _int4_kernels()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _operand(weight: torch.Tensor) -> tuple:
    """What the kernels read for `weight`: ("plain", weight) for a plain tensor, ("int8", int8 values, fp32 row
    scales) for an int8 weight (quantize.int8_rows), ("int4", qdata, scale, offset, group) for an int4 one
    (quantize.int4_parts), ("other", weight) for any other, which `applies` turns away."""
    if type(weight) in _PLAIN:
        return "plain", weight
    rows = quantize.int8_rows(weight)
    if rows is not None:
        return "int8", *rows
    parts = quantize.int4_parts(weight)
    return ("int4", *parts) if parts is not None else ("other", weight)


def _readable(operand: tuple, x: torch.Tensor) -> bool:
    """Whether the kernels can read this operand (_operand) against x (..., K): on x's device, contiguous, K inputs,
    in x's dtype (int4: the scales and offsets) or int8 with fp32 scales; int4 groups a power of two up to
    MAX_INT4_GROUP."""
    kind, w, *rest = operand
    k = x.shape[-1]
    if kind == "other" or type(w) not in _PLAIN or w.device != x.device or not w.is_contiguous():
        return False
    if kind == "plain":
        return w.dtype == x.dtype and w.shape[1] == k
    if kind == "int8":
        scale = rest[0]
        return w.dtype == torch.int8 and w.shape[1] == k and scale.dtype == torch.float32 and scale.is_contiguous()
    scale, offset, group = rest
    return (
        w.dtype == torch.uint8
        and 2 * w.shape[1] == k
        and _int4_group_ok(group, k)
        and all(
            t.dtype == x.dtype and t.device == x.device and t.is_contiguous() and t.shape == (w.shape[0], k // group)
            for t in (scale, offset)
        )
    )


def _int4_group_ok(group: int, k: int) -> bool:
    return 2 <= group <= MAX_INT4_GROUP and group & (group - 1) == 0 and k % group == 0


def _grid(n: int, rows: int):
    """Launch grid: blocks of BLOCK_N output columns, one row of x each (the several-row kernels: every row)."""
    if rows > PER_ROW:
        return lambda meta: (-(-n // meta["BLOCK_N"]),)
    return lambda meta: (-(-n // meta["BLOCK_N"]), rows)


def _kernel(rows: int, swiglu: bool = False, int4: bool = False):
    """The kernel for `rows` rows (of the int4 family with `int4`), its interpreter configuration and its extra
    constants."""
    family = _int4_kernels() if int4 else _kernels()
    if rows <= PER_ROW:
        return family[swiglu], (_INT4_DEFAULTS if int4 else _DEFAULTS), {}
    constants = {"BLOCK_M": max(16, kernels.pow2(rows)), "UPCAST": kernels.interpreting()}
    return family[2 + swiglu], (_INT4_ROWS_DEFAULTS if int4 else _ROWS_DEFAULTS), constants


def _round_bf16(dtype: torch.dtype) -> bool:
    """The int4 kernels' ROUND: Triton's interpreter truncates fp32 to bf16 where a GPU rounds to nearest, so the
    dequantized weights are rounded by integer operations there (gemv_int4_kernels.rounded)."""
    return kernels.interpreting() and dtype == torch.bfloat16


def applies(x: torch.Tensor, *weights: torch.Tensor, norm=None, max_rows: int = MAX_ROWS, cpu: bool = False) -> bool:
    """Whether the kernel serves x (..., K) against these (N, K) weights (and the RMSNorm weight of `norm`): at most
    `max_rows` rows, weights all plain in x's dtype, all int8 (quantize.int8_rows) or all int4 of one group size
    (quantize.int4_parts; _readable); `cpu` lets CPU tensors through under the interpreter (kernels.usable)."""
    rows = x.numel() // x.shape[-1]
    if not (
        kernels.usable(x, cpu=cpu) and x.dtype in (torch.bfloat16, torch.float16) and rows <= min(max_rows, ROWS_BLOCK)
    ):
        return False
    operands = [_operand(w) for w in weights]
    kinds = {(op[0], op[4] if op[0] == "int4" else None) for op in operands}  # int4: the group size too
    ok = len(kinds) == 1 and all(_readable(op, x) for op in operands)
    return ok and (norm is None or (norm[0].dtype == x.dtype and norm[0].is_contiguous()))


def _normed(x: torch.Tensor, norm) -> torch.Tensor:
    return x if norm is None else rms_norm(x, norm[0], norm[1])


def _prepared(x: torch.Tensor, norm) -> tuple[torch.Tensor, tuple, dict]:
    """x as (rows, K) contiguous, the kernel's leading arguments and its NORM constant. One row: the kernel
    normalises it (x, the norm's weight and eps). Several rows are normalised first (rms_norm_rows), because every
    program of a several-row product would otherwise read all of x before its weights: at 8 rows on an H100 the gate/up
    product with the norm fused took 65 us, with the norm's kernel first 48 (benchmarks/RESULTS.md, "Eight rows a
    step")."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if flat.shape[0] > PER_ROW:
        return (flat if norm is None else rms_norm_rows(flat, *norm)), (), {}
    if norm is None:
        return flat, (flat, 0.0), {"NORM": False}
    return flat, (norm[0], float(norm[1])), {"NORM": True}


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.rms_norm of every row of x (rows, K) in one launch (its roundings: the normalised row, then its product
    with the weight, in x's dtype), for the kernels' tensors (applies)."""
    from longllama.fast import gemv_kernels

    y = torch.empty_like(x)
    k = x.shape[-1]
    block = kernels.pow2(k)
    kernels.launch_fixed(
        "rms_norm_rows",
        gemv_kernels.rms_norm_rows_kernel,
        (x.shape[0],),
        (x, weight, y, float(eps)),
        K=k,
        BLOCK_K=block,
        num_warps=max(1, min(8, block // 512)),
    )
    return y


def _offsets(tensors) -> list[int]:
    """Element offsets of tensors[1:] from tensors[0] (the kernels address stacked weights from the first), padded
    to two."""
    first = tensors[0]
    return [(t.data_ptr() - first.data_ptr()) // first.element_size() for t in tensors[1:]] + [0, 0]


# The tensors the kernels take of each kind of operand (_operand's positions): int4 codes, scales and offsets; int8
# values and scales; a plain weight also in the scales' place (the kernels read none there).
_PARTS = {"int4": (1, 2, 3), "int8": (1, 2), "plain": (1, 1)}


def _constants(operand: tuple, dtype: torch.dtype) -> dict:
    """The kernels' constants for weights of this operand's kind (int4: the group size and ROUND)."""
    if operand[0] == "int4":
        return {"G": operand[4], "ROUND": _round_bf16(dtype)}
    return {"SCALED": operand[0] == "int8"}


def _stacked_args(operands: list, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The kernel's weight arguments for stacked operands (_operand): each part's tensor of the first weight,
    followed by the element offsets of the others' (_offsets; zeros for a plain weight's repeated part), and the
    constants of their kind."""
    kind = operands[0][0]
    args = []
    for n, i in enumerate(_PARTS[kind]):
        tensors = [op[i] for op in operands]
        offsets = [0, 0] if kind == "plain" and n > 0 else _offsets(tensors)[:2]
        args += [tensors[0], *offsets]
    return tuple(args), _constants(operands[0], dtype)


def _stacked(x: torch.Tensor, weights, residual: torch.Tensor | None, norm, autotune: bool = False) -> torch.Tensor:
    operands = [_operand(w) for w in weights]
    weight_args, constants = _stacked_args(operands, x.dtype)
    sizes = [w.shape[0] for w in weights] + [0, 0]
    n = sum(w.shape[0] for w in weights)
    k = x.shape[-1]
    flat, lead, norm_constant = _prepared(x, norm)
    rows = flat.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    r = y if residual is None else residual.reshape(rows, n).contiguous()
    kernel, defaults, extra = _kernel(rows, int4=operands[0][0] == "int4")
    kernels.launch(
        kernel,
        _grid(n, rows),
        (flat, *lead, *weight_args, r, y, rows, n, *sizes[:2], k),
        defaults,
        autotune=autotune,
        **norm_constant,
        RESIDUAL=residual is not None,
        **constants,
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
    flat, lead, norm_constant = _prepared(x, norm)
    g, u = _operand(gate), _operand(up)
    rows, n, k = flat.shape[0], gate.shape[0], flat.shape[1]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    kernel, defaults, extra = _kernel(rows, swiglu=True, int4=g[0] == "int4")
    weight_args = tuple(t for i in _PARTS[g[0]] for t in (g[i], u[i]))  # each part: gate's, then up's
    constants = _constants(g, x.dtype)
    kernels.launch(
        kernel,
        _grid(n, rows),
        (flat, *lead, *weight_args, y, rows, n, k),
        defaults,
        autotune=autotune,
        **norm_constant,
        **constants,
        **extra,
    )
    return y.view(*x.shape[:-1], n)


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    """The int4 weight (N, K) in scale's dtype from its parts (int4.py's layout), in one pass of a kernel: equal to
    int4.dequantize (q * scale + offset in fp32, rounded once). For CUDA tensors (or CPU ones under the
    interpreter); a group the kernel does not take (over MAX_INT4_GROUP) goes to int4.dequantize."""
    n, k = qdata.shape[0], 2 * qdata.shape[1]
    if not _int4_group_ok(group, k):
        from longllama import int4

        return int4.dequantize(qdata, scale, offset, group)
    out = torch.empty(n, k, dtype=scale.dtype, device=qdata.device)
    grid = lambda meta: (-(-n // meta["BLOCK_N"]), -(-(k // 2) // meta["BLOCK_KB"]))
    kernels.launch(
        _int4_kernels()[4],
        grid,
        (qdata.contiguous(), scale.contiguous(), offset.contiguous(), out, n, k),
        _DEQUANTIZE_DEFAULTS,
        G=group,
        ROUND=_round_bf16(scale.dtype),
    )
    return out
