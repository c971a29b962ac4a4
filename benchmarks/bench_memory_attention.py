"""Memory attention of one window of the shipped small model (4 heads of 64, 512 queries, bf16) over long memories
on the GPU: dense, by each memory kernel an execution plan can choose (FlashAttention 2 in one call, cuDNN in pieces
of the plan's memory_piece x 2^j keys, FlashAttention 4 where it serves), and kNN memory (top 128, torch.topk over
chunks of scores). Prints ms per call and the largest difference of each dense path from FlashAttention 2's.
(Commit ca6c7f4 also compared a block-wise top-k selection: slower, removed. The split-KV path, attention.MEMORY_CHUNK,
was removed after commit 95d9d89.)"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton.testing

from longllama.fast import flash4
from longllama.fast.attention import memory_attention, memory_pieces, top_k_memory_attention
from longllama.plan import ExecutionPlan, parse_overrides

KERNELS = {"flash": "FA2, one call", "cudnn": "cuDNN", "fa4": "FA4, one call"}  # the plan's memory_kernel


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench(fn, warmup=3, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="65536,1048576", help="memory lengths in keys")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an execution-plan field (repeatable), e.g. memory_piece=4096",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    plan = ExecutionPlan(device="cuda", attention="fast").replace(**parse_overrides(args.plan))
    torch.manual_seed(0)
    h, n, d = 4, 512, 64
    scale = d**-0.5
    card = torch.cuda.get_device_name()
    records = []
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    print(f"{'memory':>9s} {'path':28s} {'ms':>9s}")
    for m in (int(x) for x in args.memory.split(",")):
        k = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, h, m, d, device="cuda", dtype=torch.bfloat16)
        paths = {}  # name: (call, the plan it runs under)
        for kernel in (kernel for kernel in KERNELS if kernel != "fa4" or flash4.usable(q, plan)):
            name = f"dense, {KERNELS[kernel]}"
            if kernel == "cudnn":
                pieces = len(memory_pieces(m, plan.memory_piece))
                name += f", {pieces} piece{'s' if pieces > 1 else ''}"
            # the model's memory layers take this path under a plan with this memory_kernel
            under = plan.replace(memory_kernel=kernel)
            paths[name] = (functools.partial(memory_attention, q, k, v, scale=scale, plan=under), under)
        paths["kNN"] = (functools.partial(top_k_memory_attention, q, k, v, top_k=args.top_k, scale=scale), plan)
        outs = {}
        for name, (fn, under) in paths.items():
            outs[name] = fn()[0]
            if "FA4" in name and flash4.FAILED in plan.failures:  # cuDNN served instead: no FA4 row
                print(f"{m:9d} {name:28s} failed, see the warning")
                del outs[name]
                continue
            ms = bench(fn)
            print(f"{m:9d} {name:28s} {ms:9.3f}")
            records.append(
                dict(
                    benchmark="memory-attention",
                    path=name,
                    memory=m,
                    ms=round(ms, 4),
                    queries=n,
                    heads=h,
                    head_dim=d,
                    top_k=args.top_k,
                    device=card,
                    plan=under.to_dict(),
                )
            )
        dense = [name for name in outs if name.startswith("dense")]
        for name in dense[1:]:
            diff = (outs[name].float() - outs[dense[0]].float()).abs().max().item()
            print(f"{m:9d} dense outputs, max |difference| {name} vs {dense[0]}: {diff:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
