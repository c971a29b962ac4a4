"""The elementwise work of a layer (RMSNorm, the residual add before it, RoPE, SwiGLU, zero padding for kernels, the
merge of local and memory attention and the heads' layout for the output projection) as small pure functions, run
as they are or, with `compile_elementwise`, compiled by torch.compile: each then becomes one or two fused kernels
instead of up to ten (matrix products stay with cuBLAS, except the matrix-vector products of decoding, which go to
gemv.py's Triton kernel; rope_pad goes to rope_kernels.py's on GPUs). The maths is the same; compiled kernels may
round differently within the activation dtype.

`ops(config, device, impl)` picks the set for one forward: compiled on the fast path when the config asks for it
("auto", the default: on GPUs) and no gradient is recorded (inference). Compilation happens on first use, once per
process and shape family (seconds; torch.compile's cache keeps the kernels for later processes), the number of
rows (a window group's windows, a batch) dynamic from two rows up. If compiling fails, the plain functions run
instead, after one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longllama import gemv, kernels
from longllama.attention import few_query_attention, heads, merge_heads

logger = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (the order of the reference and of LLaMA)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum x + a and its RMSNorm."""
    h = x + a
    return h, rms_norm(h, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x zero-padded in the last dimension to `dim` (x itself when it is that wide already)."""
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def rope_pad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int,
             rotate_qk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A window's attention inputs for the kernels: q (b, n, h, d) and k, v (b, n, h_kv, d) as projected (token-major,
    no transpose), q and k rotated by cos, sin (b|1, n, 1, d) when `rotate_qk`, all three zero-padded to `width`:
    (b, n, heads, width) each. Compiled, this is one pass over q, k and v instead of a rotation and three
    transposing pads."""
    if rotate_qk:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return pad_to(q, width), pad_to(k, width), pad_to(v, width)


# rope_pad on GPUs by a Triton kernel (rope_kernels.py) instead of Inductor's (compile_elementwise): one pass of
# aligned rows. False: the compiled function.
ROPE_KERNEL = True


def kernel_rope_pad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    width: int, rotate_qk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """rope_pad by the Triton kernel, or None where it does not apply (not a GPU or the interpreter's tests; inputs
    not contiguous; dtypes that differ)."""
    if not (ROPE_KERNEL and kernels.usable(q) and width <= 256 and q.dtype in (torch.bfloat16, torch.float16,
                                                                              torch.float32)):
        return None
    if not all(t.is_contiguous() and t.dtype == q.dtype for t in (k, v)):
        return None
    if rotate_qk and not (cos.dtype == sin.dtype == q.dtype and cos.shape == sin.shape and cos.stride() == sin.stride()
                          and cos.stride(-1) == 1 and cos.shape[1] == q.shape[1]):
        return None
    from longllama import rope_kernels

    b, n, _, d = q.shape
    s_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    block_d = kernels.pow2(width)
    outs = []
    for x, rotated in ((q, rotate_qk), (k, rotate_qk), (v, False)):
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        out = torch.empty(*x.shape[:3], width, dtype=x.dtype, device=x.device)
        grid = (-(-rows // 32),)
        rope_kernels.rope_pad_rows[grid](x, cos, sin, out, rows, x.shape[2], n, s_cb, cos.stride(1), D=d, W=width,
                                         ROTATE=rotated, BLOCK_R=32, BLOCK_D=block_d, num_warps=4)
        outs.append(out)
    return tuple(outs)


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
    linear: Callable  # x @ weight.T
    linear_swiglu: Callable  # silu(x @ gate.T) * (x @ up.T)


def linear_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu(F.linear(x, gate), F.linear(x, up))


EAGER = Ops(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rotate=rotate, swiglu=swiglu, pad_to=pad_to,
            rope_pad=rope_pad, merge_heads=merge_heads, heads=heads, few_query_attention=few_query_attention,
            linear=F.linear, linear_swiglu=linear_swiglu)
_compiled: Ops | None = None


def _guarded(name: str, eager: Callable, fn: Callable, what: str = "torch.compile of",
             instead: str = "running it unfused") -> Callable:
    """`fn` (compiled, or a kernel), falling back to `eager` for good, with one warning, if it fails here."""
    state = {"fn": fn}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # a missing compiler or an unsupported backend: keep running, unfused
            if state["fn"] is eager:
                raise
            logger.warning("compile_elementwise: %s %s failed (%s); %s", what, name,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__, instead)
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


ROWS_DYNAMIC = True  # False: every number of rows specialised first (torch.compile's default), for comparison


def _rows_dynamic(fn: Callable) -> Callable:
    """`fn` (compiled) with the first dimension of its activations marked dynamic where it holds two or more rows:
    one graph then serves every number of rows from 2 up (a window group of 4 windows and the last group of 1-3),
    instead of a new compilation inside the first call that ends on a shorter group (six of them, ~2 s with warm
    caches, at the end of a 1M-token ingest). One row stays its own graph (torch.compile specialises size 1)."""
    def call(*args, **kwargs):
        for x in _activations(args, kwargs) if ROWS_DYNAMIC else ():
            if x.shape[0] >= 2:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        return fn(*args, **kwargs)
    return call


def compiled() -> Ops:
    """The same functions through torch.compile (built lazily; the number of rows dynamic from 2 rows up, other
    sizes first specialised, then dynamic)."""
    global _compiled
    if _compiled is None:
        names = ("rms_norm", "add_rms_norm", "rotate", "swiglu", "pad_to", "rope_pad", "merge_heads", "heads",
                 "few_query_attention")
        fns = {name: _guarded(name, getattr(EAGER, name), _rows_dynamic(torch.compile(getattr(EAGER, name))))
               for name in names}

        def kernel_or_compiled_rope_pad(q, k, v, cos, sin, width, rotate_qk):  # the Triton kernel where it applies
            out = kernel_rope_pad(q, k, v, cos, sin, width, rotate_qk) if q.is_cuda else None
            return out if out is not None else fns["rope_pad"](q, k, v, cos, sin, width, rotate_qk)
        fast_rope_pad = _guarded("rope_pad", fns["rope_pad"], kernel_or_compiled_rope_pad, what="the Triton kernel of",
                                 instead="running the compiled function")

        def fast_linear_swiglu(x, gate, up):  # decoding: one pass over both weights; else compiled SwiGLU
            if gemv.applies(x, gate, up):
                return gemv.linear_swiglu(x, gate, up)
            return fns["swiglu"](F.linear(x, gate), F.linear(x, up))
        _compiled = Ops(**{**fns, "rope_pad": fast_rope_pad}, linear=gemv.linear, linear_swiglu=fast_linear_swiglu)
    return _compiled


def wanted(setting, device: torch.device) -> bool:
    """Whether `compile_elementwise` (True, False or "auto": on GPUs) asks for compiled functions on `device`."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def ops(config, device: torch.device, impl: str) -> Ops:
    """The functions one forward on `device` with attention `impl` uses: compiled for the fast path where
    `config.compile_elementwise` asks for it (see `wanted`) and no gradient flows (inference); else the plain ones
    (the exact paths "eager" and "sdpa" stay as the reference computes them)."""
    if impl == "fast" and wanted(getattr(config, "compile_elementwise", False), device) and not torch.is_grad_enabled():
        return compiled()
    return EAGER
