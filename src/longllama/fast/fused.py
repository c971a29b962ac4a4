"""The elementwise functions of a layer (ops.py) compiled by torch.compile for the fast path, with Triton kernels
where they serve better: each function becomes one or two fused kernels instead of up to ten (matrix products stay
with cuBLAS, except the matrix-vector products of decoding, which go to gemv.py's kernel; rope_pad goes to
rope_kernels.py's on GPUs). The maths is the same; compiled kernels may round differently within the activation
dtype.

`ops_for(plan)` picks the set for one forward: compiled where the plan asks for it (`plan.compile`, fast attention)
and no gradient is recorded (inference), else ops.EAGER. Compilation happens on first use, once per process and
shape family (seconds; Inductor's FX graph cache, in longllama.caches' directory, keeps the graphs for later
processes), every dimension but the features dynamic from two elements up (rows, tokens, memory keys). If
compiling fails, the plain function runs instead, after one warning.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from longllama import ops, timings
from longllama.fast import gemv, kernels
from longllama.ops import EAGER, Ops
from longllama.plan import ExecutionPlan

logger = logging.getLogger(__name__)


def kernel_rope_pad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    width: int,
    rotate_qk: bool,
    *,
    cpu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """ops.rope_pad by the Triton kernel, or None where it does not apply (not a GPU, or CPU tensors without `cpu`
    under the interpreter; inputs not contiguous; dtypes that differ)."""
    if not (kernels.usable_float(q, cpu=cpu) and width <= 256):
        return None
    if not all(t.is_contiguous() and t.dtype == q.dtype for t in (k, v)):
        return None
    if rotate_qk and not (
        cos.dtype == sin.dtype == q.dtype
        and cos.shape == sin.shape
        and cos.stride() == sin.stride()
        and cos.stride(-1) == 1
        and cos.shape[1] == q.shape[1]
    ):
        return None
    from longllama.fast import rope_kernels

    b, n, _, d = q.shape
    s_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    block_d = kernels.pow2(width)
    outs = []
    for x, rotated in ((q, rotate_qk), (k, rotate_qk), (v, False)):
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        out = torch.empty(*x.shape[:3], width, dtype=x.dtype, device=x.device)
        grid = (-(-rows // 32),)
        kernels.launch_fixed(
            "rope_pad",
            rope_kernels.rope_pad_rows,
            grid,
            (x, cos, sin, out, rows, x.shape[2], n, s_cb, cos.stride(1)),
            D=d,
            W=width,
            ROTATE=rotated,
            BLOCK_R=32,
            BLOCK_D=block_d,
            num_warps=4,
        )
        outs.append(out)
    return tuple(outs)


def _elementwise_kernels():
    from longllama.fast import elementwise_kernels

    return elementwise_kernels


def _rows_of(*tensors: torch.Tensor, cpu: bool) -> bool:
    """Whether tensors of one shape can go to a row kernel: usable, contiguous, a float dtype they share."""
    x = tensors[0]
    return (
        kernels.usable_float(x, cpu=cpu)
        and x.numel() > 0
        and all(t.shape == x.shape and t.dtype == x.dtype and t.is_contiguous() for t in tensors)
    )


def kernel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, cpu: bool = False) -> torch.Tensor | None:
    """ops.rms_norm by the Triton kernel (one row per program), or None where it does not apply."""
    return _kernel_norm(x, None, weight, eps, cpu=cpu)


def kernel_add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, *, cpu: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ops.add_rms_norm (the residual sum and its RMSNorm) by the Triton kernel, or None where it does not apply."""
    return _kernel_norm(x, a, weight, eps, cpu=cpu)


def _kernel_norm(x, a, weight, eps, *, cpu):
    n = x.shape[-1]
    if not _rows_of(x, *(() if a is None else (a,)), cpu=cpu) or n > 16384:
        return None
    if weight.shape != (n,) or not weight.is_contiguous() or weight.device != x.device:
        return None
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    total = torch.empty_like(x) if a is not None else None
    block = kernels.pow2(n)
    kernels.launch_fixed(
        "rms_norm",
        _elementwise_kernels().rms_norm_rows,
        (x.numel() // n,),
        (x, x if a is None else a, weight, x if total is None else total, out, float(eps)),
        N=n,
        ADD=a is not None,
        BLOCK_N=block,
        num_warps=max(1, min(16, block // 256)),
    )
    return out if a is None else (total, out)


def kernel_swiglu(gate: torch.Tensor, up: torch.Tensor, *, cpu: bool = False) -> torch.Tensor | None:
    """ops.swiglu by the Triton kernel, or None where it does not apply."""
    if not _rows_of(gate, up, cpu=cpu):
        return None
    out = torch.empty_like(gate)
    n = gate.numel()
    grid = (-(-n // 1024),)
    kernels.launch_fixed(
        "swiglu", _elementwise_kernels().swiglu_flat, grid, (gate, up, out, n), BLOCK=1024, num_warps=4
    )
    return out


def kernel_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cpu: bool = False) -> torch.Tensor | None:
    """ops.rotate of x (b, h, n, d) by cos, sin that broadcast to it (Triton kernel, rounded once), or None where
    the kernel does not apply."""
    if x.dim() != 4 or not kernels.usable_float(x, cpu=cpu) or x.stride(-1) != 1 or x.numel() == 0:
        return None
    if x.shape[-1] % 2 or x.shape[-1] > 256:
        return None
    try:
        cos, sin = cos.expand(x.shape), sin.expand(x.shape)
    except RuntimeError:
        return None
    if cos.stride() != sin.stride() or cos.stride(-1) != 1 or cos.device != x.device:
        return None
    b, h, n, d = x.shape
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    rows = b * h * n
    kernels.launch_fixed(
        "rotate",
        _elementwise_kernels().rotate_rows,
        (-(-rows // 32),),
        (x, cos, sin, out, rows, h, n, *x.stride()[:3], *cos.stride()[:3]),
        D=d,
        BLOCK_R=32,
        BLOCK_D=kernels.pow2(d),
        num_warps=4,
    )
    return out


def kernel_merge_heads(
    out: torch.Tensor,
    lse: torch.Tensor,
    mem_out: torch.Tensor,
    mem_lse: torch.Tensor,
    head_dim: int,
    more: tuple = (),
    *,
    cpu: bool = False,
) -> torch.Tensor | None:
    """ops.merge_heads by the Triton kernel (further memory parts merged first by ops.merge_memory_parts), or None
    where it does not apply."""
    if not kernels.usable_float(out, cpu=cpu):
        return None
    if more:
        mem_out, mem_lse = ops.merge_memory_parts(((mem_out, mem_lse), *more), head_dim)
    b, h, n, _ = out.shape
    if mem_out.shape[:3] != (b, h, n) or lse.shape != mem_lse.shape or lse.shape != (b, h, n) or n == 0:
        return None
    if out.stride(-1) != 1 or mem_out.stride(-1) != 1 or lse.stride(-1) != 1 or mem_lse.stride(-1) != 1:
        return None
    if lse.dtype != torch.float32 or mem_lse.dtype != torch.float32 or mem_out.device != out.device:
        return None
    merged = torch.empty(b, n, h * head_dim, dtype=out.dtype, device=out.device)
    block_n = 32
    strides = (*out.stride()[:3], *lse.stride()[:2], *mem_out.stride()[:3], *mem_lse.stride()[:2])
    kernels.launch_fixed(
        "merge_heads",
        _elementwise_kernels().merge_heads_rows,
        (-(-n // block_n), b * h),
        (out, lse, mem_out, mem_lse, merged, h, n, *strides),
        HD=head_dim,
        BLOCK_N=block_n,
        BLOCK_D=kernels.pow2(head_dim),
        num_warps=4,
    )
    return merged


def _guarded(
    name: str, eager: Callable, fn: Callable, what: str = "torch.compile of", instead: str = "running it unfused"
) -> Callable:
    """`fn` (compiled, or a kernel), falling back to `eager` for good, with one warning, if it fails here."""
    state = {"fn": fn}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # a missing compiler or an unsupported backend: keep running, unfused
            if state["fn"] is eager:
                raise
            logger.warning(
                "elementwise functions: %s %s failed (%s); %s",
                what,
                name,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                instead,
            )
            state["fn"] = eager
            return eager(*args, **kwargs)

    return call


def _activations(args, kwargs):
    """The activation tensors among a call's arguments (nested in tuples and lists too): 3 or more dimensions."""
    stack = [*args, *kwargs.values()]
    while stack:
        x = stack.pop()
        if isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor) and x.dim() >= 3 and not isinstance(x, torch.nn.Parameter):
            yield x


def _dynamic(name: str, fn: Callable) -> Callable:
    """`fn` (compiled) with every dimension but the last of its activations marked dynamic where it holds two or
    more elements: one graph then serves every number of rows (a window group of 4 windows and the last group of
    1-3), every prompt length (the last, shorter window) and every memory length, instead of a new compilation
    inside the call that first meets a new size. Sizes of 1 stay their own graph (torch.compile specialises them);
    the last dimension (the features) stays fixed, as the kernels' inner loops are built for it. Each call that
    compiled (or loaded the graph from Inductor's cache on disk) is logged (longllama.timings)."""

    def call(*args, **kwargs):
        for x in _activations(args, kwargs):
            for dim in range(x.dim() - 1):
                if x.shape[dim] >= 2:
                    torch._dynamo.maybe_mark_dynamic(x, dim)
        counters = torch._dynamo.utils.counters
        graphs, hits = counters["stats"]["unique_graphs"], counters["inductor"]["fxgraph_cache_hit"]
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if counters["stats"]["unique_graphs"] != graphs:
            source = "inductor cache" if counters["inductor"]["fxgraph_cache_hit"] != hits else "built"
            timings.record("compile", f"torch.compile {name}", time.perf_counter() - start, source)
        return out

    return call


def compiled(*, rope_kernel: bool = True, gemv_max_rows: int = 16, cpu: bool = False, autotune: bool = False) -> Ops:
    """ops.EAGER's functions through torch.compile (built once per set of options; every dimension but the
    features dynamic from 2 elements up, see _dynamic). `rope_kernel`: rope_pad by the Triton kernel where it
    applies; `gemv_max_rows`: products of at most that many rows by the matrix-vector kernel; `cpu`: CPU tensors
    go to the kernels (the interpreter's tests); `autotune`: the matrix-vector kernel's configurations by Triton's
    autotuner (ExecutionPlan.autotune)."""
    return _compiled(bool(rope_kernel), int(gemv_max_rows), bool(cpu), bool(autotune))


# Functions of each row (token) alone: called on (1, rows, features), so that one window (batch 1) and a group of
# windows (batch 2-4) share one compiled graph; torch.compile gives a dimension of size 1 a graph of its own, which
# compiled each of them twice in a process's first long prompt.
_ROW_WISE = ("rms_norm", "add_rms_norm", "swiglu")


def _as_rows(fn: Callable) -> Callable:
    """`fn` of row-wise tensors (those shaped like the first argument) called on their (1, rows, features) views;
    its outputs take the first argument's leading dimensions back."""

    def call(*args):
        lead = args[0].shape[:-1]
        if len(lead) < 2 or lead[0] == 1:
            return fn(*args)
        flat = [a.reshape(1, -1, a.shape[-1]) if isinstance(a, torch.Tensor) and a.shape == args[0].shape else a
                for a in args]  # fmt: skip
        out = fn(*flat)
        back = lambda t: t.reshape(*lead, t.shape[-1])  # noqa: E731
        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)

    return call


@functools.cache
def _compiled(rope_kernel: bool, gemv_max_rows: int, cpu: bool, autotune: bool) -> Ops:
    names = (
        "rms_norm",
        "add_rms_norm",
        "rotate",
        "swiglu",
        "pad_to",
        "rope_pad",
        "merge_heads",
        "heads",
        "few_query_attention",
    )
    fns = {name: _dynamic(name, torch.compile(getattr(EAGER, name))) for name in names}
    fns = {
        name: _guarded(name, getattr(EAGER, name), _as_rows(fn) if name in _ROW_WISE else fn)
        for name, fn in fns.items()
    }
    rope_pad = fns["rope_pad"]
    if rope_kernel:

        def rope_pad_kernel(q, k, v, cos, sin, width, rotate_qk, *, cpu):
            return kernel_rope_pad(q, k, v, cos, sin, width, rotate_qk, cpu=cpu) if q.is_cuda else None

        rope_pad = _kernel_or_plain("rope_pad", rope_pad_kernel, rope_pad, cpu, instead="running the compiled function")

    linear, linear_swiglu = _products(fns["swiglu"], gemv_max_rows, cpu, autotune)
    return Ops(**{**fns, "rope_pad": rope_pad}, linear=linear, linear_swiglu=linear_swiglu)


def _products(swiglu: Callable, gemv_max_rows: int, cpu: bool, autotune: bool) -> tuple[Callable, Callable]:
    """Ops.linear and Ops.linear_swiglu of the fast sets: products of few rows by the matrix-vector kernels (a
    residual added inside), others by cuBLAS with `swiglu` after."""

    def linear(x, weight, residual=None, norm=None):
        return gemv.linear(x, weight, residual=residual, norm=norm, max_rows=gemv_max_rows, cpu=cpu, autotune=autotune)

    def linear_swiglu(x, gate, up):  # decoding: one pass over both weights
        if gemv.applies(x, gate, up, max_rows=gemv_max_rows, cpu=cpu):
            return gemv.linear_swiglu(x, gate, up, max_rows=gemv_max_rows, cpu=cpu, autotune=autotune)
        return swiglu(F.linear(x, gate), F.linear(x, up))

    return linear, linear_swiglu


def with_kernels(
    *, rope_kernel: bool = True, gemv_max_rows: int = 16, cpu: bool = False, autotune: bool = False
) -> Ops:
    """ops.EAGER's functions with Triton kernels (elementwise_kernels.py) for RMSNorm, the residual add with it,
    SwiGLU, RoPE and the merge of partial attentions, and `rope_kernel` for rope_pad, where each applies (GPU
    tensors, or CPU tensors under the interpreter with `cpu`); the plain functions otherwise. Nothing goes through
    torch.compile. Options as in `compiled`."""
    return _with_kernels(bool(rope_kernel), int(gemv_max_rows), bool(cpu), bool(autotune))


def _kernel_or_plain(
    name: str, kernel: Callable, plain: Callable, cpu: bool, instead: str = "running the plain function"
) -> Callable:
    """`kernel(*args, cpu=cpu)`, or `plain(*args)` where the kernel returns None (it does not apply); after a kernel
    failure, `plain` for good (one warning saying `instead`)."""

    def call(*args, **kwargs):
        out = kernel(*args, **kwargs, cpu=cpu)
        return out if out is not None else plain(*args, **kwargs)

    return _guarded(name, plain, call, what="the Triton kernel of", instead=instead)


@functools.cache
def _with_kernels(rope_kernel: bool, gemv_max_rows: int, cpu: bool, autotune: bool) -> Ops:
    def rope_pad_kernel(q, k, v, cos, sin, width, rotate_qk, *, cpu):
        return kernel_rope_pad(q, k, v, cos, sin, width, rotate_qk, cpu=cpu) if rope_kernel else None

    fns = {
        "rms_norm": _kernel_or_plain("rms_norm", kernel_rms_norm, EAGER.rms_norm, cpu),
        "add_rms_norm": _kernel_or_plain("add_rms_norm", kernel_add_rms_norm, EAGER.add_rms_norm, cpu),
        "rotate": _kernel_or_plain("rotate", kernel_rotate, EAGER.rotate, cpu),
        "swiglu": _kernel_or_plain("swiglu", kernel_swiglu, EAGER.swiglu, cpu),
        "rope_pad": _kernel_or_plain("rope_pad", rope_pad_kernel, EAGER.rope_pad, cpu),
        "merge_heads": _kernel_or_plain("merge_heads", kernel_merge_heads, EAGER.merge_heads, cpu),
    }
    linear, linear_swiglu = _products(fns["swiglu"], gemv_max_rows, cpu, autotune)
    return Ops(
        **fns,
        pad_to=EAGER.pad_to,
        heads=EAGER.heads,
        few_query_attention=EAGER.few_query_attention,
        linear=linear,
        linear_swiglu=linear_swiglu,
    )


def ops_for(plan: ExecutionPlan) -> Ops:
    """The functions one forward under `plan` uses, on the fast path with no gradient flowing (inference): compiled
    where the plan asks for it (`compile`), else the Triton kernels on GPUs (`elementwise_kernels`, and on CPU
    tensors under the interpreter with `interpret_kernels`); the plain ones otherwise (training, and the exact paths
    "eager" and "sdpa", stay as the reference computes them)."""
    if plan.attention != "fast" or torch.is_grad_enabled():
        return EAGER
    options = dict(
        rope_kernel=plan.rope_kernel,
        gemv_max_rows=plan.gemv_max_rows,
        cpu=plan.interpret_kernels,
        autotune=plan.autotune,
    )
    if plan.compile:
        return compiled(**options)
    if plan.elementwise_kernels and (plan.device.startswith("cuda") or plan.interpret_kernels):
        return with_kernels(**options)
    return EAGER
