"""Decoding attention of a batch of independent sequences (fast/batch_decode.py), 3B shape, bf16, one GPU: the
partials kernel's configurations (BLOCK_N, num_warps, num_stages) and chunk sizes swept over the two kinds of launch
a batch step makes, with the L2 cache flushed before each call:
- one row's memory of `--memory-tokens` keys, rows 112 wide (each row's memory is a launch of its own);
- the local caches of `--rows` rows, `--slots` slots 104 wide, each row's own slots from a random first one (between
  100 and 1000) to the current slot 1100, as rows that joined at different times hold them.
Prints the best configurations of each, the rule's (tables.decode_attention_rule) and the best per chunk size.

    cd benchmarks && python sweep_batch_attention.py
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from tune_decode import flushed_ms

from longllama.fast import decode_kernels, tables

H, D = 32, 100  # the 3B shape's heads and head_dim
CONFIGS = [(n, w, s) for n in (16, 32, 64) for w in (1, 2, 4) for s in (1, 2, 3)]


def sweep(name: str, rows: int, n: int, width: int, local: bool, chunks, first_slots, slot: int, scratch) -> None:
    """Time every configuration and chunk of one launch over keys and values (rows, H, n, width)."""
    fn = decode_kernels.partials.fn  # the kernel without the configuration choice
    q = torch.randn(rows, H, D, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(rows, H, n, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    current = torch.tensor([slot], device="cuda")
    lo = torch.tensor(first_slots, device="cuda", dtype=torch.long)
    read = min(width, 16 * math.ceil(D / 16))
    used = sum(slot + 1 - f for f in first_slots) if local else rows * n
    gbytes = used * H * 2 * read * 2 / 1e9
    results = []
    for chunk in chunks:
        count = -(-n // chunk)
        acc = torch.empty(rows * H, count, 128, dtype=torch.float32, device="cuda")
        m = torch.empty(rows * H, count, dtype=torch.float32, device="cuda")
        lsum = torch.empty_like(m)
        args = (q, keys, values, acc, m, lsum, current, lo, n, 0, count, H, 1, q.stride(0), q.stride(1),
                keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), 1.4426950408889634 / math.sqrt(D),
                chunk, D, m, m, 0, 0)  # fmt: skip
        constants = dict(S_KN=keys.stride(2), S_VN=values.stride(2), D_READ=read, FROM_PTR=local, HAS_LO=local,
                         BLOCK_D=128)  # fmt: skip
        meta, warps, stages = tables.decode_attention_rule(dict(chunk=chunk, D=D, D_READ=read), {}, "torch.bfloat16")
        rule = (meta["BLOCK_N"], warps, stages or 1)
        for block_n, w, s in CONFIGS:

            def call(block_n=block_n, w=w, s=s):
                fn[(rows * H, count)](*args, **constants, BLOCK_N=block_n, num_warps=w, num_stages=s)

            try:
                us = flushed_ms(call, scratch) * 1e3
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or launch
                print(f"{name} chunk {chunk} {block_n}/{w}/{s}: failed ({type(exc).__name__})")
                continue
            results.append((us, chunk, block_n, w, s, (block_n, w, s) == rule))
    results.sort()

    def line(r):
        rule = " (rule)" if r[5] else ""
        config = f"chunk {r[1]} BLOCK_N {r[2]} warps {r[3]} stages {r[4]}{rule}"
        return f"{r[0]:7.1f} us {gbytes / r[0] * 1e6:6.0f} GB/s {config}"

    print(f"== {name}: {gbytes * 1e3:.0f} MB read")
    for r in results[:8]:
        print(f"  {line(r)}")
    for r in results:
        if r[5]:
            print(f"  rule: {line(r)}")
    for chunk in chunks:
        best = min((r for r in results if r[1] == chunk), default=None)
        if best:
            print(f"  best at chunk {chunk}: {best[0]:.1f} us (BLOCK_N {best[2]} warps {best[3]} stages {best[4]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--slots", type=int, default=1280, help="local buffer slots (the 3B shape's window + spare)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    scratch = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    random.seed(0)
    n = args.memory_tokens
    sweep(f"memory {n // 1024}k, 1 row", 1, n, 112, False, [128, 256, 512, 1024], [0], 0, scratch)
    first = [random.randint(100, 1000) for _ in range(args.rows)]
    name = f"local {args.rows} rows, {args.slots} slots, 100..1000 used"
    sweep(name, args.rows, args.slots, 104, True, [64, 128, 256], first, 1100, scratch)


if __name__ == "__main__":
    main()
