"""Decoding attention on one GPU (3B shape, bf16): a sweep of the split kernel's configurations and chunk sizes, then
decoding end to end with the table as shipped and with the sweep's choices, in one process.

Kernel times are per call from CUDA graphs (no launch gaps), with the L2 cache flushed before each call (a decoding
step reads every layer's keys once; nothing is warm in L2), the flush's own time subtracted. The sweep's choices are
the plan's split into chunks (decode_min_chunk, decode_programs) and the kernel's table: the "tuned" run sets the
plan's fields and writes the table rows as this GPU's kernel table in the cache folder (as `longllama tune` does),
restoring the file as it was afterwards. `--plan KEY=VALUE` (ExecutionPlan fields) changes the end-to-end model;
the memory's row width swept follows its plan unless --memory-width is given.

    cd benchmarks && python tune_decode.py --out tune.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math

import torch
from profile_step import _graph_ms

from longllama.plan import ExecutionPlan, parse_overrides

H, D = 32, 100  # the 3B shape's heads and head_dim


_FLUSH: list[float] = []


def flushed_ms(fn, scratch: torch.Tensor) -> float:
    """ms per call of fn with a 64 MiB write before each (evicts L2), less the write's own time (timed once)."""

    def both():
        scratch.zero_()
        fn()

    if not _FLUSH:
        _FLUSH.append(min(_graph_ms(scratch.zero_) for _ in range(3)))
    return _graph_ms(both) - _FLUSH[0]


def _part(keys, values, n: int, local: bool, chunk: int, slot: torch.Tensor, q: torch.Tensor):
    """Arguments of one `partials` launch over all n keys (as decode_attention.attend passes them) and its grid."""
    rows = q.shape[0] * q.shape[1]
    count = -(-n // chunk)
    acc = torch.empty(rows, count, 128, dtype=torch.float32, device="cuda")
    m = torch.empty(rows, count, dtype=torch.float32, device="cuda")
    lsum = torch.empty_like(m)
    args = (
        q,
        keys,
        values,
        acc,
        m,
        lsum,
        slot,
        slot,
        n,
        0,
        count,
        H,
        1,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        values.stride(0),
        values.stride(1),
        1.4426950408889634 / math.sqrt(D),
        chunk,
        D,
        m,  # the int8 memory's scales (ks, vs) and their strides: unread, as the kernel is not SCALED here
        m,
        0,
        0,
        m,  # the rows' memory table: unread, as the kernel is not ROWS here
    )
    constants = dict(
        S_KN=keys.stride(2),
        S_VN=values.stride(2),
        D_READ=min(keys.shape[-1], 112),
        FROM_PTR=local,
        HAS_LO=False,
        BLOCK_D=128,
    )
    return (rows, count), args, constants


def sweep(shapes, chunks, configs, scratch) -> list[dict]:
    """Time `partials` for every (shape, chunk, BLOCK_N, num_warps, num_stages)."""
    from longllama.fast import decode_kernels

    fn = decode_kernels.partials.fn  # the kernel without the autotuner
    q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16)
    records = []
    for name, (n, width, local) in shapes.items():
        keys, values = (
            torch.nn.functional.pad(torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16), (0, width - D))
            for _ in range(2)
        )
        slot = torch.tensor([n - 1], device="cuda")
        gbytes = 2 * H * n * width * 2 / 1e9
        for chunk in chunks[name]:
            grid, args, constants = _part(keys, values, n, local, chunk, slot, q)
            for block_n, warps, stages in configs:

                def call():
                    fn[grid](*args, **constants, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

                try:
                    ms = flushed_ms(call, scratch)
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or launch
                    print(f"{name} chunk {chunk} {block_n}/{warps}/{stages}: failed ({type(exc).__name__})")
                    continue
                records.append(
                    dict(
                        shape=name,
                        n=n,
                        width=width,
                        chunk=chunk,
                        block_n=block_n,
                        warps=warps,
                        stages=stages,
                        us=round(ms * 1e3, 2),
                        gb_s=round(gbytes / ms * 1e3),
                    )
                )
        del keys, values
        best = sorted((r for r in records if r["shape"] == name), key=lambda r: r["us"])[:6]
        print(f"== {name}: {n} keys, rows {width} wide; best of {len(configs)} configurations x chunks {chunks[name]}")
        for r in best:
            print(
                f"  chunk {r['chunk']:5d} BLOCK_N {r['block_n']:3d} warps {r['warps']} stages {r['stages']}: "
                f"{r['us']:8.1f} us {r['gb_s']:5d} GB/s"
            )
        for chunk in chunks[name]:
            top = min(
                (r for r in records if r["shape"] == name and r["chunk"] == chunk), key=lambda r: r["us"], default=None
            )
            if top:
                print(f"  best at chunk {chunk:5d}: {top['us']:8.1f} us")
    return records


def choose(records, targets=(1024, 2048, 4096, 8192), min_chunks=(32, 64, 128, 256)):
    """The sweep's choices: the plan's decode_min_chunk and decode_programs whose shapes' best times, each relative
    to that shape's best anywhere, sum to the least (the local cache is read in chunks of decode_min_chunk, the
    memories in decode_attention.chunk_for's); per chunk the best configuration."""
    from longllama.fast import decode_attention

    lengths = {"local": 2048, "memory 32k": 32768, "memory 256k": 262144}

    def best(shape, chunk):
        return min(
            (r for r in records if r["shape"] == shape and r["chunk"] == chunk), key=lambda r: r["us"], default=None
        )

    fastest = {s: min(r["us"] for r in records if r["shape"] == s) for s in lengths}
    options = []
    for min_chunk in min_chunks:
        for target in targets:
            split = {"programs": target, "min_chunk": min_chunk}
            chunks = {s: decode_attention.chunk_for(n, H, **split) for s, n in lengths.items()}
            chunks["local"] = min_chunk  # the local cache: always in chunks of decode_min_chunk
            picks = [best(s, chunk) for s, chunk in chunks.items()]
            if all(picks):
                options.append((sum(p["us"] / fastest[p["shape"]] for p in picks), min_chunk, target, picks))
    _, min_chunk, target, picks = min(options, key=lambda o: o[0])
    return min_chunk, target, picks


@contextlib.contextmanager
def table_in_force(card: str, choice: dict | None):
    """Inside the `with` block the sweep's table rows are this GPU's kernel table (written as `longllama tune` writes
    it, in the cache folder), the file as it was restored after; None: the tables as they are. The kernel's choices
    made before are dropped on both sides, so that each setting chooses its own."""
    from longllama.evals.records import replace_atomically
    from longllama.fast import decode_kernels, tuning

    partials = decode_kernels.partials
    path = tuning.file_for(card)
    before = path.read_bytes() if choice is not None and path.exists() else None
    try:
        if choice is not None:
            rows = {
                ("torch.bfloat16", p["chunk"], D, min(p["width"], 112)): (
                    {"BLOCK_N": p["block_n"]},
                    p["warps"],
                    p["stages"],
                )
                for p in choice["picks"]
            }
            tuning.write(path, card, {partials.name: (partials.key, rows)})
        partials.forget()
        yield
    finally:
        if choice is not None:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                replace_atomically(path, lambda temp: temp.write_bytes(before))
        partials.forget()


def end_to_end(settings, lengths, tokens: int, changes: dict, card: str) -> list[dict]:
    """Greedy and sampling decoding after each prompt length, per setting (name, the sweep's choice or None for the
    shipped tables and split), with the model's plan changed by `changes` (and by the choice's split)."""
    import bench_inference as bench

    torch.manual_seed(0)
    model = bench._longllama("3b", "cuda")
    model.set_plan(**changes)
    print(f"plan: {model.plan}")
    base = model.plan
    vocab = model.config.vocab_size
    bench.ingest(model, torch.randint(3, vocab, (1, 4096), device="cuda"), hf=False)
    records = []
    for after in lengths:
        ids = torch.randint(3, vocab, (1, after), device="cuda")
        for name, choice in settings:
            split = {} if choice is None else {
                "decode_min_chunk": choice["min_chunk"], "decode_programs": choice["target_programs"]
            }  # fmt: skip
            model.set_plan(**{**changes, "decode_min_chunk": base.decode_min_chunk,
                              "decode_programs": base.decode_programs, **split})  # fmt: skip
            with table_in_force(card, choice):
                for mode in ("greedy", "sampling"):
                    ms, warm = bench.decode_ms(model, ids, tokens, hf=False, sample=mode == "sampling")
                    records.append(
                        dict(
                            setting=name,
                            tokens=after,
                            mode=mode,
                            ms_per_token=round(ms, 3),
                            warmup_seconds=round(warm, 1),
                            min_chunk=model.plan.decode_min_chunk,
                            target_programs=model.plan.decode_programs,
                            plan=bench.plan_record(model),
                        )
                    )
                    print(f"decode after {after:7d} ({mode:8s}) {name:8s}: {ms:.3f} ms/token (warm-up {warm:.1f} s)")
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-after", default="32768,262144")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--block-n", default="16,32,64", help="BLOCK_N values swept")
    ap.add_argument("--warps", default="1,2,4,8", help="num_warps values swept")
    ap.add_argument("--stages", default="1,2,3", help="num_stages values swept")
    ap.add_argument(
        "--memory-width",
        type=int,
        default=None,
        help="the memory's stored row width swept (default: the plan's, 112 for the 3B model)",
    )
    ap.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an execution-plan field of the end-to-end model (repeatable), e.g. memory_width=64",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    changes = parse_overrides(args.plan)
    memory_width = args.memory_width or ExecutionPlan(device="cuda").replace(**changes).memory_storage_dim(D)

    card = torch.cuda.get_device_name()
    print(card, torch.__version__, datetime.date.today().isoformat())
    scratch = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    result = dict(device=card, date=datetime.date.today().isoformat())
    if not args.skip_sweep:

        def ints(text):
            return [int(x) for x in text.split(",") if x]

        configs = [(n, w, s) for n in ints(args.block_n) for w in ints(args.warps) for s in ints(args.stages)]
        shapes = {
            "local": (2048, 104, True),
            "memory 32k": (32768, memory_width, False),
            "memory 256k": (262144, memory_width, False),
        }
        chunks = {
            "local": [32, 64, 128, 256],
            "memory 32k": [128, 256, 512, 1024, 2048],
            "memory 256k": [1024, 2048, 4096, 8192],
        }
        result["sweep"] = sweep(shapes, chunks, configs, scratch)
        min_chunk, target, picks = choose(result["sweep"])
        result["choice"] = dict(min_chunk=min_chunk, target_programs=target, picks=picks)
        print(f"choice: decode_min_chunk {min_chunk}, decode_programs {target}; table rows:")
        for p in picks:
            print(f"  ({p['chunk']}, {min(p['width'], 112)}, {p['block_n']}, {p['warps']}, {p['stages']})")

    settings = [("shipped", None)]
    if "choice" in result:
        settings.append(("tuned", result["choice"]))
    lengths = [int(t) for t in args.decode_after.split(",") if t and int(t)]
    result["decode"] = end_to_end(settings, lengths, args.decode_tokens, changes, card)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
