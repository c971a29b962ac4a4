"""ExecutionPlan: every execution choice of a model (kernels, paddings, grouping, compilation, decoder), decided once.

A plan is built from the config, the device and what is installed (`build_plan`), carried by the model
(`model.plan`), handed down to the windows, the layers and the kernels, and printable (`str(plan)`, `plan.to_dict()`
for benchmark records). Users and benchmarks change it through `model.set_plan(**changes)` (or `--plan KEY=VALUE` on
the command line), which builds a new plan with `dataclasses.replace`: a plan is never mutated, and no module
attribute decides a path. What each choice was measured to do is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from longllama.choices import MEM_RETRIEVALS
from longllama.errors import InputError

logger = logging.getLogger(__name__)

ATTENTIONS = ("eager", "sdpa", "fast")
LOCAL_KERNELS = ("auto", "cudnn", "flash")
WEIGHTS = ("dense", "int8", "int4")
MEMORY_KERNELS = ("auto", "fa4", "cudnn", "flash")


class Failures:
    """Fast paths that failed at run time under one plan (shared by the plans replaced from it): each failure is
    reported once, with the fallback that serves from then on. A record of events, not a setting."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._seen

    def record(self, name: str, exc: BaseException, fallback: str) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self._seen.setdefault(name, message)
        warnings.warn(f"{name} failed ({message}); {fallback}", RuntimeWarning, stacklevel=3)

    def names(self) -> list[str]:
        """The fast paths recorded as failed (each served by its fallback since), in order of name."""
        return sorted(self._seen)

    def __repr__(self) -> str:
        return f"Failures({self.names()})"


@dataclass(frozen=True)
class ExecutionPlan:
    """How a model runs on one device. Fields (defaults are the measured best on an H100/H200):

    attention: "eager" (the exact reference maths), "sdpa" (torch SDPA over joined keys) or "fast" (fused kernels,
        no per-window copy of the memory). From the config's attn_impl; "auto" is eager on CPUs, fast on GPUs.
    compile: the elementwise functions (RMSNorm, RoPE, SwiGLU, merges) through torch.compile on the fast path, for
        inference (seconds of compiling in a process's first calls). From the config's compile_elementwise: only
        where it is true ("auto" leaves it off: the kernels below are as fast and need no compiling).
    elementwise_kernels: those functions as Triton kernels on the fast path on GPUs, for inference, where compile is
        off (fast/elementwise_kernels.py: each compiles once per machine in under a second).
    local_kernel: local attention's CUDA kernel: "auto" (cuDNN where it applies, else FlashAttention), "cudnn",
        "flash".
    memory_kernel: memory attention's kernel: "fa4" (FlashAttention 4; "auto" picks it where installed on a Hopper
        GPU), "cudnn", "flash", or "auto" (as local_kernel).
    memory_piece: cuDNN reads the memory in pieces of memory_piece * 2^j keys (a bounded number of per-shape plans).
    memory_width, local_width: on GPUs the memory is stored, and local attention's inputs padded, zero-padded in
        the head dimension to a multiple of these.
    fa4_tiles: FlashAttention 4's tile (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap) per stored width.
    split_groups: a window group's memory attention as two FlashAttention 4 calls where the tile leaves rows unused.
    key_parts: parts of the common memory prefix in that split (None: 3 from 128k keys, else 1).
    rope_kernel: the Triton kernel for RoPE + padding of the ingest on GPUs (else the compiled function).
    skip_dead_layers: a memory window whose output is dropped runs only up to the last memory layer.
    window_group_tokens: memory windows of one sequence read this many tokens at a time, as a batch of windows.
    decode_kernels: the static decoder's step as Triton kernels where they apply.
    compile_ahead: before a process's first ingest and first decoding step with Triton kernels, a dry pass over
        the same shapes in which the kernels compile side by side on a pool of threads (fast/kernels.compile_ahead)
        instead of one after another as the real pass reaches them; it launches nothing and leaves no trace.
    decode_min_chunk, decode_programs: the decoding attention kernel's split: keys per program a power of two that
        gives about decode_programs programs over a step's rows and heads, at least decode_min_chunk (the local
        cache is always read in chunks of decode_min_chunk); from the H100 sweep of benchmarks/tune_decode.py.
    block_kernel: block retrieval's window reads (mem_retrieval "blocks") by one Triton kernel over the chosen blocks
        in place (fast/block_attention.py) where it applies, else retrieval.attend's gather in PyTorch.
    offload_in_place: with the memory in page-locked CPU memory (the config's mem_offload), block retrieval's kernels
        read the chosen blocks where they are stored, over the bus, as they read a memory on the GPU (the window's
        block kernel and the decoding step's gather); off, each window's chosen blocks are gathered in CPU memory and
        their union copied to the GPU (retrieval.gather_blocks). On by default: on an H100 the 3B shape read 128k
        tokens in 12.6 s against 15.5 s copied, decoded after them in 14.4 ms against 43.1, with less GPU memory.
    gemv_max_rows: the matrix-vector kernel serves products of at most this many rows.
    interpret_kernels: CPU tensors go to the Triton kernels (under TRITON_INTERPRET=1: the kernel tests).
    autotune: the decoding kernels' configurations by Triton's autotuner (minutes on a model's first decoding; what
        `longllama tune` runs); off, each comes from a measured table or a rule, with no timing runs (fast/tables.py).
    weights: "dense" (plain tensors), or "int8" / "int4" (weight-only quantized tensors, quantize.py): from the
        config's quantization. All three go to the matrix-vector kernels (products of up to gemv_max_rows rows),
        which read int8 rows and int4 codes with their scales in place.
    mem_retrieval, mem_blocks, mem_block_size, mem_super_size, mem_recent_blocks: how memory layers read their memory
        ("dense": every key; "blocks": the best mem_blocks blocks of mem_block_size keys per group of queries, the
        mem_recent_blocks most recent always among them, ranked in two levels with superblocks of mem_super_size
        blocks where that is > 0, retrieval.py): from the config's fields of the same names (they change the maths,
        so they are the config's, recorded here).
    memory_shard: the process group over which memory layers' memories are split (sharding.py;
        `model.shard_memory(group)`), None for a memory held whole; recorded as `memory_shards` (its size).
    """

    device: str = "cpu"
    attention: str = "eager"
    compile: bool = False
    elementwise_kernels: bool = True
    local_kernel: str = "auto"
    memory_kernel: str = "auto"
    memory_piece: int = 1024
    memory_width: int = 16
    local_width: int = 16
    fa4_tiles: tuple[tuple[int, tuple[int, int, bool, bool]], ...] = ((112, (192, 144, False, True)),)
    split_groups: bool = True
    key_parts: int | None = None
    rope_kernel: bool = True
    skip_dead_layers: bool = True
    window_group_tokens: int = 8192
    decode_kernels: bool = True
    compile_ahead: bool = True
    decode_min_chunk: int = 64
    decode_programs: int = 4096
    block_kernel: bool = True
    offload_in_place: bool = True
    gemv_max_rows: int = 16
    interpret_kernels: bool = False
    autotune: bool = False
    weights: str = "dense"
    mem_retrieval: str = "dense"
    mem_blocks: int = 64
    mem_block_size: int = 64
    mem_super_size: int = 0
    mem_recent_blocks: int = 0
    memory_shard: Any = field(default=None, compare=False, repr=False)
    failures: Failures = field(default_factory=Failures, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("attention", ATTENTIONS),
            ("local_kernel", LOCAL_KERNELS),
            ("memory_kernel", MEMORY_KERNELS),
            ("weights", WEIGHTS),
            ("mem_retrieval", MEM_RETRIEVALS),
        ):
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"plan {name}={getattr(self, name)!r} is not supported: use one of {', '.join(allowed)}"
                )
        for name in (
            "memory_piece",
            "memory_width",
            "local_width",
            "window_group_tokens",
            "gemv_max_rows",
            "decode_min_chunk",
            "decode_programs",
            "mem_blocks",
            "mem_block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"plan {name}={value!r} must be a positive integer")
        for name in ("memory_width", "local_width"):
            if getattr(self, name) % 8:
                raise InputError(
                    f"plan {name}={getattr(self, name)} must be a multiple of 8 (kernels read aligned rows)"
                )
        if self.key_parts is not None and (not isinstance(self.key_parts, int) or self.key_parts <= 0):
            raise InputError(f"plan key_parts={self.key_parts!r} must be a positive integer or None")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def tile(self, width: int) -> tuple[int, int, bool, bool] | None:
        """FlashAttention 4's tile for a stored width, or None (the package's own choice)."""
        return dict(self.fa4_tiles).get(width)

    def memory_storage_dim(self, head_dim: int) -> int:
        """The head dimension a memory is stored with (zero-padded): a multiple of memory_width on GPUs (100 -> 112
        by default), of 8 elsewhere."""
        return round_up(head_dim, self.memory_width if self.on_gpu else 8)

    def local_storage_dim(self, head_dim: int) -> int:
        """The head dimension local attention pads q, k and v to: a multiple of local_width."""
        return round_up(head_dim, self.local_width)

    def replace(self, **changes: Any) -> ExecutionPlan:
        """A new plan with `changes` (field names as above; a one-line error for an unknown one)."""
        unknown = sorted(set(changes) - set(_FIELDS) - {"memory_shard"})
        if unknown:
            raise InputError(f"unknown plan field(s) {', '.join(unknown)}: choose among {', '.join(_FIELDS)}")
        if "fa4_tiles" in changes and isinstance(changes["fa4_tiles"], dict):
            changes["fa4_tiles"] = tuple(sorted(changes["fa4_tiles"].items()))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-friendly values (benchmark records)."""
        out = {name: getattr(self, name) for name in _FIELDS}
        out["fa4_tiles"] = {str(w): list(t) for w, t in self.fa4_tiles}
        out["memory_shards"] = 1 if self.memory_shard is None else self.memory_shard.world
        return out

    def __str__(self) -> str:
        return "ExecutionPlan(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionPlan) if f.name not in ("failures", "memory_shard"))
# the device is where the weights are; `weights` is what they are (the config's quantization); the memory's reading
# changes the maths, so it is the config's
_CONFIG_FIELDS = ("mem_retrieval", "mem_blocks", "mem_block_size", "mem_super_size", "mem_recent_blocks")
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExecutionPlan) if f.name in _CONFIG_FIELDS}
_USER_FIELDS = tuple(name for name in _FIELDS if name not in ("device", "weights", *_CONFIG_FIELDS))


def check_changes(changes: dict[str, Any]) -> None:
    """Raise a one-line InputError if `changes` name a field users may not set or hold a bad value."""
    if "weights" in changes:
        raise InputError(
            "the plan's weights are what the model holds: quantize it (quantization='int8'|'int4' when loading, "
            "--quantize) instead of setting them"
        )
    config_fields = sorted(set(changes) & set(_CONFIG_FIELDS))
    if config_fields:
        raise InputError(
            f"{', '.join(config_fields)} change what the model computes: set them in the config (or when loading, "
            "--mem-retrieval / --mem-blocks / --mem-recent-blocks) instead of the plan"
        )
    if "memory_shard" in changes:
        raise InputError("the memory's shards are set by model.shard_memory(group), not as a plan change")
    if "device" in changes:
        raise InputError(
            "the plan's device is where the model's weights are: move the model (model.to(device)) "
            "instead of setting it"
        )
    ExecutionPlan().replace(**changes)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_of(config, device: torch.device) -> str:
    """The config's attention choice on `device`: `torch_attention` (the reference's flag) selects SDPA; "auto"
    means the exact path on the CPU and the fast one on GPUs."""
    if config.torch_attention:
        return "sdpa"
    if config.attn_impl != "auto":
        return config.attn_impl
    return "fast" if device.type == "cuda" else "eager"


def config_choices(config) -> dict[str, Any]:
    """The plan fields the config decides (the memory's reading: they change the maths), read from `config`, the
    plan's defaults for a config older than one of them."""
    return {name: getattr(config, name, default) for name, default in _CONFIG_DEFAULTS.items()}


def build_plan(config, device: torch.device | str, **overrides: Any) -> ExecutionPlan:
    """The plan for a model of `config` on `device`: the config's choices resolved for the device, FlashAttention
    4 for memory attention where it is installed and serves this GPU, then `overrides` (ExecutionPlan fields)."""
    device = torch.device(device)
    if device.type == "cuda":  # before anything compiles: the compilers read their cache folders then
        from longllama import caches

        caches.configure()
    setting = getattr(config, "compile_elementwise", "auto")
    quantization = getattr(config, "quantization", "none")
    plan = ExecutionPlan(
        device=str(device),
        attention=attention_of(config, device),
        compile=setting is True,
        weights="dense" if quantization == "none" else quantization,
        **config_choices(config),
    )
    if device.type == "cuda":
        from longllama import timings
        from longllama.fast import flash4

        with timings.timed("setup", "CUDA start-up and the FlashAttention 4 check"):
            fa4 = flash4.installed_for(device)
        if fa4:
            plan = plan.replace(memory_kernel="fa4")
    return plan.replace(**overrides) if overrides else plan


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (the command line's --plan) as plan field values: integers, true/false, none, or text."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or key not in _USER_FIELDS or key == "fa4_tiles":
            raise InputError(
                f"--plan {item!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(f for f in _USER_FIELDS if f != 'fa4_tiles')}"
            )
        low = raw.strip().lower()
        value: Any = raw
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        elif low.lstrip("-").isdigit():
            value = int(low)
        out[key] = value
    return out
