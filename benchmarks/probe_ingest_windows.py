"""Where a window's time goes while the shipped model reads a long prompt: after --tokens of context (random ids,
--batch rows, the memory mode of --mode), --calls more calls of --windows windows each continue from the cache,
first timed alone, then under torch.profiler. Prints one JSON object: wall milliseconds per window, the kernels'
own time per window (the GPU's busy time), kernel launches per window, and the kernels (or, on a CPU, the
operators) that take the most time; on the host, the PyTorch operators called per window, the waits for the GPU
per window (values read back, synchronising calls) and the operators that hold the host longest (their time with
what they call).

A window whose wall time is far above its kernels' time is bound by launches and host work, where fewer operators
or CUDA graphs would pay; one near it is bound by the kernels listed. On a CPU the operators' own times stand for
the kernels' and no launches are counted.

    python benchmarks/probe_ingest_windows.py --tokens 1048576 --batch 3 > probe.json       # GPU
    python benchmarks/probe_ingest_windows.py --tiny --device cpu                           # the script's test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_quant import _sync, random_model
from bench_retrieval import modes, shipped
from torch.profiler import ProfilerActivity, profile

from longllama import LongLlamaForCausalLM
from longllama.config import preset

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
# where the host waits for the GPU: a value read back (item, bool, int of a tensor), a synchronising call or copy
WAITS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def load(args) -> LongLlamaForCausalLM:
    """The shipped model in the memory mode of bench_retrieval.py named --mode; with --tiny a tiny random one."""
    overrides = modes(args)[args.mode]
    if args.tiny:
        return random_model(preset("tiny", **overrides), args.device)
    return shipped(args, **overrides)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20, help="context read before the probed calls (1M)")
    ap.add_argument("--batch", type=int, default=1, help="rows read together (1)")
    ap.add_argument("--mode", default="blocks-recent", help="a memory mode of bench_retrieval.py (blocks-recent)")
    ap.add_argument("--blocks", type=int, default=64, help="mem_blocks of the block modes (64)")
    ap.add_argument("--recent-blocks", type=int, default=16, help="mem_recent_blocks of the -recent modes (16)")
    ap.add_argument("--super-size", type=int, default=64, help="mem_super_size of the blocks2 modes (64)")
    ap.add_argument("--dtype", default="bfloat16", help="the shipped model's dtype (bfloat16)")
    ap.add_argument("--windows", type=int, default=16, help="windows per probed call (16: one window group)")
    ap.add_argument("--calls", type=int, default=4, help="probed calls, timed and then profiled (4)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed (15)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model at --tokens 256 (the script's test)")
    args = ap.parse_args(argv)
    if args.mode not in modes(args):
        ap.error(f"--mode {args.mode}: use one of {', '.join(modes(args))}")
    if args.tiny:
        args.tokens, args.windows, args.calls, args.blocks, args.recent_blocks, args.super_size = 256, 2, 2, 2, 1, 2
    model = load(args)
    window = model.config.context_window
    step = args.windows * window
    total = args.tokens + 2 * args.calls * step
    ids = torch.randint(3, model.config.vocab_size, (args.batch, total), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    with torch.no_grad():
        cache = model(ids[:, : args.tokens], logits_to_keep=1).past_key_values
        start = args.tokens

        def call() -> None:
            nonlocal cache, start
            cache = model(ids[:, start : start + step], past_key_values=cache, logits_to_keep=1).past_key_values
            start += step

        call()  # the first call of this shape: compilation, plans
        _sync(args.device)
        began = time.perf_counter()
        for _ in range(args.calls - 1):
            call()
        _sync(args.device)
        wall_ms = (time.perf_counter() - began) * 1e3 / ((args.calls - 1) * args.windows)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                call()
            _sync(args.device)
    windows = args.calls * args.windows
    events = prof.key_averages()
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        own = lambda e: e.self_device_time_total  # noqa: E731
    else:  # no kernels: the operators' own CPU time stands for them
        kernels = [e for e in events if e.key.startswith("aten::")]
        own = lambda e: e.self_cpu_time_total  # noqa: E731
    busy_ms = sum(own(e) for e in kernels) / 1e3 / windows
    launches = sum(e.count for e in events if e.key in LAUNCHES) / windows
    top = sorted(kernels, key=own, reverse=True)[: args.top]
    operators = [e for e in events if e.key.startswith("aten::")]
    host_top = sorted(operators, key=lambda e: e.cpu_time_total, reverse=True)[: args.top]
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(args.device) if on_gpu else "cpu",
                "torch": torch.__version__,
                "mode": args.mode,
                "mem_retrieval": model.config.mem_retrieval,
                "mem_blocks": model.config.mem_blocks if model.config.mem_retrieval == "blocks" else None,
                "mem_recent_blocks": model.config.mem_recent_blocks if model.config.mem_retrieval == "blocks" else None,
                "batch": args.batch,
                "context_tokens": args.tokens,
                "window": window,
                "windows_per_call": args.windows,
                "wall_ms_per_window": round(wall_ms, 3),
                "kernel_ms_per_window": round(busy_ms, 3),
                "launches_per_window": round(launches, 1),
                "operators_per_window": round(sum(e.count for e in operators) / windows, 1),
                "waits_per_window": {e.key: round(e.count / windows, 2) for e in events if e.key in WAITS and e.count},
                "top_operators_host_ms": [
                    {"name": e.key, "ms_per_window": round(e.cpu_time_total / 1e3 / windows, 4), "calls": e.count}
                    for e in host_top
                ],
                "top": [
                    {"name": e.key[:120], "ms_per_window": round(own(e) / 1e3 / windows, 4), "calls": e.count}
                    for e in top
                ],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
