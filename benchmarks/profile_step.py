"""Where the time goes: torch.profiler tables of an ingest (3B shape, bf16) and of decode steps."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_inference import _longllama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    model = _longllama("3b", "cuda")
    ids = torch.randint(3, 32000, (1, args.tokens), device="cuda")
    with torch.no_grad():
        model(ids[:, :4096], use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    print(f"== ingest {args.tokens}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    model.generate(ids[:, :8192], max_new_tokens=2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids[:, :8192], max_new_tokens=1 + args.decode_tokens)
        torch.cuda.synchronize()
    print(f"== generate after 8192, {args.decode_tokens} steps")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
