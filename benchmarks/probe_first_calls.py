"""What a fresh process's first 3B ingest pays in attention calls: each cuDNN / FlashAttention call of three passes
over the same 32,770 tokens, timed with a synchronisation around it (--mode percall), or the three passes' wall
times alone (--mode ab). The ingest's dry pass makes no attention call (fast/attention.partial_attention returns
zeros there); the records of benchmarks/results/h100-2026-12-07-first-calls/ were taken before that, when this
script also timed the dry pass's calls and could replace them by zeros (--skip, since removed).

    python benchmarks/probe_first_calls.py --mode percall > percall.json   # GPU; run once before to fill Triton's cache
    python benchmarks/probe_first_calls.py --mode ab

Prints one JSON object: the passes' seconds, the first matrix product's, the CUDA context's; with percall, calls and
seconds per (phase, kernel) and the 25 slowest first calls beside the same shape's time in the second pass.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from bench_inference import _longllama

from longllama.fast import attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["percall", "ab"], default="percall")
    ap.add_argument("--tokens", type=int, default=32770)
    args = ap.parse_args()

    t = time.perf_counter()
    torch.ones(1, device="cuda")
    context_s = time.perf_counter() - t
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    (a @ a).sum().item()
    first_matmul_s = time.perf_counter() - t
    model = _longllama("3b", "cuda")
    records, phase = [], ["real1"]
    original = attention._cuda_partial

    def timed(q, k, v, causal, scale, kernel):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(q, k, v, causal, scale, kernel)
        torch.cuda.synchronize()
        name = attention.resolve_kernel(q, kernel) if q.dtype != torch.float32 else "efficient"
        records.append((phase[0], name, tuple(q.shape), tuple(k.shape), causal, time.perf_counter() - start))
        return out

    if args.mode == "percall":
        attention._cuda_partial = timed  # this process only: the probe's instrument
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).cuda()

    def ingest() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    passes = []
    for name in ("real1", "real2", "real3"):
        phase[0] = name
        passes.append(ingest())
    out = dict(
        mode=args.mode,
        device=torch.cuda.get_device_name(),
        ctx_s=context_s,
        first_matmul_s=first_matmul_s,
        pass1_s=passes[0],
        pass2_s=passes[1],
        pass3_s=passes[2],
    )
    if records:
        totals, shapes = defaultdict(lambda: [0, 0.0]), defaultdict(set)
        for where, name, qs, ks, causal, seconds in records:
            totals[(where, name)][0] += 1
            totals[(where, name)][1] += seconds
            shapes[(where, name)].add((qs, ks, causal))
        out["by_phase"] = {
            f"{w} {n}": dict(calls=c, seconds=round(s, 4), shapes=len(shapes[(w, n)]))
            for (w, n), (c, s) in totals.items()
        }
        second = {(qs, ks, c): s for w, _, qs, ks, c, s in records if w == "real2"}
        firsts = sorted(((s, n, qs, ks, c) for w, n, qs, ks, c, s in records if w == "real1"), reverse=True)[:25]
        out["slowest_first"] = [
            dict(s=round(s, 4), kernel=n, q=qs, k=ks, causal=c, second=round(second.get((qs, ks, c), -1), 4))
            for s, n, qs, ks, c in firsts
        ]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
