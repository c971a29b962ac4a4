"""Where a decoding step's time goes under block retrieval: one memory layer of the 3B shape (32 heads of 100, a
memory of --tokens random bf16 keys, blocks of 64), each part of the step captured as a CUDA graph and replayed, so
the numbers are GPU time without launch costs (as the static decoder runs them).

Parts, for each budget of --blocks blocks: the choice (retrieval.choose with PyTorch's bounds, with the bounds
kernel of fast/block_attention, and with --super-size the two-level choice), the choice and gather of a step as
it was ("before": PyTorch's bounds, blocks gathered by indexing three dimensions) and as step_blocks makes it on
the kernels' path ("now": the step's bounds kernel and the gather kernel of fast/block_attention.py), the decoding
kernel over the gathered blocks and the local slots, and the whole memory layer's step both ways (and the decoding
kernel over the local slots alone). Prints one JSON object (milliseconds per call; whether both ways gathered the
same keys); --profile adds the CUDA kernels of one eager step (blocks 64, now).

    python benchmarks/probe_decode_blocks.py --tokens 1048576 > probe.json     # GPU
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from longllama import retrieval
from longllama.attention import kernel_head_dim
from longllama.fast import decode_attention
from longllama.fast.block_attention import best_bounds, gather_blocks
from longllama.memory import MemoryCache
from longllama.retrieval import BlockChoice


def replay_ms(fn, reps: int = 50) -> float:
    """Mean milliseconds of fn() replayed as a CUDA graph (captured after two eager warm-up calls)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 256])
    ap.add_argument("--super-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=2048, help="local slots in use")
    ap.add_argument(
        "--width",
        type=int,
        default=112,
        help="the memory's stored row width (112: the plan's on GPUs for head_dim 100)",
    )
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    heads, d, block = 32, 100, 64
    width = max(args.width, kernel_head_dim(d))
    dev = "cuda"
    torch.manual_seed(0)
    memory = MemoryCache(1, heads, d, dtype=torch.bfloat16, device=dev, storage_dim=width)
    memory.track_blocks(block, dev)
    memory.reserve(args.tokens)
    for start in range(0, args.tokens, 1 << 16):
        n = min(1 << 16, args.tokens - start)
        memory.append(
            torch.randn(1, heads, n, d, device=dev, dtype=torch.bfloat16),
            torch.randn(1, heads, n, d, device=dev, dtype=torch.bfloat16),
        )
    q = torch.randn(1, heads, d, device=dev, dtype=torch.bfloat16)
    local = [torch.zeros(1, heads, args.window, kernel_head_dim(d), device=dev, dtype=torch.bfloat16) for _ in range(2)]
    for t in local:
        t[..., :d].normal_()
    slot = torch.tensor([args.window - 1], device=dev)
    out: dict = {"tokens": args.tokens, "window": args.window, "width": width, "device": torch.cuda.get_device_name()}
    out["ms"] = {}
    ms = out["ms"]

    ms["attend local only"] = replay_ms(lambda: decode_attention.attend(q, *local, slot))

    def before(blocks: int):
        """The step as it was: PyTorch's bounds, then the blocks gathered by indexing three dimensions."""
        _, chosen, _ = retrieval.choose(q[:, :, None], memory, BlockChoice(blocks, block))
        tokens = retrieval._block_tokens(chosen, block)
        return tuple(retrieval._take(t, tokens) for t in memory.padded())

    def now(blocks: int):
        return retrieval.step_blocks(q, memory, BlockChoice(blocks, block), best_bounds, gather_blocks)[0]

    for blocks in args.blocks:
        ms[f"choose {blocks} PyTorch bounds"] = replay_ms(
            lambda: retrieval.choose(q[:, :, None], memory, BlockChoice(blocks, block))
        )
        ms[f"choose {blocks} bounds kernel"] = replay_ms(
            lambda: retrieval.choose(q[:, :, None], memory, BlockChoice(blocks, block), bounds=best_bounds)
        )
        if args.super_size and retrieval.two_level(args.super_size, blocks, args.tokens // block):
            ms[f"choose {blocks} two-level {args.super_size} bounds kernel"] = replay_ms(
                lambda: retrieval.choose(
                    q[:, :, None], memory, BlockChoice(blocks, block, args.super_size), bounds=best_bounds
                )
            )
        ms[f"step before {blocks}"] = replay_ms(lambda: before(blocks))
        ms[f"step now {blocks}"] = replay_ms(lambda: now(blocks))
        old, new = before(blocks), now(blocks)
        out.setdefault("same_blocks_read", {})[blocks] = bool(
            torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
        )
        ms[f"attend gathered {blocks}"] = replay_ms(lambda: decode_attention.attend(q, *local, slot, new))
        ms[f"whole before {blocks}"] = replay_ms(lambda: decode_attention.attend(q, *local, slot, before(blocks)))
        ms[f"whole now {blocks}"] = replay_ms(lambda: decode_attention.attend(q, *local, slot, now(blocks)))
    kmax, kmin, _ = memory.summaries(block, dev)
    ms["read summaries (sum of kmax, kmin)"] = replay_ms(lambda: kmax.sum() + kmin.sum())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        def whole_64():
            return decode_attention.attend(q, *local, slot, now(64))

        whole_64()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                whole_64()
            torch.cuda.synchronize()
        kernels: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels[e.name[:120]] += e.device_time_total / 10 / 1e3
        out["profile_ms_per_step"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:25])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
