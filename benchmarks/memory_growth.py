"""Memory grows linearly with the context: a tiny LongLLaMA reads 4k..64k tokens on the CPU (use_cache=False,
logits of the last position only); each length runs in a fresh process so that its peak RSS is its own.
Prints memory-cache bytes, peak RSS above the model's baseline, and bytes per token, then the execution plan."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int) -> dict:
    import torch

    from longllama import LongLlamaConfig, LongLlamaForCausalLM

    torch.manual_seed(0)
    config = LongLlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        last_context_length=128,
        mem_layers=[1],
        mem_dtype="bfloat16",
    )
    model = LongLlamaForCausalLM(config).eval()
    ids = torch.randint(3, 320, (1, n))
    with torch.no_grad():
        model(ids[:, :512], use_cache=False, logits_to_keep=1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        out = model(ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = out.past_key_values.layers[1].memory
    return dict(
        tokens=n,
        memory_bytes=mem.nbytes(),
        buffer_copies=mem.copies,
        peak_rss_above_base=peak - base,
        seconds=round(seconds, 2),
        plan=model.plan.to_dict(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("tokens", nargs="?", type=int, help="one length, measured in this process (a JSON record)")
    args = ap.parse_args()
    if args.tokens:
        print(json.dumps(one(args.tokens)))
        return
    print(
        f"{'tokens':>8s} {'memory cache':>14s} {'copies':>6s} {'peak RSS above base':>20s} {'per token':>10s} {'s':>6s}"
    )
    for n in (4096, 8192, 16384, 32768, 65536):
        line = subprocess.run([sys.executable, __file__, str(n)], check=True, capture_output=True, text=True)
        r = json.loads(line.stdout.strip().splitlines()[-1])
        print(
            f"{n:8d} {r['memory_bytes']:14d} {r['buffer_copies']:6d} {r['peak_rss_above_base']:20d} "
            f"{r['peak_rss_above_base'] / n:10.0f} {r['seconds']:6.2f}"
        )
    print(f"plan: {r['plan']}")


if __name__ == "__main__":
    main()
