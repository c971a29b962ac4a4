"""What the Triton kernels (gemv.py, decode_attention.py, sampling.py, ...) share: importing Triton lazily,
choosing a kernel's configuration on GPUs (`Kernel`: measured tables or a rule by default, Triton's autotuner only
where the plan asks for it) and a fixed one in Triton's interpreter, and whether a tensor can go to a kernel at all.

The CPU tests run the kernels in Triton's interpreter: TRITON_INTERPRET=1 set before Triton is imported (Triton
reads it then; tests/conftest.py does it on machines without a GPU) and a plan with `interpret_kernels` (passed
here as `cpu=True`) lets CPU tensors through.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from longllama import timings

logger = logging.getLogger(__name__)


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


FLOATS = (torch.bfloat16, torch.float16, torch.float32)  # the activation dtypes the kernels are built for


def usable_float(x: torch.Tensor, *, cpu: bool = False) -> bool:
    """`usable(x)` and x in one of FLOATS."""
    return usable(x, cpu=cpu) and x.dtype in FLOATS


def usable(x: torch.Tensor, *, cpu: bool = False) -> bool:
    """Whether a kernel may take x: a CUDA tensor with Triton installed, or with `cpu` a CPU tensor under the
    interpreter (the tests)."""
    if not available():
        return False
    return x.is_cuda or (cpu and interpreting() and x.device.type == "cpu")


class Kernel:
    """A Triton kernel with a list of configurations (meta-parameters, num_warps, num_stages) and how one is chosen
    for a call, keyed by the GPU, the dtype of the first tensor argument and the values of `key`:

    - by default, without timing anything: the table `longllama tune` measured on this GPU (fast/tuning.py, in the
      cache directory), else the shipped measured table (fast/tables.py), else `rule(key values)` (valid on any CUDA
      GPU). The choice is made once per key and process, and logged (longllama.timings, kind "config").
    - with `autotune` (the plan's field; `longllama tune`): Triton's autotuner over the whole list, which compiles and
      times every configuration for each new key (minutes for a model's first decoding); its choices are kept in
      `tuned` for `longllama tune` to write.

    Under Triton's interpreter nothing is timed or chosen: `launch` passes the caller's fixed configuration."""

    def __init__(self, name: str, fn, configs: list, key: list[str], shipped: dict, rule: Callable[..., tuple]):
        self.name, self.fn, self.configs, self.key = name, fn, configs, list(key)
        self.shipped, self.rule = shipped, rule
        self.cache: dict[tuple, tuple] = {}  # (GPU, dtype, *key values) -> (meta, num_warps, num_stages, source)
        self.tuned: dict[tuple, tuple] = {}  # choices the autotuner made in this process, same keys
        self._ready: dict[tuple, dict] = {}  # launch options of the configurations launched so far, per key
        self._autotuner = None

    def forget(self) -> None:
        """Drop the configurations chosen so far in this process (a table was written since): launches choose
        again."""
        self.cache.clear()
        self.tuned.clear()
        self._ready.clear()

    def _key(self, named: dict) -> tuple:
        tensor = next((v for v in named.values() if isinstance(v, torch.Tensor)), None)
        device = _device_name(tensor) if tensor is not None else None
        dtype = str(tensor.dtype) if tensor is not None else None
        return (device, dtype, *(_plain(named.get(k)) for k in self.key))

    def choose(self, key: tuple) -> tuple[dict, int, int | None, str]:
        """(meta-parameters, num_warps, num_stages or None, source) for (GPU, dtype, *key values), no timing."""
        found = self.cache.get(key)
        if found is None:
            start = time.perf_counter()
            found = _choice(self, key)
            self.cache[key] = found
            timings.record("config", f"{self.name} {self._describe(key)}", time.perf_counter() - start, found[3])
        return found

    def _describe(self, key: tuple) -> str:
        return " ".join(f"{k}={v}" for k, v in zip(self.key, key[2:]))

    def run(self, grid, args: tuple, constants: dict, *, autotune: bool = False) -> None:
        named = dict(zip(self.fn.arg_names, args))
        named.update(constants)
        key = self._key(named)
        ahead = _AHEAD.get()
        if autotune:
            if ahead is None:  # the autotuner compiles every configuration when it runs, not ahead
                self._autotuned(grid, args, constants, key)
            return
        ready = self._ready.get(key)
        if ready is not None and key in self.cache:  # the common case: chosen and compiled before
            if ahead is None:
                self.fn[grid](*args, **constants, **ready)
            return
        meta, warps, stages, _ = self.choose(key)
        ready = {**meta, "num_warps": warps, **({} if stages is None else {"num_stages": stages})}
        if ahead is not None:
            ahead.submit(
                key, f"triton {self.name} {self._describe(key)}", self.fn, args, {**constants, **ready},
                done=lambda: self._ready.__setitem__(key, ready),
            )  # fmt: skip
            return
        start = time.perf_counter()
        self.fn[grid](*args, **constants, **ready)
        # Triton compiled the kernel in that first launch, or read it from its cache directory
        timings.record("compile", f"triton {self.name} {self._describe(key)}", time.perf_counter() - start)
        self._ready[key] = ready

    def _autotuned(self, grid, args, constants, key) -> None:
        if self._autotuner is None:
            self._autotuner = triton()[0].autotune(configs=self.configs, key=self.key)(self.fn)
        tuner = self._autotuner
        known = key in self.tuned
        start = time.perf_counter()
        tuner[grid](*args, **constants)
        best = getattr(tuner, "best_config", None)
        if not known and best is not None:
            self.tuned[key] = (dict(best.kwargs), best.num_warps, best.num_stages)
            timings.record("tune", f"{self.name} {self._describe(key)}", time.perf_counter() - start, str(best))


def _plain(value):
    """A key value as JSON keeps it (ints and bools; a tensor is never a key here)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _choice(kernel: Kernel, key: tuple) -> tuple[dict, int, int | None, str]:
    from longllama.fast import tuning

    device, rest = key[0], key[1:]
    local = tuning.table(device).get(kernel.name, {}).get(rest)
    if local is not None:
        return (*_normal(local), "tuned table")
    shipped = kernel.shipped.get(key)
    if shipped is not None:
        return (*_normal(shipped), "shipped table")
    return (*_normal(kernel.rule(dict(zip(kernel.key, key[2:])), kernel.shipped, key[1])), "rule")


def _normal(entry) -> tuple[dict, int, int | None]:
    meta, warps, *stages = entry
    return dict(meta), int(warps), (int(stages[0]) if stages and stages[0] is not None else None)


def _device_name(t: torch.Tensor) -> str | None:
    return (
        _cuda_name(t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else None
    )


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def pow2(n: int) -> int:
    """The smallest power of two >= n (at least 2): a block size that covers n elements."""
    return 1 << max(n - 1, 1).bit_length()


def launch(kernel: Kernel, grid, args: tuple, defaults: dict, *, autotune: bool = False, **constants) -> None:
    """kernel[grid](*args, **constants) with its configuration chosen (Kernel.run; `autotune`: by Triton's
    autotuner), or with `defaults` under the interpreter."""
    if interpreting():
        if _AHEAD.get() is not None:
            return  # nothing to compile under the interpreter; a dry pass launches nothing
        constants = {**defaults, **constants}
        kernel.fn[grid(constants)](*args, **constants)
    else:
        kernel.run(grid, args, constants, autotune=autotune)


_launched: set[tuple] = set()


def launch_fixed(name: str, fn, grid, args: tuple, **constants) -> None:
    """fn[grid](*args, **constants) for a kernel of one fixed configuration; the first launch of each set of
    constants and dtype in this process (Triton compiles it then, or reads it from its cache directory) is logged
    (longllama.timings, kind "compile")."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    key = (name, None if tensor is None else tensor.dtype, *constants.items())  # a call site keeps its keywords' order
    ahead = _AHEAD.get()
    if key in _launched:
        if ahead is None:
            fn[grid](*args, **constants)
        return
    described = " ".join(f"{k}={v}" for k, v in constants.items() if k != "num_warps")
    event = f"triton {name} {described}".rstrip()
    if ahead is not None:
        if not interpreting():
            ahead.submit(key, event, fn, args, constants, done=lambda: _launched.add(key))
        return
    start = time.perf_counter()
    fn[grid](*args, **constants)
    timings.record("compile", event, time.perf_counter() - start)
    _launched.add(key)


class _Ahead:
    """The compilations a dry pass submitted (compile_ahead): each kernel once, on a pool of threads."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="longllama-compile")
        self.keys: set[tuple] = set()  # the kernels submitted

    def submit(self, key: tuple, name: str, fn, args: tuple, constants: dict, *, done: Callable[[], None]) -> None:
        if key in self.keys:
            return
        self.keys.add(key)
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        device = tensor.device if tensor is not None and tensor.is_cuda else None
        self.pool.submit(_compile, name, fn, args, constants, device, done)


def _compile(name: str, fn, args: tuple, constants: dict, device, done: Callable[[], None]) -> None:
    """Compile one kernel for these arguments without launching it (Triton's `warmup`: the same specialisation as a
    launch with them, kept in the kernel's in-process cache), and build its launcher and load it, as a first launch
    would. A failure is left for the real launch to meet and report."""
    start = time.perf_counter()
    try:
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            caches = getattr(fn, "device_caches", None)  # Triton's per-device table, made on first use
            if caches is not None and device is not None:
                with _MAKING:  # by one thread: two making it at once would each keep their own
                    caches[torch.cuda.current_device()]
            compiled = fn.warmup(*args, grid=(1,), **constants)
            handles = getattr(compiled, "_init_handles", None)
            if handles is not None:
                handles()
    except Exception as exc:  # noqa: BLE001 - reported by the launch that needs the kernel
        logger.debug("compiling %s ahead failed: %s", name, exc)
        return
    done()
    timings.record("compile", name, time.perf_counter() - start, "ahead")


_MAKING = threading.Lock()
_AHEAD: contextvars.ContextVar[_Ahead | None] = contextvars.ContextVar("longllama_compile_ahead", default=None)


def compiling_ahead() -> bool:
    """Whether a dry pass (compile_ahead) is under way in this context."""
    return _AHEAD.get() is not None


@contextlib.contextmanager
def compile_ahead(threads: int | None = None) -> Iterator[None]:
    """A dry pass: inside, Triton launches (launch, launch_fixed, Kernel.run) run nothing; each kernel not yet
    compiled in this process is submitted to a pool of `threads` threads (default: the CPU count, at most 16) and
    compiled there, all at once; leaving waits for them. Code run inside must have no effect that depends on the
    kernels' outputs (they are left unwritten): a decoding step before its capture, a forward over a throwaway
    cache. Part of a Triton compilation runs outside Python's lock (ptxas and the launcher's C compiler are
    subprocesses), so the kernels of a first call build partly side by side (docs/cold-start.md)."""
    if threads is None:
        threads = max(1, min(16, os.cpu_count() or 1))
    if available() and not interpreting() and torch.cuda.is_available():
        from triton.runtime import driver

        driver.active.get_current_target()  # made here, once: the pool's threads would each make (and build) it
    ahead = _Ahead(threads)
    token = _AHEAD.set(ahead)
    start = time.perf_counter()
    try:
        yield
    finally:
        _AHEAD.reset(token)
        ahead.pool.shutdown(wait=True)
        if ahead.keys:
            seconds = time.perf_counter() - start
            timings.record("compile", f"dry pass: {len(ahead.keys)} Triton kernels side by side", seconds, "wall")


def ahead_applies(plan, device: torch.device) -> bool:
    """Whether a dry pass is worth making for a call on `device` under `plan` (an ExecutionPlan): the plan asks for
    it and Triton kernels run there (a GPU, or CPU tensors under the interpreter's plan)."""
    return plan.compile_ahead and (device.type == "cuda" or plan.interpret_kernels) and available()


def dry_pass(call: Callable[[], object], what: str) -> None:
    """`call()` as a dry pass (compile_ahead). A failure is logged and left to the real pass, which meets it again
    and reports it (or falls back)."""
    try:
        with compile_ahead():
            call()
    except Exception as exc:  # noqa: BLE001 - the real pass reports it
        logger.debug("%s: the dry pass failed: %s", what, exc)
