"""Measured kernel configurations per GPU: what the autotuner (benchmarks/bench_inference.py, `longllama tune`) or
a sweep (benchmarks/tune_decode.py) chose there, and the rule that picks a configuration for any other key or GPU
without timing anything (kernels.Kernel.choose: a table `longllama tune` wrote on this GPU first, then these, then
the rule). The records are cited in benchmarks/RESULTS.md.

Besides the H100 entries written out below, `longllama tune` files for other GPUs ship in measured/ (the format of
fast/tuning.py) and are merged into the same tables.
"""

from __future__ import annotations

from pathlib import Path

_H100 = "NVIDIA H100 80GB HBM3"

# Decoding attention (decode_attention.py): the partials kernel's configurations (BLOCK_N, num_warps), at least 8
# elements of a 128-wide tile per thread.
DECODE_ATTENTION_CHOICES = [(n, w) for n in (16, 32, 64, 128) for w in (1, 2, 4, 8, 16) if n * 128 // (32 * w) >= 8]
# (BLOCK_N, num_warps, num_stages) per (chunk, head_dim, row width read), H100: the 3B model's from a sweep with the
# L2 cache flushed (local slots in chunks of 64 keys, rows 104 wide; memories of 32k and 256k keys in chunks of 256
# and 2048, rows 112 wide), Code 7B's from the autotuner (rows 128 wide).
DECODE_ATTENTION = {
    (_H100, "torch.bfloat16", chunk, d, width): ({"BLOCK_N": n}, w, stages)
    for chunk, d, width, n, w, stages in [
        (64, 100, 104, 16, 2, 1),
        (256, 100, 112, 32, 1, 1),
        (2048, 100, 112, 32, 1, 3),
        (64, 128, 128, 16, 2, 1),
        (256, 128, 128, 32, 1, 3),
    ]
}


# The same kernel launched once over a batch's rows, each row reading its own memory (ROWS, batch_decode.py): H100,
# from sweep_batch_attention.py (8 rows' memories of 16k keys, rows 112 wide, L2 flushed): 640 us (2.93 TB/s)
# against 790 us with the one-row launches' choice (32-key tiles on one warp) at the same chunk.
DECODE_ATTENTION_ROWS = {
    (_H100, "torch.bfloat16", chunk, d, width): ({"BLOCK_N": n}, w, stages)
    for chunk, d, width, n, w, stages in [
        (512, 100, 112, 32, 2, 2),
        (1024, 100, 112, 16, 1, 2),
    ]
}


def _gemv(rows):
    return {
        (_H100, "torch.bfloat16", n, k, 1, norm): ({"BLOCK_N": bn, "BLOCK_K": bk}, w) for n, k, norm, bn, bk, w in rows
    }


# Matrix-vector products of a decoding step, batch 1, keys (N, K, M, NORM), H100: the autotuner's choices for the
# 3B model and Code 7B (Code 7B's first decoding spent 213 s tuning without them). Repeated runs chose differently
# for some shapes, so the top configurations are close.
GEMV = _gemv(
    [
        (9600, 3200, True, 4, 1024, 4),
        (3200, 3200, False, 1, 256, 4),
        (3200, 8640, False, 2, 512, 2),
        (32000, 3200, True, 4, 1024, 4),
        (12288, 4096, True, 4, 512, 2),
        (4096, 4096, False, 8, 1024, 4),
        (4096, 11008, False, 1, 512, 4),
        (32016, 4096, True, 4, 1024, 8),
    ]
)
GEMV_SWIGLU = _gemv([(8640, 3200, True, 1, 256, 2), (11008, 4096, True, 1, 1024, 8)])
# The same products on int4 weights (gemv_int4_kernels.py), keys (N, K, M, NORM, G): none measured yet.
GEMV_INT4: dict = {}
GEMV_INT4_SWIGLU: dict = {}


def _shipped_files() -> None:
    """Merge the tables in measured/*.json (written by `longllama tune` on those GPUs) into the dicts above."""
    from longllama.fast import tuning

    into = {
        "gemv": GEMV,
        "gemv_swiglu": GEMV_SWIGLU,
        "gemv_int4": GEMV_INT4,
        "gemv_int4_swiglu": GEMV_INT4_SWIGLU,
        "decode_attention": DECODE_ATTENTION,
        "decode_attention_rows": DECODE_ATTENTION_ROWS,
    }
    for path in sorted((Path(__file__).parent / "measured").glob("*.json")):
        device = _device_of(path)
        for name, entries in tuning.read(path).items():
            if name in into and device:
                for key, choice in entries.items():
                    into[name].setdefault((device, *key), choice)


def _device_of(path: Path) -> str | None:
    import json

    try:
        return json.loads(path.read_text()).get("device")
    except (OSError, ValueError):
        return None


_shipped_files()


# The rule: a configuration for a key without a measured one on this GPU, from the shapes alone; valid on any CUDA GPU
# (tiles of at most 8192 fp32 elements per program, no more shared memory than an Ampere or Ada SM has). A key
# measured on another GPU takes that GPU's choice (the H100's first): the same shapes stream the same bytes.


def _same_shape(shipped: dict, dtype: str | None, values: tuple):
    found = [(device, choice) for (device, d, *key), choice in shipped.items() if d == dtype and tuple(key) == values]
    found.sort(key=lambda item: item[0] != _H100)
    if not found:
        return None
    meta, warps, *stages = found[0][1]
    return dict(meta), warps, (stages[0] if stages else None)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def gemv_rule(key: dict, shipped: dict, dtype: str | None, *, swiglu: bool = False) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the matrix-vector kernels for key {N, K, M, NORM}: BLOCK_N output rows per
    program so that there are a few thousand programs (the weights' rows spread evenly over the SMs; two weights per
    row in the SwiGLU kernel: one row), BLOCK_K a power of two <= 1024 and at most K rounded up, 2-4 warps."""
    same = _same_shape(shipped, dtype, tuple(key[k] for k in ("N", "K", "M", "NORM")))
    if same is not None:
        return same
    n, k = int(key["N"]), int(key["K"])
    block_n = 1 if swiglu else max(1, min(4, _pow2_at_most(n // 2400)))
    block_k = 1024 if block_n >= 4 else (512 if k > 8192 else 256)
    block_k = max(16, min(block_k, 1 << max(k - 1, 1).bit_length()))
    warps = 4 if block_n * block_k >= 1024 else 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k}, warps, None


def gemv_swiglu_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    return gemv_rule(key, shipped, dtype, swiglu=True)


def gemv_rows_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the several-row kernels for key {N, K, M}, as Triton's autotuner chose on an
    H100 for the 3B shape's products at 8 rows (benchmarks/HISTORY.md, "Eight rows a step"): 32 output rows per
    program, 16 where K is long (the down projection), 64 on wide outputs (lm_head); K steps 256 wide on outputs of up
    to 4096 rows, 128 on wider ones; 4 warps; loads pipelined over 4 stages (3 on wide outputs)."""
    n, k = int(key["N"]), int(key["K"])
    block_n = 64 if n >= 16384 else (16 if k > 4096 else 32)
    return {"BLOCK_N": block_n, "BLOCK_K": 256 if n <= 4096 else 128}, 4, 3 if n >= 16384 else 4


def gemv_int4_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the int4 matrix-vector kernels for key {N, K, M, NORM, G}, as Triton's
    autotuner chose over the kernels' 42 configurations on an H100 for the 3B shape's products (benchmarks/
    RESULTS.md, "Quantized weights"): one output row per program (the SwiGLU kernel too), 128-byte steps (256
    columns) on 2 warps for the wide outputs (q/k/v, gate/up), 256-byte steps on 4 warps for the 3200-row ones;
    never under half a group (a step covers whole groups) nor over K's bytes."""
    same = _same_shape(shipped, dtype, tuple(key[k] for k in ("N", "K", "M", "NORM", "G")))
    if same is not None:
        return same
    n, k, g = int(key["N"]), int(key["K"]), int(key["G"])
    block_kb = 256 if n <= 4096 else 128
    block_kb = max(g // 2, 16, min(block_kb, 1 << max(k // 2 - 1, 1).bit_length()))
    return {"BLOCK_N": 1, "BLOCK_KB": block_kb}, 4 if block_kb >= 256 else 2, None


def gemv_int4_rows_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the several-row int4 kernels: 16 output rows per program, 32 on wide outputs;
    128 columns (64 bytes) per step over 4 stages."""
    block_n = 32 if int(key["N"]) >= 16384 else 16
    return {"BLOCK_N": block_n, "BLOCK_KB": 64}, 4, 4


def dequantize_int4_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the int4 dequantizing pass for key {N, K, G}: tiles of 16 rows x 256
    columns (128 bytes; at least half a group), 4 warps (32 outputs per thread)."""
    return {"BLOCK_N": 16, "BLOCK_KB": max(128, int(key["G"]) // 2)}, 4, None


def decode_attention_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """(meta, num_warps, num_stages) of the decoding attention's partials kernel for key {chunk, D, D_READ}, as the
    H100 sweep chose: 16-key tiles on two warps for the local cache's 64-key chunks, 32-key tiles on one warp
    for longer chunks (more warps for rows over 128 wide), loads pipelined over 3 stages from 1024-key chunks on."""
    same = _same_shape(shipped, dtype, tuple(key[k] for k in ("chunk", "D", "D_READ")))
    if same is not None:
        return same
    chunk, width = int(key["chunk"]), max(int(key["D"]), int(key["D_READ"]))
    block_n = 16 if chunk <= 64 else 32
    warps = (2 if block_n == 16 else 1) * max(1, (1 << max(width - 1, 1).bit_length()) // 128)
    return {"BLOCK_N": block_n}, min(warps, 8), 3 if chunk >= 1024 else 1


def decode_attention_rows_rule(key: dict, shipped: dict, dtype: str | None) -> tuple[dict, int, int | None]:
    """The partials kernel's configuration where one launch reads every row's own memory (key {chunk, D, D_READ}),
    as the H100 sweeps of 8 rows chose: 16-key tiles on one warp for 1024-key chunks, 32-key tiles on two warps for
    shorter and longer ones (2048-key chunks: 684 us against 755 with 16-key tiles; more warps for rows over 128
    wide), loads pipelined over 2 stages."""
    same = _same_shape(shipped, dtype, tuple(key[k] for k in ("chunk", "D", "D_READ")))
    if same is not None:
        return same
    chunk, width = int(key["chunk"]), max(int(key["D"]), int(key["D_READ"]))
    wide = max(1, (1 << max(width - 1, 1).bit_length()) // 128)
    if chunk == 1024:
        return {"BLOCK_N": 16}, min(wide, 8), 2
    return {"BLOCK_N": 32}, min(2 * wide, 8), 2
