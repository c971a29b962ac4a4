"""What the Triton kernels (gemv.py, decode_attention.py) share: importing Triton lazily, autotuning on GPUs and a
fixed configuration in Triton's interpreter, and whether a tensor can go to a kernel at all.

The CPU tests run the kernels in Triton's interpreter: TRITON_INTERPRET=1 set before Triton is imported (Triton
reads it then; tests/conftest.py does it on machines without a GPU) and `CPU = True` (the tests' fixture) let CPU
tensors through.
"""

from __future__ import annotations

import functools
import os

import torch

CPU = False  # tests: CPU tensors go to the kernels, which Triton's interpreter then runs


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


def usable(x: torch.Tensor) -> bool:
    """Whether a kernel may take x: a CUDA tensor with Triton installed, or a CPU tensor in the interpreter's tests."""
    if not available():
        return False
    return x.is_cuda or (CPU and interpreting() and x.device.type == "cpu")


def autotune(configs, key):
    """triton.autotune on GPUs (the first call with a new key times every configuration, seconds); the interpreter
    cannot time configurations, so there the kernel stays as it is and `launch` passes a fixed configuration."""
    if interpreting():
        return lambda fn: fn
    import inspect

    tune = triton()[0].autotune
    # The choices are kept on disk (Triton's cache) where this Triton can: later processes skip the timing runs.
    extra = {"cache_results": True} if "cache_results" in inspect.signature(tune).parameters else {}
    return tune(configs=configs, key=key, **extra)


def launch(kernel, grid, args, defaults: dict, **constants) -> None:
    """kernel[grid](*args, **constants), with `defaults` (the tuned meta-parameters) under the interpreter."""
    if interpreting():
        constants = {**defaults, **constants}
        kernel[grid(constants)](*args, **constants)
    else:
        kernel[grid](*args, **constants)
