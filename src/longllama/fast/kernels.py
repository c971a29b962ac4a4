"""What the Triton kernels (gemv.py, decode_attention.py, sampling.py, ...) share: importing Triton lazily,
autotuning on GPUs and a fixed configuration in Triton's interpreter, and whether a tensor can go to a kernel at all.

The CPU tests run the kernels in Triton's interpreter: TRITON_INTERPRET=1 set before Triton is imported (Triton
reads it then; tests/conftest.py does it on machines without a GPU) and a plan with `interpret_kernels` (passed
here as `cpu=True`) lets CPU tensors through.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton():
    import triton
    import triton.language as tl

    return triton, tl


def usable(x: torch.Tensor, *, cpu: bool = False) -> bool:
    """Whether a kernel may take x: a CUDA tensor with Triton installed, or with `cpu` a CPU tensor under the
    interpreter (the tests)."""
    if not available():
        return False
    return x.is_cuda or (cpu and interpreting() and x.device.type == "cpu")


def autotune(configs, key, measured: dict | None = None):
    """triton.autotune on GPUs (the first call with a new key compiles and times every configuration); the
    interpreter cannot time configurations, so there the kernel stays as it is and `launch` passes a fixed one.

    `measured`: {(GPU name, activation dtype, *key values): (meta-parameters, num_warps[, num_stages])}, the
    configurations the autotuner (benchmarks/bench_inference.py records them) or a sweep (benchmarks/tune_decode.py)
    chose on that GPU: a key found there compiles only that configuration, which `configs` must hold. A fresh machine
    spent ~3 minutes tuning the 3B model's first decoding over the full lists (H100); keys or GPUs not in
    the table are tuned as usual."""
    if interpreting():
        return lambda fn: fn
    import inspect

    tune = triton()[0].autotune
    # The choices are kept on disk (Triton's cache) where this Triton can: later processes skip the timing runs.
    extra = {"cache_results": True} if "cache_results" in inspect.signature(tune).parameters else {}
    if measured:
        extra["prune_configs_by"] = {"early_config_prune": measured_choice(measured, key)}
    return tune(configs=configs, key=key, **extra)


def _device_name(t: torch.Tensor) -> str | None:
    return torch.cuda.get_device_name(t.device) if t.is_cuda else None


def measured_choice(measured: dict, key):
    """Triton's early_config_prune: the measured configuration for this GPU, dtype and key, else all of them."""

    def prune(configs, nargs, **kwargs):
        try:
            return pick(configs, {**nargs, **kwargs})
        except Exception:  # noqa: BLE001 - an unexpected call convention: tune over everything, as without a table
            return configs

    def pick(configs, args):
        tensor = next((v for v in args.values() if isinstance(v, torch.Tensor)), None)
        if tensor is None:
            return configs
        want = measured.get((_device_name(tensor), str(tensor.dtype), *(args.get(k) for k in key)))
        if want is None:
            return configs
        meta, warps, *stages = want
        picked = [
            c
            for c in configs
            if c.kwargs == meta and c.num_warps == warps and (not stages or c.num_stages == stages[0])
        ]
        return picked or configs

    return prune


def pow2(n: int) -> int:
    """The smallest power of two >= n (at least 2): a block size that covers n elements."""
    return 1 << max(n - 1, 1).bit_length()


def launch(kernel, grid, args, defaults: dict, **constants) -> None:
    """kernel[grid](*args, **constants), with `defaults` (the tuned meta-parameters) under the interpreter."""
    if interpreting():
        constants = {**defaults, **constants}
        kernel[grid(constants)](*args, **constants)
    else:
        kernel[grid](*args, **constants)
