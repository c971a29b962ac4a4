"""Where a window's time goes while the shipped model reads a long prompt: after --tokens of context (random ids,
--batch rows, the memory mode of --mode), --calls more calls of --windows windows each continue from the cache,
first timed alone, then under torch.profiler. Prints one JSON object: wall milliseconds per window, the kernels'
own time per window (the GPU's busy time), kernel launches per window, and the kernels (or, on a CPU, the
operators) that take the most time.

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
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from longllama import LongLlamaForCausalLM
from longllama.config import preset

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "longllama" / "models" / "small"
MODES = ("dense", "blocks", "blocks-recent")  # as bench_retrieval.py names them
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def load(args) -> LongLlamaForCausalLM:
    overrides = dict(mem_retrieval="dense" if args.mode == "dense" else "blocks", mem_top_k=None)
    if args.mode != "dense":
        overrides.update(mem_blocks=args.blocks, mem_recent_blocks=args.recent if args.mode == "blocks-recent" else 0)
    if args.tiny:  # a tiny random model with the shipped model's memory settings
        torch.manual_seed(0)
        config = preset("tiny", **overrides)
        return LongLlamaForCausalLM(config).to(args.device).eval()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    return LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype=dtype, device_map=args.device, **overrides).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20, help="context read before the probed calls (1M)")
    ap.add_argument("--batch", type=int, default=1, help="rows read together (1)")
    ap.add_argument("--mode", choices=MODES, default="blocks-recent", help="memory mode (blocks-recent)")
    ap.add_argument("--blocks", type=int, default=64, help="mem_blocks of the block modes (64)")
    ap.add_argument("--recent", type=int, default=16, help="mem_recent_blocks of blocks-recent (16)")
    ap.add_argument("--windows", type=int, default=16, help="windows per probed call (16: one window group)")
    ap.add_argument("--calls", type=int, default=4, help="probed calls, timed and then profiled (4)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed (15)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model at --tokens 256 (the script's test)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens, args.windows, args.calls, args.blocks, args.recent = 256, 2, 2, 2, 1
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
        sync(args.device)
        began = time.perf_counter()
        for _ in range(args.calls - 1):
            call()
        sync(args.device)
        wall_ms = (time.perf_counter() - began) * 1e3 / ((args.calls - 1) * args.windows)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                call()
            sync(args.device)
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
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(args.device) if on_gpu else "cpu",
                "torch": torch.__version__,
                "mode": args.mode,
                "mem_blocks": None if args.mode == "dense" else args.blocks,
                "mem_recent_blocks": args.recent if args.mode == "blocks-recent" else None,
                "batch": args.batch,
                "context_tokens": args.tokens,
                "window": window,
                "windows_per_call": args.windows,
                "wall_ms_per_window": round(wall_ms, 3),
                "kernel_ms_per_window": round(busy_ms, 3),
                "launches_per_window": round(launches, 1),
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
