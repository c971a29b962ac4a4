"""Where a batched decoding step's time goes (BatchGenerator, 3B shape, random bf16 weights, one GPU): steps of k
rows over k different memories, timed with the host (engine.step: Python, sampling, recaptures) and without it
(graph replay alone), for each matrix-vector row limit of --gemv-rows (the plan's gemv_max_rows: products of more
rows go to cuBLAS); then the heaviest kernels of a few eager steps at the most rows under torch's profiler, and the
time to read k 32-token prompts together (BatchGenerator.admit) with the rows' first layout, once more under the
profiler. Each memory keeps --local-tokens tokens local (default: the model's last_context_length, as a
DocumentMemory does).

    PYTHONPATH=src python benchmarks/profile_batch.py --rows 1,2,4,8 --gemv-rows 4,8 --memory-tokens 16384
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from bench_inference import _longllama
from torch.profiler import ProfilerActivity, profile

from longllama.batch import BatchGenerator


def _steps(engine: BatchGenerator, steps: int) -> tuple[float, float, int]:
    """(ms per engine.step, ms per graph replay alone, graph captures during the timed steps)."""
    decoder = engine._decoder
    captures = [0]
    capture = decoder._capture

    def counted() -> None:
        captures[0] += 1
        capture()

    decoder._capture = counted
    for _ in range(4):
        engine.step()  # capture
    captures[0] = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    start = time.perf_counter()
    for _ in range(steps):
        decoder.graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - start) / steps * 1e3
    del decoder._capture
    return step_ms, replay_ms, captures[0]


def _admit(engine: BatchGenerator, profiled: bool) -> float:
    """ms of reading the queued prompts (engine.admit) and laying the rows out (the first step's start)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) if profiled else nullcontext() as prof:
        engine.admit()
        engine._decoder._laid_out()
        torch.cuda.synchronize()
    spent = (time.perf_counter() - start) * 1e3
    if profiled:
        print("reading the prompts (profiled):", flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3b")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--gemv-rows", default="4", help="plan gemv_max_rows values to compare")
    ap.add_argument("--memory-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument(
        "--local-tokens",
        type=int,
        default=None,
        help="tokens each memory keeps local (default: the model's last_context_length, as a DocumentMemory)",
    )
    args = ap.parse_args()
    model = _longllama(args.shape, "cuda")
    vocab = model.config.vocab_size
    rows = [int(k) for k in args.rows.split(",")]
    caches = []
    with torch.no_grad():
        for _ in range(max(rows)):
            ids = torch.randint(3, vocab, (1, args.memory_tokens), device="cuda")
            local = args.local_tokens or model.config.last_context_length
            caches.append(model(ids, use_cache=True, last_context_length=local).cache)
    for gemv_rows in [int(g) for g in args.gemv_rows.split(",")]:
        model.model.set_plan(gemv_max_rows=gemv_rows)
        for k in rows:
            engine = BatchGenerator(model, max_rows=k)
            with torch.no_grad():
                for i in range(k):
                    engine.add(torch.randint(3, vocab, (32,)).tolist(), cache=caches[i], max_new_tokens=10**6)
                ms = _admit(engine, profiled=False)
                print(f"{k} rows: reading their 32-token prompts together and laying the rows out {ms:.1f} ms")
                step_ms, replay_ms, captures = _steps(engine, args.steps)
                print(
                    f"gemv_max_rows {gemv_rows}, {k} rows: step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} "
                    f"ms, {captures} captures in {args.steps} steps, {k / step_ms * 1e3:.0f} tokens/s",
                    flush=True,
                )
                if k == max(rows):
                    decoder = engine._decoder
                    decoder.graphs, decoder.graph = False, None  # eager steps: the profiler sees every kernel
                    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        for _ in range(3):
                            engine.step()
                        torch.cuda.synchronize()
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16), flush=True)
                    for profiled in (False, True):  # the prompts' reading again, warm, then under the profiler
                        engine.drop(list(engine._streams))
                        for i in range(k):
                            engine.add(torch.randint(3, vocab, (32,)).tolist(), cache=caches[i], max_new_tokens=8)
                        ms = _admit(engine, profiled=profiled)
                        print(f"{k} rows again: reading the prompts and laying the rows out {ms:.1f} ms", flush=True)
            engine.drop(list(engine._streams))


if __name__ == "__main__":
    main()
