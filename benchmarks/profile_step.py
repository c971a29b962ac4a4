"""Where the time goes (3B shape, bf16, one GPU): host syncs inside an ingest, GPU busy time against wall time of an
ingest with the heaviest kernels, attention kernels on the memory shape, a decoding step's attention kernel against
the general path (GB/s), and a decode step (CUDA graph replay against the sum of its kernels). Execution choices of
the model are changed with `--plan KEY=VALUE` (ExecutionPlan fields, repeatable).

    PYTHONPATH=src python benchmarks/profile_step.py --tokens 131072 --decode-after 32768
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings

import torch
from bench_inference import _longllama, plan_record
from torch.profiler import ProfilerActivity, profile

from longllama.plan import check_changes, parse_overrides


def sync_points(model, ids) -> None:
    """Every host-device sync in one ingest (CUDA sync debug mode), by the innermost longllama frame."""
    seen: dict[str, int] = {}
    show = warnings.showwarning

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "longllama" in f.filename]
        # the path inside the package: attention.py and fast/attention.py both exist
        where = (
            f"{frames[-1].filename.rsplit('longllama/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}"
            if frames
            else "?"
        )
        seen[where] = seen.get(where, 0) + 1

    warnings.showwarning = hook
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = show
    print(f"== host syncs in an ingest of {ids.shape[1]} tokens ({ids.shape[1] // 2048} windows)")
    for where, count in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"{count:6d}  {where}")


def kernel_summary(prof, rows: int) -> tuple[float, int]:
    """Sum of device time over kernels (ms) and the kernel count; prints the heaviest kernels."""
    totals: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(evt.name[:90], [0.0, 0])
            t[0] += evt.time_range.elapsed_us() / 1e3
            t[1] += 1
    busy = sum(t[0] for t in totals.values())
    count = sum(t[1] for t in totals.values())
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:10.1f} ms {100 * ms / busy:5.1f} % {n:7d}x  {name}")
    return busy, count


def ingest_profile(model, ids, rows: int) -> None:
    with torch.no_grad():
        walls = []
        for _ in range(2):  # the first run builds any new cuDNN plans
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        wall = walls[1]
        print(f"ingest {ids.shape[1]}: first run {walls[0]:.3f} s, second {walls[1]:.3f} s")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    print(f"== ingest {ids.shape[1]}: wall {wall:.3f} s (unprofiled); heaviest kernels:")
    busy, count = kernel_summary(prof, rows)
    print(f"GPU busy {busy / 1e3:.3f} s over {count} kernels = {100 * busy / 1e3 / wall:.1f} % of the wall time")


def timed_calls(fn, reps: int) -> tuple[float, float]:
    """Device ms per call (CUDA events) and host ms per call (a loop that never waits), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) / reps * 1e3
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, host


def local_kernels() -> None:
    """Causal attention of one 2048-token window (local attention), 32 heads, head_dim 100 padded."""
    from longllama.fast.attention import partial_attention

    print("== kernels: causal 2048 x 2048, 32 heads, TFLOP/s on head_dim 100 (half the square)")
    for dim in (104, 112):
        q, k, v = (torch.randn(1, 32, 2048, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for kernel in ("flash", "cudnn"):
            ms, _ = timed_calls(
                lambda q=q, k=k, v=v, kernel=kernel: partial_attention(q, k, v, causal=True, scale=0.1, kernel=kernel),
                20,
            )
            print(f"{kernel:6s} d={dim}: {ms:8.3f} ms  {2 * 32 * 2048 * 2048 * 100 / ms / 1e9:6.1f} TFLOP/s")


def kernels(m: int, queries: int) -> None:
    """Memory-attention kernels: `queries` queries x m keys, 32 heads, padded head dims; device ms from CUDA events,
    host ms per call from a loop that never waits."""
    from longllama.fast.attention import partial_attention

    print(f"== kernels: {queries} queries x {m} keys, 32 heads, TFLOP/s on head_dim 100")
    for dim in (104, 112, 128):
        q = torch.randn(1, 32, queries, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 32, m, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 32, m, dim, device="cuda", dtype=torch.bfloat16)
        for kernel in ("flash", "cudnn"):
            try:
                ms, host = timed_calls(
                    lambda q=q, k=k, v=v, kernel=kernel: partial_attention(
                        q, k, v, causal=False, scale=0.1, kernel=kernel
                    ),
                    10,
                )
            except RuntimeError as exc:
                print(f"{kernel:6s} d={dim}: failed: {str(exc).splitlines()[0][:100]}")
                continue
            flops = 4 * 32 * queries * m * 100
            print(f"{kernel:6s} d={dim}: {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  host {host:.3f} ms/call")


def plan_cost() -> None:
    """cuDNN builds an execution plan per new shape: the first call of a shape against the next one."""
    from longllama.fast.attention import partial_attention

    q = torch.randn(1, 32, 2048, 112, device="cuda", dtype=torch.bfloat16)
    for m in (6144, 10240, 14336, 18432):
        k = torch.randn(1, 32, m, 112, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            partial_attention(q, k, k, causal=False, scale=0.1, kernel="cudnn")
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"cuDNN 2048 queries x {m} keys: first call {times[0]:.1f} ms, second {times[1]:.2f} ms")


def _graph_ms(fn, calls: int = 10, replays: int = 5) -> float:
    """ms per call of fn, `calls` calls captured in one CUDA graph (no launch gaps), best of `replays` replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def decode_attention_bandwidth(lengths) -> None:
    """One memory layer's decoding attention (3B heads, 2048 local slots, M memory keys stored at head_dim 112): the
    Triton split kernel against the general path (matrix products and a softmax), as GB/s of keys and values."""
    from longllama.attention import few_query_attention
    from longllama.fast import decode_attention

    print("== decode attention, one layer, 32 heads, 2048 local slots + M memory keys (bytes as stored)")
    q = torch.randn(1, 32, 100, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(1, 32, 2048, 100, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for used in (10, 2048):
        slot = torch.tensor([used - 1], device="cuda")
        print(
            f"no memory, {used} local slots in use: kernel "
            f"{_graph_ms(lambda: decode_attention.attend(q, keys, values, slot, None)) * 1e3:.1f} us"
        )
    slot = torch.tensor([2047], device="cuda")  # every local slot in use
    visible = torch.ones(1, 1, 1, 2048, dtype=torch.bool, device="cuda")
    for m in lengths:
        mem = tuple(
            torch.nn.functional.pad(torch.randn(1, 32, m, 100, device="cuda", dtype=torch.bfloat16), (0, 12))
            for _ in range(2)
        )
        gbytes = 2 * 32 * (2048 * 100 + m * 112) * 2 / 1e9
        general = _graph_ms(
            lambda: few_query_attention(q[:, :, None], keys, values, visible, mem[0][..., :100], mem[1][..., :100], mem)
        )
        line = f"M={m:8d}: general {general:7.3f} ms {gbytes / general * 1e3:5.0f} GB/s; kernel"
        for target in (1024, 2048, 4096):  # programs aimed at (the plan's decode_programs: the chunk size)
            kernel = _graph_ms(
                lambda target=target: decode_attention.attend(q, keys, values, slot, mem, programs=target)
            )
            line += f", {target} programs {kernel:6.3f} ms {gbytes / kernel * 1e3:5.0f} GB/s"
        print(line)


def decode_profile(model, ids, rows: int) -> None:
    from longllama.fast.decode import StaticDecoder

    with torch.no_grad():
        out = model.model.run(ids, cache=model.model.resolve_cache(None, True), use_cache=True, keep_last=1)
        token = torch.zeros(1, dtype=torch.long, device="cuda")
        results = {}
        for graphs in (True, False):
            dec = StaticDecoder(model, out.cache.fork(), plan=model.plan, graphs=graphs)
            for _ in range(3):
                dec.step(token)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                dec.step(token)
            torch.cuda.synchronize()
            results[graphs] = (time.perf_counter() - t0) / 50 * 1e3
        dec = StaticDecoder(model, out.cache.fork(), plan=model.plan, graphs=False)
        dec.step(token)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                dec.step(token)
            torch.cuda.synchronize()
    print(
        f"== decode after {ids.shape[1]}: graph replay {results[True]:.2f} ms/step, no graph "
        f"{results[False]:.2f} ms/step; kernels of 10 steps without graph:"
    )
    busy, count = kernel_summary(prof, rows)
    print(f"per step: {busy / 10:.2f} ms of kernels, {count / 10:.0f} kernels")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--decode-after", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--kernel-keys", type=int, default=65536)
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="compile_elementwise")
    ap.add_argument("--skip", default="", help="sections to skip: sync,ingest,kernels,decode,decode-attention")
    ap.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an execution-plan field of the model (repeatable), e.g. memory_kernel=cudnn",
    )
    args = ap.parse_args()
    changes = parse_overrides(args.plan)
    check_changes(changes)  # a bad field or value: an error before the model is built
    print(torch.cuda.get_device_name(), torch.__version__, torch.backends.cudnn.version())
    model = _longllama("3b", "cuda", compile_elementwise={"auto": "auto", "yes": True, "no": False}[args.compile])
    model.set_plan(**changes)
    print(f"plan: {plan_record(model)}")
    ids = torch.randint(3, 32000, (1, args.tokens), device="cuda")
    with torch.no_grad():
        model(ids[:, :4096], use_cache=False, logits_to_keep=1)
    skip = set(args.skip.split(","))
    if "sync" not in skip:
        sync_points(model, ids[:, :8192])
    if "ingest" not in skip:
        ingest_profile(model, ids, args.rows)
    if "kernels" not in skip:
        plan_cost()
        local_kernels()
        kernels(args.kernel_keys, 2048)
        kernels(args.kernel_keys, 16384)
    if "decode-attention" not in skip:
        decode_attention_bandwidth([32768, 262144])
    if "decode" not in skip:
        decode_profile(model, ids[:, : args.decode_after], args.rows)


if __name__ == "__main__":
    main()
