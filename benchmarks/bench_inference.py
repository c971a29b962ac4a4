"""Ingest and decode benchmark on one GPU: longllama against transformers' LlamaForCausalLM (SDPA) on one shape.

Random bf16 weights, batch 1, no_grad. Ingest = one forward over the whole input with the logits of the last position
only, timed twice: the first call of a process (builds any new cuDNN plans) and the next; decode = mean time between
streamed tokens over N greedy tokens (after a warm-up generation). Prints a table and, with --out, writes
records in the format of benchmarks/results/*.json, each with the model's execution plan (`plan`).
Execution choices are changed with `--plan KEY=VALUE` (ExecutionPlan fields, repeatable), e.g.
`--plan memory_kernel=cudnn --plan window_group_tokens=4096`.

    python benchmarks/bench_inference.py --shape 3b --tokens 8192,32768 --decode-after 8192 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from longllama import LongLlamaForCausalLM, timings
from longllama.config import preset
from longllama.plan import ExecutionPlan, check_changes, parse_overrides


def _random_model(cls, config, device):
    with torch.device(device):
        model = cls(config)
    model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _longllama(shape: str, device: str, **overrides):
    return _random_model(LongLlamaForCausalLM, preset(shape, **overrides), device)


def _hf_llama(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = preset(shape)
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=1 << 21,
        rope_theta=c.rope_theta,
    )
    config._attn_implementation = "sdpa"
    return _random_model(LlamaForCausalLM, config, device)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def ingest(model, ids, *, hf: bool) -> tuple[float, float]:
    torch.cuda.reset_peak_memory_stats()
    kwargs = dict(logits_to_keep=1) if hf else dict(use_cache=False, logits_to_keep=1)
    with torch.no_grad():
        seconds = _timed(lambda: model(ids, **kwargs))
    return seconds, torch.cuda.max_memory_allocated() / 2**30


class _Clock:
    """A streamer that notes the time each token arrives (generate calls put() with the prompt, then per token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # value is on the host: the token has arrived (no device sync here, which
        self.times.append(time.perf_counter())  # would stall a decoder that queues its next step first)

    def end(self) -> None:
        pass


def tuned_configs() -> dict:
    """The configuration each decoding kernel ran per key in this process and where it came from (a tuned table,
    the shipped table, the rule; kernels.Kernel.cache), and what the autotuner chose under the plan's autotune."""
    try:
        from longllama.fast import decode_attention, gemv_kernels
    except ImportError:
        return {}
    kernels = {
        "gemv": gemv_kernels.gemv,
        "gemv_swiglu": gemv_kernels.gemv_swiglu,
        "partials": decode_attention._kernels()[0],
    }
    return {
        f"{name} {'autotuned ' if table == 'tuned' else ''}{key}": str(config)
        for name, kernel in kernels.items()
        for table in ("cache", "tuned")
        for key, config in getattr(kernel, table, {}).items()
    }


def decode_ms(model, ids, new_tokens: int, *, hf: bool, sample: bool = False) -> tuple[float, float]:
    """Mean time between streamed tokens, from the third new token to the last (the first comes with the prompt's
    ingest, the second with any graph capture); greedy, or sampling (temperature 0.8, top-p 0.9). Also the seconds of
    the warm-up generation before it (the prompt, 4 tokens, and whatever a first call compiles or tunes)."""

    def run(n, streamer=None):
        kwargs = dict(max_new_tokens=n, do_sample=sample, streamer=streamer)
        if sample:
            kwargs.update(temperature=0.8, top_p=0.9)
        if hf:
            kwargs.update(min_new_tokens=n, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kwargs)

    torch.cuda.synchronize()
    start = time.perf_counter()
    run(4)  # warm-up: any compilation stays out of the timing
    warmup = time.perf_counter() - start
    clock = _Clock()
    run(new_tokens + 2, clock)
    steps = clock.times[3:]  # times[0]: the prompt; [1]: first new token; [2]: second
    return (steps[-1] - clock.times[2]) / len(steps) * 1e3, warmup


def check(model, n: int) -> dict:
    """Last-window logits of an n-token input: the configured (fast) path and the exact path, both bf16, against the
    exact path in fp32 (the same weights cast up, losslessly). Random-weight models make bf16 ill-conditioned, so the
    fast path passes when its error is at most 1.5x the exact bf16 path's (as in gpu_check.py)."""
    ids = torch.randint(3, model.config.vocab_size, (1, n), device="cuda")
    impl = model.config.attn_impl

    def logits():
        with torch.no_grad():
            return model(ids, use_cache=False, logits_to_keep=256).logits[0].float()

    skip = model.plan.skip_dead_layers
    try:
        fast = logits()
        if skip:  # the same logits with every window through every layer (nothing but the work may differ)
            model.set_plan(skip_dead_layers=False)
            every = logits()
            print(
                f"check {n} tokens: windows stopped after the last memory layer vs every layer: max |diff| "
                f"{(fast - every).abs().max().item():.3g}"
            )
        model.config.attn_impl = "eager"
        exact16 = logits()
        model.float()
        exact32 = logits()
    finally:
        model.to(torch.bfloat16)
        model.config.attn_impl = impl
        model.set_plan(skip_dead_layers=skip)
    err = lambda a: ((a - exact32).norm() / exact32.norm()).item()  # noqa: E731
    fast_err, exact_err = err(fast), err(exact16)
    ok = fast_err <= 1.5 * exact_err + 1e-3
    print(
        f"check {n} tokens: fast bf16 vs exact fp32 rel {fast_err:.2e}, exact bf16 vs exact fp32 rel "
        f"{exact_err:.2e}: {'PASS' if ok else 'FAIL'}"
    )
    return dict(
        benchmark="check",
        tokens=n,
        fast_rel=round(fast_err, 5),
        exact_bf16_rel=round(exact_err, 5),
        passed=ok,
        skip_vs_every_layer=None if not skip else (fast - every).abs().max().item(),
    )


def plan_record(model) -> dict:
    """The model's execution plan as a record field, with the memory kernel as resolved now (FlashAttention 4 or,
    after a failure of it, its fallback) and the fast paths that failed."""
    from longllama.fast import attention

    plan = model.plan
    probe = torch.empty(1, 1, 1, plan.memory_storage_dim(model.config.head_dim), device="cuda", dtype=torch.bfloat16)
    return {
        **plan.to_dict(),
        "memory_kernel_resolved": attention.resolve_memory_kernel(probe, plan),
        "failures": repr(plan.failures),
    }


def ingest_flops(config, n: int, *, hf: bool, skip_dead_layers: bool = True) -> float:
    """FLOPs of the work an ingest of n tokens does (logits of the last position only): the layers' matrix products,
    the last position's lm_head, and attention: causal over everything in every layer (hf), or causal within
    windows everywhere and, in memory layers, over all earlier windows (longllama). With the plan's skip_dead_layers,
    the memory windows (all but the final last_context_length tokens) stop at the last memory layer, where they only
    project the keys and values its memory keeps; the final window runs every layer."""
    h, layers, d = config.hidden_size, config.num_hidden_layers, config.head_dim
    kv = 2 * h * d * config.num_key_value_heads  # k and v projections, multiply-adds per token
    per_layer = 2 * h * d * config.num_attention_heads + kv + 3 * h * config.intermediate_size
    head = 2 * h * config.vocab_size
    if hf:
        return 2 * per_layer * n * layers + head + 2 * h * n * n * layers
    window = config.context_window
    final = min(n, config.last_context_length)
    memory_windows = n - final
    whole, writes = layers, 0  # layers a memory window runs whole; memory layers it only writes
    if skip_dead_layers:
        whole, writes = (max(config.mem_layers), 1) if config.mem_layers else (0, 0)
    tokens = memory_windows * whole + final * layers  # token-layers run whole
    local = 2 * h * window * (memory_windows * whole + final * layers * final / window)  # ~ causal within windows
    readers = len(config.mem_layers) - writes  # memory layers whose memory windows read the memory
    memory = 2 * h * n * n * readers + 4 * h * final * n * writes  # ... the others only their final window
    return 2 * per_layer * tokens + 2 * kv * memory_windows * writes + head + local + memory


# The project's benchmark floors (H100; benchmarks/RESULTS.md): matrix work at 750 TFLOP/s, decoding's bytes at 3 TB/s.
FLOOR_FLOPS, FLOOR_BYTES = 750e12, 3e12


def ingest_floor_s(config, params: int, n: int, *, hf: bool) -> float:
    """BENCHMARKS.md's ingest floor: 2 x params x n (every layer, every token) plus attention (hf: causal over
    everything in every layer; longllama: causal within windows, and over the memory in the memory layers), at
    FLOOR_FLOPS. Skipping the layers after the last memory layer for windows whose output is dropped does less
    than this counts, so an ingest can come closer to it than the matrix kernels' own speed would allow."""
    h, layers = config.hidden_size, config.num_hidden_layers
    if hf:
        return (2 * params * n + 2 * h * n * n * layers) / FLOOR_FLOPS
    window = config.context_window
    return (2 * params * n + 2 * h * n * window * layers + 2 * h * n * n * len(config.mem_layers)) / FLOOR_FLOPS


def decode_floor_ms(config, params: int, n: int, *, hf: bool) -> float:
    """BENCHMARKS.md's decoding floor: the weights plus, per token of context, the keys and values a step reads (the
    memory layers' for longllama, every layer's KV cache for hf; bf16, head_dim as is), at FLOOR_BYTES."""
    layers = config.num_hidden_layers if hf else len(config.mem_layers)
    cache = n * layers * 2 * config.num_key_value_heads * config.head_dim * 2
    return (params * 2 + cache) / FLOOR_BYTES * 1e3


def memory_gib(config, n: int) -> float:
    """Memory cache size: keys and values of every memory layer, head dimension padded as stored on GPUs."""
    kv = config.num_key_value_heads * ExecutionPlan(device="cuda").memory_storage_dim(config.head_dim)
    return n * len(config.mem_layers) * 2 * kv * 2 / 2**30


def params_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="3b", choices=["3b", "code-7b"])
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--decode-after", default="8192", help="prompt lengths before decoding, comma-separated")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--impls", default="longllama,hf-llama")
    ap.add_argument("--hf-tokens", default=None, help="ingest lengths for hf-llama (default: --tokens)")
    ap.add_argument("--mem-offload", action="store_true", help="memory in pinned CPU memory (mem_offload)")
    ap.add_argument(
        "--compile",
        choices=["auto", "yes", "no"],
        default="auto",
        help="compile_elementwise: yes runs RMSNorm/RoPE/SwiGLU/merges through torch.compile; auto (the default) and "
        "no leave them to the Triton kernels on GPUs (plan.elementwise_kernels)",
    )
    ap.add_argument("--decode-sampling", action="store_true", help="also time decoding with sampling")
    ap.add_argument("--repeat", type=int, default=2, help="ingests per length; the last is reported as seconds")
    ap.add_argument("--check", type=int, default=0, help="tokens of an input to check against the exact path")
    ap.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an execution-plan field for the longllama models (repeatable), e.g. memory_kernel=cudnn",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    changes = parse_overrides(args.plan)
    check_changes(changes)  # a bad field or value: an error before any model is built
    device = "cuda"
    card = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    records = []
    torch.manual_seed(0)
    for impl in args.impls.split(","):
        since = timings.mark()  # what this model's runs compile, tune or configure (longllama.timings)
        hf = impl == "hf-llama"
        if hf:
            model = _hf_llama(args.shape, device)
        elif impl == "longllama-grouped":
            model = _longllama(args.shape, device, mem_attention_grouping=(4, 2048), attn_impl="eager")
        elif impl == "longllama-sdpa":
            model = _longllama(args.shape, device, torch_attention=True)
        else:  # attn_impl "auto": the fast path on a GPU
            setting = {"auto": "auto", "yes": True, "no": False}[args.compile]
            model = _longllama(args.shape, device, mem_offload=args.mem_offload, compile_elementwise=setting)
            impl = "longllama-offload" if args.mem_offload else impl
        if not hf:
            model.set_plan(**changes)
            print(f"{impl:18s} {model.plan}")
        vocab = model.config.vocab_size
        compiled = None if hf else model.plan.compile
        window = preset(args.shape).context_window
        # windows for two window groups (the first with a window that has no memory yet) and a last window: the
        # kernels and compiled shapes of a long ingest's groups are made here, not in a timed run
        group_tokens = 0 if hf else model.plan.window_group_tokens
        warm = torch.randint(3, vocab, (1, max(2, 2 * (group_tokens // window) + 1) * window), device=device)
        warm_s = ingest(model, warm, hf=hf)[0]
        print(f"{impl:18s} warm-up ingest of {warm.shape[1]} tokens (compilation included): {warm_s:.1f} s")
        if args.check and not hf:
            records.append(
                dict(
                    check(model, args.check),
                    impl=impl,
                    plan=plan_record(model),
                    compile=compiled,
                    shape=args.shape,
                    device=card,
                    date=today,
                )
            )
        lengths = args.hf_tokens if hf and args.hf_tokens else args.tokens
        for n in [int(t) for t in lengths.split(",") if t and int(t)]:
            ids = torch.randint(3, vocab, (1, n), device=device)
            try:
                runs = [ingest(model, ids, hf=hf) for _ in range(args.repeat)]
                seconds, peak = runs[-1]
            except torch.OutOfMemoryError:
                print(f"{impl:18s} ingest {n:>8d}: out of memory")
                torch.cuda.empty_cache()
                continue
            flops = ingest_flops(model.config, n, hf=hf, skip_dead_layers=not hf and model.plan.skip_dead_layers)
            weights = params_count(model) * 2 / 2**30
            memory = 0.0 if hf else memory_gib(model.config, n)
            floor = ingest_floor_s(model.config, params_count(model), n, hf=hf)
            rec = dict(
                benchmark="ingest",
                impl=impl,
                plan=None if hf else plan_record(model),
                compile=None if hf else compiled,
                shape=args.shape,
                tokens=n,
                seconds=round(seconds, 4),
                first_seconds=round(runs[0][0], 4),
                runs=args.repeat,
                tokens_per_s=round(n / seconds),
                tflops=round(flops / seconds / 1e12, 1),
                floor_seconds=round(floor, 3),
                pct_of_floor=round(100 * floor / seconds, 1),
                peak_gib=round(peak, 2),
                weights_gib=round(weights, 2),
                memory_gib=round(memory, 2),
                device=card,
                date=today,
            )
            records.append(rec)
            print(
                f"{impl:18s} ingest {n:>8d}: {seconds:8.3f} s {n / seconds:10.0f} tok/s "
                f"{flops / seconds / 1e12:6.1f} TFLOP/s {100 * floor / seconds:5.1f} % of floor  "
                f"peak {peak:6.2f} GiB "
                f"(weights {weights:.1f} + memory {memory:.1f} GiB); first run {runs[0][0]:.3f} s"
            )
        for after in [int(t) for t in str(args.decode_after).split(",") if int(t)]:
            if hf and after > 131072:
                continue
            ids = torch.randint(3, vocab, (1, after), device=device)
            for mode in ("greedy", "sampling") if args.decode_sampling else ("greedy",):
                ms, warmup = decode_ms(model, ids, args.decode_tokens, hf=hf, sample=mode == "sampling")
                floor_ms = decode_floor_ms(model.config, params_count(model), after, hf=hf)
                records.append(
                    dict(
                        benchmark="decode",
                        impl=impl,
                        plan=None if hf else plan_record(model),
                        compile=None if hf else compiled,
                        shape=args.shape,
                        tokens=after,
                        mode=mode,
                        ms_per_token=round(ms, 2),
                        warmup_seconds=round(warmup, 2),
                        floor_ms=round(floor_ms, 2),
                        pct_of_floor=round(100 * floor_ms / ms, 1),
                        device=card,
                        date=today,
                    )
                )
                print(
                    f"{impl:18s} decode after {after} ({mode}): {ms:.2f} ms/token, {100 * floor_ms / ms:.0f} % of "
                    f"floor (warm-up generation {warmup:.1f} s)"
                )
            if not hf:
                records.append(dict(benchmark="tuned", impl=impl, shape=args.shape, configs=tuned_configs()))
        if not hf:
            events = timings.since(since)
            records.append(
                dict(
                    benchmark="startup",
                    impl=impl,
                    shape=args.shape,
                    timings=timings.summary(events),
                    events=[e.to_dict() for e in events],
                    device=card,
                    date=today,
                )
            )
            print(f"{impl:18s} compiled, tuned, configured, captured:\n{timings.report(events)}")
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
