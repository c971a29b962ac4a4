"""FoT training on several GPUs: weak-scaling throughput of FSDP2 (one shard group over all ranks).

Every rank trains its own micro-batch of --batch x --seq random tokens (seeded per rank) with cross-batch memory
(range 3, dataset packing 4) inside that micro-batch, as `longllama train` does with parallel=fsdp2. The model is
built with the same seed on every rank, so the weights agree, then sharded by `longllama.training.parallel.parallelize`
(`fully_shard` per decoder layer, then the root). bf16 autocast over fp32 weights, AdamW (b2 0.95, fused on CUDA),
global-norm clipping at 1.0, as benchmarks/bench_train.py (the one-GPU benchmark, whose FLOP count and 989 TFLOP/s
H100 SXM bf16 peak this script reuses). The default --parallel fsdp2 is used for one process too, so 1 and N GPUs run
the same code; --parallel none gives the plain one-GPU model for comparison.

Run, on one GPU (the baseline), then on two:

    python benchmarks/bench_train_fsdp.py --shape 1b --out $OUT/fsdp-1gpu.json
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_train_fsdp.py --shape 1b \
        --baseline $OUT/fsdp-1gpu.json --out $OUT/fsdp-2gpu.json

Rank 0 prints ms/step, tokens/s (all GPUs and per GPU), MFU (model FLOPs of one GPU's micro-batch / step time /
peak), the peak GiB allocated on the busiest GPU and the loss, and with --out writes a JSON list of one record.
With --baseline (the --out file of a one-process run of the same shape, batch and seq) it adds
scaling_efficiency = tokens/s per GPU here / tokens/s per GPU there (1.0: perfect weak scaling).

Shapes: 1b (bench_train.py's: 16 layers, hidden 2048, memory layers 5, 10, 15), 3b (LongLLaMA 3B, the `3b` preset:
26 layers, hidden 3200, memory layers 6, 12, 18; one GPU needs --activation-checkpointing, and for a fair scaling
number the multi-GPU run should use it too), tiny (a CPU smoke test). The context window is --seq (default 2048,
tiny 64): each entry is one window. On the CPU (gloo) MFU and peak memory are not measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# benchmarks/ is not a package: run as a script, this file's folder is on sys.path.
from bench_train import PEAK, model_flops

from longllama import LongLlamaForCausalLM
from longllama.config import LongLlamaConfig, preset
from longllama.training.config import TrainConfig, TrainError
from longllama.training.cross_batch import CrossBatch
from longllama.training.parallel import (
    Processes,
    checkpoint_layers,
    parallelize,
    start_processes,
    stop_processes,
)

IMPL = "longllama-fot-fsdp2"
CROSS = CrossBatch(3, 4)  # cross-batch range 3, dataset packing 4 (stepping on), as bench_train.py
SEQ = {"1b": 2048, "3b": 2048, "tiny": 64}


def make_config(shape: str, seq: int) -> LongLlamaConfig:
    """The model of a --shape, with a context window (and last window) of `seq` tokens."""
    window = {"max_position_embeddings": seq, "last_context_length": seq, "mem_dtype": "bfloat16", "attn_impl": "fast"}
    if shape == "1b":
        return LongLlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=16,
            num_attention_heads=16,
            mem_layers=[5, 10, 15],
            **window,
        )
    if shape == "3b":
        return preset("3b", mem_layers=[6, 12, 18], **window)
    return LongLlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        mem_layers=[1],
        **{**window, "mem_dtype": "float32"},
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any] | None]:
    ap = argparse.ArgumentParser(prog="bench_train_fsdp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=tuple(SEQ), default="1b")
    ap.add_argument("--batch", type=int, default=8, help="entries per GPU per step (a multiple of 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per entry (default 2048, tiny 64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--parallel", choices=("fsdp2", "none"), default="fsdp2")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    ap.add_argument("--baseline", default=None, help="--out JSON of a one-process run, for scaling_efficiency")
    ap.add_argument("--out", default=None, help="JSON file for the record (written by rank 0)")
    args = ap.parse_args(argv)
    args.seq = SEQ[args.shape] if args.seq is None else args.seq
    k = CROSS.dataset_packing
    if args.batch < 1 or args.batch % k:
        ap.error(f"--batch {args.batch}: use a positive multiple of {k} (whole {k}-packs per GPU)")
    for name in ("seq", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: use a positive integer")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup}: use 0 or more")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.parallel == "none":
        ap.error(f"started as {world} processes with --parallel none: use --parallel fsdp2")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = read_baseline(Path(args.baseline), args)
        except (OSError, ValueError) as e:
            ap.error(f"--baseline {args.baseline}: {e}")
    return args, baseline


def read_baseline(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The record of this benchmark in `path`, checked to be of the same shape, batch and seq."""
    data = json.loads(path.read_text())
    records = [
        r
        for r in (data if isinstance(data, list) else [data])
        if isinstance(r, dict) and r.get("impl") == IMPL and "tokens_per_s_per_gpu" in r
    ]
    if not records:
        raise ValueError(f"holds no {IMPL} record: pass the --out file of an earlier run of this script")
    base = records[0]
    for key, value in (("shape", args.shape), ("batch_per_gpu", args.batch), ("seq", args.seq)):
        if base.get(key) != value:
            raise ValueError(f"was run with {key} {base.get(key)!r}, this run with {value!r}: rerun it to match")
    return base


def max_over_ranks(procs: Processes, *values: float) -> list[float]:
    if not procs.distributed or procs.world == 1:
        return list(values)
    box = torch.tensor(values, dtype=torch.float64, device=procs.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.tolist()


def bench(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    config = make_config(args.shape, args.seq)
    cuda = procs.device.type == "cuda"
    torch.manual_seed(0)  # the same weights on every rank, before sharding
    with torch.device(procs.device):
        model = LongLlamaForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    if args.activation_checkpointing:
        checkpoint_layers(model)
    if args.parallel == "fsdp2":
        model = parallelize(model, "fsdp2", procs)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        **({"fused": True} if cuda else {"foreach": True}),
    )
    rows = torch.Generator(device="cpu").manual_seed(1000 + procs.rank)  # each rank its own micro-batch
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=rows).to(procs.device)

    def step() -> torch.Tensor:
        with torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(ids, labels=ids, cross_batch=CROSS, use_cache=False, last_context_length=args.seq)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(procs.device)

    for _ in range(args.warmup):
        step()
    sync()
    procs.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats(procs.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(procs.device) / 2**30 if cuda else 0.0
    elapsed, peak = max_over_ranks(procs, elapsed, peak)  # the slowest rank sets the pace
    seconds = elapsed / args.steps
    per_gpu = args.batch * args.seq / seconds
    flops = model_flops(config, params, args.batch, args.seq, CROSS.cross_batch_range)
    return {
        "config": config,
        "params": params,
        "seconds": seconds,
        "tokens_per_s": per_gpu * procs.world,
        "tokens_per_s_per_gpu": per_gpu,
        "mfu": flops / seconds / PEAK if cuda else None,
        "peak_gib": peak if cuda else None,
        "loss": procs.mean(float(loss)),
        "device": torch.cuda.get_device_name(procs.device) if cuda else "cpu",
    }


def report(args: argparse.Namespace, procs: Processes, r: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    print(
        f"{args.shape} x {procs.world} GPU(s) ({r['device']}, {args.parallel}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}): {_count(r['params'])} params  "
        f"{r['seconds'] * 1e3:.1f} ms/step  {r['tokens_per_s']:.0f} tokens/s  "
        f"({r['tokens_per_s_per_gpu']:.0f} per GPU)  MFU {mfu}  peak {peak}/GPU  loss {r['loss']:.3f}"
    )
    record = {
        "benchmark": "train",
        "impl": IMPL,
        "shape": args.shape,
        "gpus": procs.world,
        "tokens": procs.world * args.batch * args.seq,
        "seconds": round(r["seconds"], 4),
        "tokens_per_s": round(r["tokens_per_s"]),
        "tokens_per_s_per_gpu": round(r["tokens_per_s_per_gpu"]),
        "mfu": None if r["mfu"] is None else round(r["mfu"], 4),
        "peak_gib": None if r["peak_gib"] is None else round(r["peak_gib"], 2),
        "device": r["device"],
        "date": datetime.date.today().isoformat(),
        "params": r["params"],
        "batch_per_gpu": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "parallel": args.parallel,
        "activation_checkpointing": args.activation_checkpointing,
        "mem_layers": r["config"].mem_layers,
        "cross_batch_range": CROSS.cross_batch_range,
        "dataset_packing": CROSS.dataset_packing,
        "loss": round(r["loss"], 4),
    }
    if baseline is not None:
        efficiency = r["tokens_per_s_per_gpu"] / baseline["tokens_per_s_per_gpu"]
        record.update(
            scaling_efficiency=round(efficiency, 4),
            baseline_gpus=baseline.get("gpus"),
            baseline_tokens_per_s_per_gpu=baseline["tokens_per_s_per_gpu"],
        )
        print(
            f"scaling efficiency {100 * efficiency:.1f} % of {baseline['tokens_per_s_per_gpu']} tokens/s per GPU "
            f"on {baseline.get('gpus')} GPU(s)"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([record], indent=1) + "\n")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> None:
    args, baseline = parse_args(argv)
    try:
        procs = start_processes(TrainConfig(parallel=args.parallel, device=args.device))
    except TrainError as e:
        raise SystemExit(f"bench_train_fsdp: error: {e}") from None
    try:
        result = bench(args, procs)
        if procs.main:
            report(args, procs, result, baseline)
        # Leave together: a gloo rank that tears down while its peer is still writing the report aborts.
        procs.barrier()
    finally:
        stop_processes(procs)
    if procs.world > 1:
        # Even so, ~1 two-process CPU run in 4 under pytest aborted after its report ("terminate called without an
        # active exception" at interpreter teardown, gloo's threads; not seen from a shell): the report is written and
        # the group destroyed, so the ranks end here, past the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
