"""Memory attention of one window of the shipped small model (4 heads of 64, 512 queries, bf16) over long memories
on the GPU: dense in one call and split into chunks of keys (split-KV, --chunk keys each), and kNN memory (top 128,
torch.topk over chunks of scores). Prints ms per call and the difference between the two dense paths.
(Commit ca6c7f4 also compared a block-wise top-k selection: slower, removed.)"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--chunk", type=int, default=32768, help="keys per chunk of the split-KV path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    h, n, d = 4, 512, 64
    scale = d ** -0.5
    card = torch.cuda.get_device_name()
    records = []
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    print(f"{'memory':>9s} {'path':28s} {'ms':>9s}")
    for m in (int(x) for x in args.memory.split(",")):
        k = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)

        def dense(chunk):
            attention.MEMORY_CHUNK = chunk
            try:
                return attention.memory_attention(q, k, v, scale=scale, kernel="flash")
            finally:
                attention.MEMORY_CHUNK = 0

        chunks = -(-m // min(args.chunk, m))
        split = f"dense, split-KV ({chunks} chunks)"
        paths = {"dense, one call": lambda: dense(m), split: lambda: dense(args.chunk),
                 "kNN": lambda: attention.top_k_memory_attention(q, k, v, top_k=args.top_k, scale=scale)}
        outs = {}
        for name, fn in paths.items():
            outs[name] = fn()[0]
            ms = bench(fn)
            print(f"{m:9d} {name:28s} {ms:9.3f}")
            records.append(dict(benchmark="memory-attention", path=name, memory=m, ms=round(ms, 4), queries=n,
                                heads=h, head_dim=d, top_k=args.top_k, device=card))
        diff = (outs["dense, one call"] - outs[split]).abs().max().item()
        print(f"{m:9d} dense outputs, max |difference| one call vs split-KV: {diff:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
