"""Memory attention of one window of the shipped small model (4 heads of 64, 512 queries, bf16) over long memories
on the GPU: dense (split-KV chunks and one call), and kNN memory (top 128) with torch.topk over each chunk of scores
against the block-wise selection. Prints ms per call; checks that both selections give the same output."""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton.testing

from longllama import attention


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench(fn, warmup=3, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="65536,1048576", help="memory lengths in keys")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    h, n, d = 4, 512, 64
    scale = d ** -0.5
    card = torch.cuda.get_device_name()
    records = []
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    plain = functools.partial(attention.chunk_top_k, blockwise=False)
    blockwise = functools.partial(attention.chunk_top_k, blockwise=True)
    original = attention.chunk_top_k
    print(f"{'memory':>9s} {'path':28s} {'ms':>9s}")
    for m in (int(x) for x in args.memory.split(",")):
        k = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)

        def dense(chunk):
            attention.MEMORY_CHUNK = chunk  # m: one call; 0: automatic (split-KV when SMs would idle)
            try:
                return attention.memory_attention(q, k, v, scale=scale)
            finally:
                attention.MEMORY_CHUNK = 0

        chunks = -(-m // attention.memory_chunk(q, m))
        paths = {"dense, one call": lambda: dense(m), f"dense, split-KV ({chunks} chunks)": lambda: dense(0)}
        for name, chooser in (("kNN, torch.topk per chunk", plain), ("kNN, block-wise top k", blockwise)):
            def knn(chooser=chooser):
                attention.chunk_top_k = chooser
                try:
                    return attention.top_k_memory_attention(q, k, v, top_k=args.top_k, scale=scale)
                finally:
                    attention.chunk_top_k = original
            paths[name] = knn
        outs = {}
        for name, fn in paths.items():
            outs[name] = fn()[0]
            ms = bench(fn)
            print(f"{m:9d} {name:28s} {ms:9.3f}")
            records.append(dict(benchmark="memory-attention", path=name, memory=m, ms=round(ms, 4), queries=n,
                                heads=h, head_dim=d, top_k=args.top_k, device=card))
        split = (outs["dense, one call"] - outs[f"dense, split-KV ({chunks} chunks)"]).abs().max().item()
        print(f"{m:9d} dense outputs, max |difference| one call vs split-KV: {split:.2e}")
        diff = (outs["kNN, torch.topk per chunk"] - outs["kNN, block-wise top k"]).abs().max().item()
        print(f"{m:9d} kNN outputs, max |difference| of the two selections: {diff:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
