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

from longllama import timings
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
    if not (kernels.usable(q, cpu=cpu) and width <= 256 and q.dtype in (torch.bfloat16, torch.float16, torch.float32)):
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
        rope_kernels.rope_pad_rows[grid](
            x,
            cos,
            sin,
            out,
            rows,
            x.shape[2],
            n,
            s_cb,
            cos.stride(1),
            D=d,
            W=width,
            ROTATE=rotated,
            BLOCK_R=32,
            BLOCK_D=block_d,
            num_warps=4,
        )
        outs.append(out)
    return tuple(outs)


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
                "compile_elementwise: %s %s failed (%s); %s",
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

        def kernel_or_compiled_rope_pad(q, k, v, cos, sin, width, rotate_qk):
            out = kernel_rope_pad(q, k, v, cos, sin, width, rotate_qk, cpu=cpu) if q.is_cuda else None
            return out if out is not None else fns["rope_pad"](q, k, v, cos, sin, width, rotate_qk)

        rope_pad = _guarded(
            "rope_pad",
            fns["rope_pad"],
            kernel_or_compiled_rope_pad,
            what="the Triton kernel of",
            instead="running the compiled function",
        )

    def linear(x, weight, residual=None, norm=None):
        return gemv.linear(x, weight, residual=residual, norm=norm, max_rows=gemv_max_rows, cpu=cpu, autotune=autotune)

    def fast_linear_swiglu(x, gate, up):  # decoding: one pass over both weights; else compiled SwiGLU
        if gemv.applies(x, gate, up, max_rows=gemv_max_rows, cpu=cpu):
            return gemv.linear_swiglu(x, gate, up, max_rows=gemv_max_rows, cpu=cpu, autotune=autotune)
        return fns["swiglu"](F.linear(x, gate), F.linear(x, up))

    return Ops(**{**fns, "rope_pad": rope_pad}, linear=linear, linear_swiglu=fast_linear_swiglu)


def ops_for(plan: ExecutionPlan) -> Ops:
    """The functions one forward under `plan` uses: compiled for the fast path where the plan asks for it and no
    gradient flows (inference); else the plain ones (the exact paths "eager" and "sdpa" stay as the reference
    computes them)."""
    if plan.attention == "fast" and plan.compile and not torch.is_grad_enabled():
        return compiled(
            rope_kernel=plan.rope_kernel,
            gemv_max_rows=plan.gemv_max_rows,
            cpu=plan.interpret_kernels,
            autotune=plan.autotune,
        )
    return EAGER
