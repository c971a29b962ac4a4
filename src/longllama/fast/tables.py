"""Measured kernel configurations per GPU: what the autotuner (benchmarks/bench_inference.py) or a sweep
(benchmarks/tune_decode.py) chose there. A key found here compiles only that configuration (kernels.autotune),
which saves the minutes of tuning a fresh machine would spend; keys and GPUs not listed are tuned as usual. The
records are cited in benchmarks/RESULTS.md.
"""

from __future__ import annotations

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
