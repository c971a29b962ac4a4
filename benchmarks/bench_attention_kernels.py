"""Fused attention kernels on LongLLaMA's shapes, one GPU: cuDNN and FlashAttention 2 (through torch) against
FlashAttention 4 (the `flash-attn-4` package, CuTe DSL; skipped when it is not installed), at the padded head
dimensions a head_dim-100 model can use. Memory attention (non-causal, many keys) and local windows (causal).
TFLOP/s are counted on head_dim 100 (the useful work); the output and log-sum-exp of each kernel are compared with
cuDNN's. The first call of each FlashAttention 4 configuration compiles it (seconds), timed separately.

    PYTHONPATH=src python benchmarks/bench_attention_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _fa4():
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as exc:
        print(f"flash-attn-4 not importable ({exc}); its rows are skipped")
        return None
    return flash_attn_func


def partial(kernel: str, q, k, v, causal: bool, scale: float, fa4=None):
    """(out (b, h, n, d), lse (b, h, n) fp32) of one kernel; q, k, v (b, h, n, d)."""
    if kernel == "fa4":
        out, lse = fa4(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal, return_lse=True
        )
        return out.transpose(1, 2), lse
    ops = torch.ops.aten
    if kernel == "cudnn":
        out, lse = ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def case(name: str, batch: int, queries: int, keys: int, causal: bool, dims, fa4, records: list, reps: int) -> None:
    pairs = batch * 32 * queries * keys * (0.5 if causal else 1.0)
    print(f"== {name}: {batch} x {queries} queries x {keys} keys, 32 heads{', causal' if causal else ''}")
    for dim in dims:
        base = None
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(batch, 32, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for n in (queries, keys, keys)
        )
        for t in (q, k, v):
            t[..., 100:] = 0  # zero padding, as the model's tensors
        for kernel in ("cudnn", "flash", "fa4"):
            if kernel == "fa4" and fa4 is None:
                continue
            if kernel == "flash" and dim > 104:
                continue  # FlashAttention 2 pads internally; 104 is its best (profile_step.py)
            fn = lambda kernel=kernel, q=q, k=k, v=v: partial(kernel, q, k, v, causal, 0.1, fa4)  # noqa: E731
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                out, lse = fn()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a kernel that refuses a shape is a result
                print(f"  {kernel:5s} d={dim}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            first = (time.perf_counter() - t0) * 1e3
            if base is None:
                base = (out[..., :100].float(), lse)
            err = (out[..., :100].float() - base[0]).abs().max().item()
            lerr = (lse.float() - base[1]).abs().max().item()
            ms = timed(fn, reps)
            tflops = 4 * pairs * 100 / ms / 1e9
            print(
                f"  {kernel:5s} d={dim}: {ms:8.3f} ms {tflops:6.1f} TFLOP/s (d=100 counted)  first call "
                f"{first:8.1f} ms  |out - cudnn| {err:.1e}  |lse - cudnn| {lerr:.1e}"
            )
            records.append(
                {
                    "case": name,
                    "kernel": kernel,
                    "dim": dim,
                    "batch": batch,
                    "queries": queries,
                    "keys": keys,
                    "causal": causal,
                    "ms": round(ms, 4),
                    "tflops_d100": round(tflops, 1),
                    "first_call_ms": round(first, 1),
                    "max_abs_out_vs_cudnn": err,
                    "max_abs_lse_vs_cudnn": lerr,
                }
            )
        del q, k, v


def fa4_tiles(dim: int, keys: int, tiles, fa4_fwd) -> None:
    """FlashAttention 4's forward at one head dimension over its tile shapes and options (2048 queries)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, n, 32, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (2048, keys, keys)
    )
    print(f"== FlashAttention 4 tiles, d={dim}: 2048 queries x {keys} keys, 32 heads")
    for tile_m, tile_n, rs, overlap in tiles:
        fn = lambda: fa4_fwd(
            q,
            k,
            v,
            softmax_scale=0.1,
            tile_mn=(tile_m, tile_n),
            mma_pv_is_rs=rs,  # noqa: E731
            intra_wg_overlap=overlap,
            return_lse=True,
        )
        try:
            ms = timed(fn, 5)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a result
            print(
                f"  {tile_m}x{tile_n} rs={rs} overlap={overlap}: failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:100] if str(exc) else ''}"
            )
            continue
        print(
            f"  {tile_m}x{tile_n} rs={rs} overlap={overlap}: {ms:8.3f} ms "
            f"{4 * 32 * 2048 * keys * 100 / ms / 1e9:6.1f} TFLOP/s (d=100 counted)"
        )


def layouts(dim: int, fa4) -> None:
    """Memory stored head-major (batch, heads, keys, dim) against sequence-major (batch, keys, heads, dim): the same
    kernels on both, 2048 queries (and 4 windows of a group, each its own prefix, for FlashAttention 4)."""
    from flash_attn.cute import flash_attn_varlen_func

    for keys in (65536, 262144):
        print(f"== layouts, d={dim}: 2048 queries x {keys} keys, 32 heads")
        for layout in ("bhsd", "bshd"):
            shape = (1, 32, keys, dim) if layout == "bhsd" else (1, keys, 32, dim)
            k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            kh, vh = (k, v) if layout == "bhsd" else (k.transpose(1, 2), v.transpose(1, 2))  # (1, h, M, d) views
            q = torch.randn(4, 32, 2048, dim, device="cuda", dtype=torch.bfloat16)
            used = torch.tensor([keys - 6144, keys - 4096, keys - 2048, keys], dtype=torch.int32, device="cuda")
            runs = {
                "cudnn": lambda: partial("cudnn", q[:1], kh, vh, False, 0.1),
                "fa4": lambda: partial("fa4", q[:1], kh, vh, False, 0.1, fa4),
                "fa4 group of 4": lambda: flash_attn_varlen_func(
                    q.transpose(1, 2),
                    kh.transpose(1, 2).expand(4, -1, -1, -1),
                    vh.transpose(1, 2).expand(4, -1, -1, -1),
                    seqused_k=used,
                    softmax_scale=0.1,
                    return_lse=True,
                ),
            }
            for name, fn in runs.items():
                ms = timed(fn, 5)
                pairs = 32 * 2048 * (used.sum().item() if "group" in name else keys)
                print(f"  {layout} {name:15s}: {ms:8.3f} ms {4 * pairs * 100 / ms / 1e9:6.1f} TFLOP/s (d=100)")


def chunks(dim: int, fa4, keys: int = 262144) -> None:
    """One call over a long memory against the memory read in chunks of C keys merged by their log-sum-exp (the
    CTAs of a head stay closer together over a shorter chunk, so the keys they share stay in L2), and FlashAttention
    4's own split-KV (num_splits); 2048 queries, head-major memory."""
    from flash_attn.cute import flash_attn_varlen_func

    from longllama.ops import merge_partials

    q = torch.randn(1, 32, 2048, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 32, keys, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    print(f"== chunks, d={dim}: 2048 queries x {keys} keys, 32 heads")
    flops = 4 * 32 * 2048 * keys * 100

    def chunked(kernel, c):
        acc = None
        for start in range(0, keys, c):
            out, lse = partial(kernel, q, k[:, :, start : start + c], v[:, :, start : start + c], False, 0.1, fa4)
            acc = (out.float(), lse) if acc is None else merge_partials(*acc, out, lse, with_lse=True)
        return acc

    for kernel in ("cudnn", "fa4"):
        for c in (keys, 65536, 32768, 16384, 8192):
            ms = timed(lambda kernel=kernel, c=c: chunked(kernel, c), 3)
            print(f"  {kernel:5s} chunks of {c:6d}: {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s (d=100)")
    for splits in (2, 4, 8, 16):
        try:
            ms = timed(
                lambda splits=splits: flash_attn_varlen_func(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    softmax_scale=0.1,
                    num_splits=splits,
                    return_lse=True,
                ),
                3,
            )
        except Exception as exc:  # noqa: BLE001 - unsupported here is a result
            print(f"  fa4 num_splits={splits}: failed: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        print(f"  fa4 num_splits={splits:2d}: {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s (d=100)")


def group_tiles(dims, reps: int, tiles, m: int = 262144, splits=()) -> None:
    """longllama's FlashAttention 4 call for a window group (4 windows x 2048 queries, each seeing its own prefix of a
    256k-key memory, fast.flash4.memory_attention) per stored memory width and tile shape (the plan's fa4_tiles;
    None: the package's own). Head dimension 100 zero-padded (128 for width 128, the Code 7B shape); outputs compared
    with fp32 maths on two heads."""
    from longllama.fast import flash4
    from longllama.ops import merge_memory_parts
    from longllama.plan import ExecutionPlan

    base = ExecutionPlan(device="cuda", attention="fast")
    if not flash4.usable(torch.empty(1, 1, 1, 112, device="cuda", dtype=torch.bfloat16), base):
        print("FlashAttention 4 not usable here; --group-tiles skipped")
        return
    n = 2048
    used = [m - 3 * n, m - 2 * n, m - n, m]
    for width in dims:
        d = 128 if width == 128 else 100
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.nn.functional.pad(
                torch.randn(b, 32, s, d, device="cuda", dtype=torch.bfloat16, generator=gen), (0, width - d)
            )
            for b, s in ((4, n), (1, m), (1, m))
        )
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as the ingest path lays q out
        want = []
        for i, u in enumerate(used):
            s = q[i, :2].float() @ k[0, :2, :u].float().transpose(-1, -2) * 0.1
            want.append((torch.softmax(s, -1) @ v[0, :2, :u, :d].float(), s.logsumexp(-1)))
        flops = 4 * 32 * n * sum(used) * d
        print(
            f"== window group: 4 x {n} queries over prefixes {used} of {m} keys, 32 heads, memory {width} wide "
            f"(head_dim {d}), FlashAttention 4"
        )
        for tile in tiles:
            plan = base.replace(fa4_tiles={} if tile is None else {width: tile})
            name = "the package's tile" if tile is None else f"tile {tile[0]}x{tile[1]} rs={tile[2]} overlap={tile[3]}"
            one = lambda plan=plan: flash4.memory_attention(q, k, v, scale=0.1, used=used, plan=plan)  # noqa: E731
            calls = {"one call": (one, one)}
            for s in splits:  # timed: the two kernel calls (the merge is the ingest path's merge with local attention)
                split = plan.replace(key_parts=s)

                def two(split=split):
                    return flash4.group_attention(q, k, v, scale=0.1, used=used, plan=split)

                label = f"split, key parts {s or f'auto ({flash4.key_parts(used[0], split)})'}"
                calls[label] = (two, lambda two=two: merge_memory_parts(two(), width))
            for how, (fn, checked) in calls.items():
                try:
                    with torch.no_grad():
                        out, lse = checked()
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or launch: a result
                    print(f"  {name}, {how}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                e = max((out[i, :2, :, :d].float() - w[0]).abs().max().item() for i, w in enumerate(want))
                el = max((lse[i, :2].float() - w[1]).abs().max().item() for i, w in enumerate(want))
                ms = timed(fn, reps)
                print(
                    f"  {name}, {how}: {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s (d={d})  |out - fp32| {e:.1e}"
                    f"  |lse - fp32| {el:.1e}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--dims", default="104,112,128")
    parser.add_argument("--tiles", action="store_true", help="only sweep FlashAttention 4's tile shapes")
    parser.add_argument("--layouts", action="store_true", help="only compare memory layouts")
    parser.add_argument("--chunks", action="store_true", help="only compare chunked reads of a long memory")
    parser.add_argument(
        "--group-tiles",
        action="store_true",
        help="only longllama's window-group call, per stored width (--dims) and tile shape",
    )
    parser.add_argument("--group-keys", type=int, default=262144, help="--group-tiles: memory keys")
    parser.add_argument("--all-tiles", action="store_true", help="--group-tiles: a wider sweep of tile shapes")
    parser.add_argument(
        "--split",
        default=None,
        help="--group-tiles: also the group as two calls (fast.flash4.group_attention, merged "
        "eagerly) with these key parts of the first, comma-separated (0: flash4.key_parts' "
        "choice)",
    )
    parser.add_argument(
        "--tile-list", default=None, help="--group-tiles: tiles to try, m,n,rs,overlap;... (0: the package's own)"
    )
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    print(torch.cuda.get_device_name(), torch.__version__, "cuDNN", torch.backends.cudnn.version())
    fa4 = _fa4()
    records: list = []
    if args.group_tiles:
        tiles = [
            None,
            (128, 160, True, True),
            (128, 128, False, True),
            (128, 176, False, True),
            (192, 96, False, True),
            (192, 112, False, True),
            (192, 128, False, True),
            (192, 144, False, True),
        ]
        if args.all_tiles:
            tiles = [None] + [
                (tm, tn, rs, ov)
                for tm in (128, 192)
                for tn in range(64, 192, 16)
                for rs in (True, False)
                for ov in (True, False)
                if not (tm == 192 and rs)
            ]
        if args.tile_list:
            tiles = [
                None if t == "0" else tuple(int(x) if i < 2 else bool(int(x)) for i, x in enumerate(t.split(",")))
                for t in args.tile_list.split(";")
            ]
        splits = [int(s) or None for s in args.split.split(",")] if args.split else []
        group_tiles(dims, 5, tiles, args.group_keys, splits)
        return
    if args.chunks:
        for dim in dims:
            chunks(dim, fa4)
        return
    if args.layouts:
        for dim in dims:
            layouts(dim, fa4)
        return
    if args.tiles:
        from flash_attn.cute.interface import _flash_attn_fwd

        tiles = [(m, n, rs, True) for m in (128, 192) for n in (96, 112, 128, 144, 160, 176) for rs in (True, False)]
        for dim in dims:
            fa4_tiles(dim, 65536, tiles, _flash_attn_fwd)
        return
    with torch.no_grad():
        case("memory", 1, 2048, 65536, False, dims, fa4, records, 10)
        case("memory, 4 windows", 1, 8192, 65536, False, dims, fa4, records, 5)
        case("memory", 1, 2048, 262144, False, dims, fa4, records, 5)
        case("windows", 4, 2048, 2048, True, dims, fa4, records, 20)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "records": records},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
