"""Ingest and decode benchmark on one GPU: longllama against transformers' LlamaForCausalLM (SDPA) on one shape.

Random bf16 weights, batch 1, no_grad. Ingest = one forward over the whole input with the logits of the last position
only; decode = (time of 1 + N new tokens - time of 1 new token) / N, greedy. Prints a table and, with --out, writes
records in the format of benchmarks/results/*.json.

    python benchmarks/bench_inference.py --shape 3b --tokens 8192,32768 --decode-after 8192 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from longllama import LongLlamaForCausalLM
from longllama.config import preset


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
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         max_position_embeddings=1 << 21, rope_theta=c.rope_theta)
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


def decode_ms(model, ids, new_tokens: int, *, hf: bool) -> float:
    def run(n):
        kwargs = dict(max_new_tokens=n, do_sample=False)
        if hf:
            kwargs.update(min_new_tokens=n, pad_token_id=0)
        with torch.no_grad():
            return _timed(lambda: model.generate(ids, **kwargs))
    one = run(1)
    many = run(1 + new_tokens)
    return (many - one) / new_tokens * 1e3


def attention_kernel() -> str:
    from longllama import attention

    return f"local={attention.CUDA_KERNEL},memory={attention.MEMORY_KERNEL},chunk={attention.MEMORY_CHUNK}"


def ingest_flops(config, params: int, n: int, *, hf: bool) -> float:
    """Matrix FLOPs: 2 x params x n, plus attention: causal over everything in every layer (hf), or causal within
    windows everywhere and, in memory layers, over all earlier windows (longllama)."""
    h = config.hidden_size
    if hf:
        return 2 * params * n + 2 * h * n * n * config.num_hidden_layers
    window = config.max_position_embeddings
    local = 2 * h * n * window * config.num_hidden_layers  # ~ causal attention inside windows
    return 2 * params * n + local + 2 * h * n * n * len(config.mem_layers)


def memory_gib(config, n: int) -> float:
    """Memory cache size: keys and values of every memory layer, head dimension padded to a multiple of 8."""
    from longllama.attention import kernel_head_dim

    kv = config.num_key_value_heads * kernel_head_dim(config.head_dim)
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
    ap.add_argument("--kernel", default=None, choices=["flash", "cudnn"], help="local-attention kernel (fast path)")
    ap.add_argument("--memory-kernel", default=None, choices=["flash", "cudnn"], help="memory-attention kernel")
    ap.add_argument("--memory-chunk", type=int, default=None, help="keys per memory-attention call (0: all)")
    ap.add_argument("--mem-offload", action="store_true", help="memory in pinned CPU memory (mem_offload)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from longllama import attention

    attention.CUDA_KERNEL = args.kernel or attention.CUDA_KERNEL
    attention.MEMORY_KERNEL = args.memory_kernel or attention.MEMORY_KERNEL
    if args.memory_chunk is not None:
        attention.MEMORY_CHUNK = args.memory_chunk

    device = "cuda"
    card = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    records = []
    torch.manual_seed(0)
    for impl in args.impls.split(","):
        hf = impl == "hf-llama"
        if hf:
            model = _hf_llama(args.shape, device)
        elif impl == "longllama-grouped":
            model = _longllama(args.shape, device, mem_attention_grouping=(4, 2048), attn_impl="eager")
        elif impl == "longllama-sdpa":
            model = _longllama(args.shape, device, torch_attention=True)
        else:  # attn_impl "auto": the fast path on a GPU
            model = _longllama(args.shape, device, mem_offload=args.mem_offload)
            impl = "longllama-offload" if args.mem_offload else impl
        vocab = model.config.vocab_size
        warm = torch.randint(3, vocab, (1, 4096), device=device)
        ingest(model, warm, hf=hf)
        lengths = args.hf_tokens if hf and args.hf_tokens else args.tokens
        for n in [int(t) for t in lengths.split(",")]:
            ids = torch.randint(3, vocab, (1, n), device=device)
            try:
                seconds, peak = ingest(model, ids, hf=hf)
            except torch.OutOfMemoryError:
                print(f"{impl:18s} ingest {n:>8d}: out of memory")
                torch.cuda.empty_cache()
                continue
            flops = ingest_flops(model.config, params_count(model), n, hf=hf)
            weights = params_count(model) * 2 / 2**30
            memory = 0.0 if hf else memory_gib(model.config, n)
            rec = dict(benchmark="ingest", impl=impl, kernel=None if hf else attention_kernel(), shape=args.shape, tokens=n, seconds=round(seconds, 4),
                       tokens_per_s=round(n / seconds), tflops=round(flops / seconds / 1e12, 1),
                       peak_gib=round(peak, 2), weights_gib=round(weights, 2), memory_gib=round(memory, 2),
                       device=card, date=today)
            records.append(rec)
            print(f"{impl:18s} ingest {n:>8d}: {seconds:8.3f} s {n / seconds:10.0f} tok/s "
                  f"{flops / seconds / 1e12:6.1f} TFLOP/s  peak {peak:6.2f} GiB "
                  f"(weights {weights:.1f} + memory {memory:.1f} GiB)")
        for after in [int(t) for t in str(args.decode_after).split(",") if int(t)]:
            if hf and after > 131072:
                continue
            ids = torch.randint(3, vocab, (1, after), device=device)
            ms = decode_ms(model, ids, args.decode_tokens, hf=hf)
            records.append(dict(benchmark="decode", impl=impl, shape=args.shape, tokens=after,
                                ms_per_token=round(ms, 2), device=card, date=today))
            print(f"{impl:18s} decode after {after}: {ms:.2f} ms/token")
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
