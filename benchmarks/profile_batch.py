"""Where a batched decoding step's time goes (BatchGenerator, 3B shape, random bf16 weights, one GPU): steps of k
rows over k different memories, timed with and without the host (graph replay alone), and the heaviest kernels of a
few steps under torch's profiler.

    PYTHONPATH=src python benchmarks/profile_batch.py --rows 1,8 --memory-tokens 16384
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_inference import _longllama
from torch.profiler import ProfilerActivity, profile

from longllama.batch import BatchGenerator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--memory-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    model = _longllama(args.shape, "cuda")
    vocab = model.config.vocab_size
    rows = [int(k) for k in args.rows.split(",")]
    caches = []
    with torch.no_grad():
        for _ in range(max(rows)):
            ids = torch.randint(3, vocab, (1, args.memory_tokens), device="cuda")
            caches.append(model(ids, use_cache=True, last_context_length=model.config.context_window).cache)
    for k in rows:
        engine = BatchGenerator(model, max_rows=k)
        with torch.no_grad():
            for i in range(k):
                engine.add(torch.randint(3, vocab, (32,)).tolist(), cache=caches[i], max_new_tokens=10**6)
            for _ in range(4):
                engine.step()  # capture
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            step_ms = (time.perf_counter() - start) / args.steps * 1e3
            decoder = engine._decoder
            start = time.perf_counter()
            for _ in range(args.steps):
                decoder.graph.replay()
            torch.cuda.synchronize()
            replay_ms = (time.perf_counter() - start) / args.steps * 1e3
            print(f"{k} rows: step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} ms", flush=True)
            decoder.graphs, decoder.graph = False, None  # eager steps, so the profiler sees every kernel
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
        engine.drop(list(engine._streams))


if __name__ == "__main__":
    main()
