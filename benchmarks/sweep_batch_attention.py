"""Decoding attention of a batch of independent sequences (fast/batch_decode.py), 3B shape, bf16, one GPU: the
partials kernel's configurations (BLOCK_N, num_warps, num_stages) and chunk sizes swept over the two kinds of launch
a batch step makes, with the L2 cache flushed before each call:
- one row's memory of `--memory-tokens` keys, rows 112 wide (each row's memory is a launch of its own);
- the local caches of `--rows` rows, `--slots` slots 104 wide, each row's own slots from a random first one (between
  100 and 1000) to the current slot 1100, as rows that joined at different times hold them.
Prints the best configurations of each, the rule's (tables.decode_attention_rule) and the best per chunk size.
Then `--rows` rows' memories (each its own buffer, as a batch's rows hold them) read in one launch over a table of
the rows (decode_attention.rows_table), swept the same way (its rule: tables.decode_attention_rows_rule); and the
whole attention of a memory layer's batch step (decode_attention.attend: local caches and memories, partials and
merge) with that one launch against a launch per row's memory, side by side.

    cd benchmarks && python sweep_batch_attention.py
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from tune_decode import flushed_ms

from longllama.fast import decode_attention, decode_kernels, tables

H, D = 32, 100  # the 3B shape's heads and head_dim
CONFIGS = [(n, w, s) for n in (16, 32, 64) for w in (1, 2, 4) for s in (1, 2, 3)]


def sweep(name: str, rows: int, n: int, width: int, local: bool, chunks, first_slots, slot: int, scratch) -> None:
    """Time every configuration and chunk of one launch over keys and values (rows, H, n, width)."""
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
        acc, m, lsum = _partial_results(rows, count)
        args = (q, keys, values, acc, m, lsum, current, lo, n, 0, count, H, 1, q.stride(0), q.stride(1),
                keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), 1.4426950408889634 / math.sqrt(D),
                chunk, D, m, m, 0, 0, m)  # fmt: skip
        constants = dict(S_KN=keys.stride(2), S_VN=values.stride(2), D_READ=read, FROM_PTR=local, HAS_LO=local,
                         BLOCK_D=128)  # fmt: skip
        rule = tables.decode_attention_rule(dict(chunk=chunk, D=D, D_READ=read), {}, "torch.bfloat16")
        _time_configs(name, results, chunk, rule, (rows * H, count), args, constants, scratch)
    _report(name, gbytes, results, chunks)


def _partial_results(rows: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's outputs (weighted values, maxima, sums) for rows x H programs' rows of `count` chunks."""
    m = torch.empty(rows * H, count, dtype=torch.float32, device="cuda")
    return torch.empty(rows * H, count, 128, dtype=torch.float32, device="cuda"), m, torch.empty_like(m)


def _time_configs(name, results: list, chunk: int, rule, grid, args, constants, scratch) -> None:
    """Append (us, chunk, BLOCK_N, warps, stages, is the rule's) for every configuration of one launch."""
    fn = decode_kernels.partials.fn  # the kernel without the configuration choice
    meta, warps, stages = rule
    rule = (meta["BLOCK_N"], warps, stages or 1)
    for block_n, w, s in CONFIGS:

        def call(block_n=block_n, w=w, s=s):
            fn[grid](*args, **constants, BLOCK_N=block_n, num_warps=w, num_stages=s)

        try:
            us = flushed_ms(call, scratch) * 1e3
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or launch
            print(f"{name} chunk {chunk} {block_n}/{w}/{s}: failed ({type(exc).__name__})")
            continue
        results.append((us, chunk, block_n, w, s, (block_n, w, s) == rule))


def _report(name: str, gbytes: float, results: list, chunks) -> None:
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


def _row_memories(rows: int, n: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rows memories of n keys, each the first n entries of its own (1, H, n + 512, width) buffer."""
    out = []
    for _ in range(rows):
        k, v = (torch.randn(1, H, n + 512, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out.append((k[:, :, :n], v[:, :, :n]))
    return out


def sweep_rows(rows: int, n: int, memories, scratch) -> None:
    """Time every configuration and chunk of the one launch over `rows` rows' memories (ROWS)."""
    name, chunks = f"{rows} rows' memories of {n // 1024}k in one launch", (128, 256, 512, 1024, 2048)
    q = torch.randn(rows, H, D, device="cuda", dtype=torch.bfloat16)
    table = decode_attention.rows_table(memories, q.device)
    k0, v0 = memories[0]
    read = min(k0.shape[-1], 16 * math.ceil(D / 16))
    gbytes = rows * n * H * 2 * read * 2 / 1e9
    results = []
    for chunk in chunks:
        count = -(-n // chunk)
        acc, m, lsum = _partial_results(rows, count)
        args = (q, k0, v0, acc, m, lsum, m, m, 0, 0, count, H, 1, q.stride(0), q.stride(1),
                0, 0, 0, 0, 1.4426950408889634 / math.sqrt(D), chunk, D, m, m, 0, 0, table)  # fmt: skip
        constants = dict(S_KN=k0.stride(2), S_VN=v0.stride(2), D_READ=read, FROM_PTR=False, HAS_LO=False,
                         BLOCK_D=128, ROWS=True)  # fmt: skip
        rule = tables.decode_attention_rows_rule(dict(chunk=chunk, D=D, D_READ=read), {}, "torch.bfloat16")
        _time_configs(name, results, chunk, rule, (rows * H, count), args, constants, scratch)
    _report(name, gbytes, results, chunks)


def compare_attend(rows: int, n: int, slots: int, memories, first_slots, scratch) -> None:
    """decode_attention.attend of a memory layer's batch step: one launch for the memories against one per row."""
    q = torch.randn(rows, H, D, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(rows, H, slots, 104, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slot = torch.tensor([1100], device="cuda")
    lo = torch.tensor(first_slots, device="cuda", dtype=torch.long)
    table = decode_attention.rows_table(memories, q.device)
    outs = {}
    for name, t in [("a launch per row", None), ("one launch", table)] * 2:

        def call(t=t, name=name):
            outs[name] = decode_attention.attend(q, keys, values, slot, lo=lo, row_memories=memories, row_table=t)

        us = flushed_ms(call, scratch) * 1e3
        print(f"attend, {rows} rows, local caches and {n // 1024}k memories each, {name}: {us:.1f} us", flush=True)
    diff = (outs["one launch"].float() - outs["a launch per row"].float()).abs().max().item()
    print(f"  largest difference between the two: {diff:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--slots", type=int, default=1280, help="local buffer slots (the 3B shape's window + spare)")
    ap.add_argument("--parts", default="memory,local,rows", help="which of memory, local, rows to run")
    args = ap.parse_args()
    parts = args.parts.split(",")
    print(torch.cuda.get_device_name(), torch.__version__)
    scratch = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    random.seed(0)
    n = args.memory_tokens
    if "memory" in parts:
        sweep(f"memory {n // 1024}k, 1 row", 1, n, 112, False, [128, 256, 512, 1024], [0], 0, scratch)
    first = [random.randint(100, 1000) for _ in range(args.rows)]
    if "local" in parts:
        name = f"local {args.rows} rows, {args.slots} slots, 100..1000 used"
        sweep(name, args.rows, args.slots, 104, True, [64, 128, 256], first, 1100, scratch)
    if "rows" in parts:
        memories = _row_memories(args.rows, n, 112)
        compare_attend(args.rows, n, args.slots, memories, first, scratch)
        sweep_rows(args.rows, n, memories, scratch)


if __name__ == "__main__":
    main()
