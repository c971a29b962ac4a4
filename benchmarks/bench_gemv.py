"""Matrix-vector products of decoding (--rows rows of x, bf16; one by default) on the GPU: cuBLAS (F.linear) against
longllama.fast.gemv's Triton kernels (a program per row for one row, the several-row kernels for more),
for the weight shapes of the 3B and Code 7B models: q/k/v stacked in one launch, the output and down projections,
the gate/up pair with its SwiGLU in one pass, lm_head. Weights are read cold, as in a decoding step: each timed call
takes the next of several copies that together overflow the 50 MB L2 cache. Prints microseconds per call, GB/s of
weights read and the error against an fp32 product.

--int4: the same products with int4 weights (longllama.int4: 4-bit codes, a scale and an offset per group of 128
or 64 columns) beside bf16's: cuBLAS and the Triton kernels on bf16 weights, the int4 kernels with the rule's
configuration, and with Triton's autotuner over the kernels' own list (the best configuration printed); GB/s counts the
bytes each reads (int4: codes, scales and offsets). q/k/v and gate/up also with the RMSNorm inside, as decoding runs
them (cuBLAS after the norm's own kernel). --gemlite adds GemLite's int4 product (its one-row split-K kernel over the
same codes, scales and offsets; stacked weights in one layer, the SwiGLU and the RMSNorm in their own kernels), with
its output in bf16 and in fp32 (its programs add their parts of the sum into the output, so a bf16 output is
rounded at every addition; the fp32 one is converted to bf16 after)."""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton.testing

from longllama.fast import gemv
from longllama.ops import rms_norm

L2_BYTES = 50 * 2**20


def _copies(shapes) -> int:
    per_call = sum(n * k * 2 for n, k in shapes)
    return max(2, -(-4 * L2_BYTES // per_call))


def cold_us(fns) -> float:
    """Microseconds per call of one pass over fns (each on its own weights), launches inside a CUDA graph."""

    def run():
        for fn in fns:
            fn()

    run()
    return triton.testing.do_bench_cudagraph(run, rep=200) * 1e3 / len(fns)


def case(name: str, shapes, k: int, ours, theirs, rows: int = 1, autotune: bool = False) -> None:
    """`shapes`: the (N, K) weights of one call; ours(x, weights, **kw) and theirs(x, weights) compute it for `rows`
    rows of x; with `autotune`, ours also with Triton's autotuner over the kernel's configuration list."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    sets = [
        [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for n, kk in shapes]
        for _ in range(_copies(shapes))
    ]
    gbytes = sum(n * kk * 2 for n, kk in shapes) / 1e9
    ref = theirs(x.float(), [w.float() for w in sets[0]])

    runs = [("cuBLAS", theirs, {}), ("triton", ours, {})] + ([("tuned", ours, {"autotune": True})] if autotune else [])
    for path, fn, kw in runs:
        fn(x, sets[0], **kw)  # the autotuner's sweep happens here, untimed
        us = cold_us([lambda ws=ws: fn(x, ws, **kw) for ws in sets])
        err = ((fn(x, sets[0], **kw).float() - ref).norm() / ref.norm()).item()
        print(f"{name:28s} {rows:4d} {path:7s} {us:8.1f} {gbytes / us * 1e6:7.0f} {err:9.2e}")


def random_norm(hidden: int) -> tuple[torch.Tensor, float]:
    """An RMSNorm (weight, eps) as the products' `norm` takes it."""
    return torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5, 1e-6


def after_norm(fn, norm):
    """fn on rms_norm(x): the unfused baseline (cuBLAS after the norm's own kernel) of a product with `norm` inside."""
    return lambda x, ws: fn(rms_norm(x, norm[0].to(x.dtype), norm[1]), ws)


def gemlite_layer(weight, fp32_output: bool = False):
    """A GemLite int4 layer computing `weight` (an Int4Weight): the same codes, scales and offsets; its output in
    fp32 with `fp32_output`, else in bf16."""
    import gemlite

    from longllama import int4

    n, k = weight.shape
    output = gemlite.DType.FP32 if fp32_output else gemlite.DType.BF16
    layer = gemlite.GemLiteLinear(4, weight.group, k, n, gemlite.DType.BF16, output)
    layer.pack(int4.codes(weight.qdata), weight.scale, torch.zeros_like(weight.scale))  # a weight: code * scale + zero
    with torch.no_grad():
        layer.zeros.copy_(weight.offset.t())  # the zero added is our offset itself
    return layer


def gemlite_product(kind: str, norm=None):
    """fn(x, layers) for one GemLite layer: "one" (o, down, stacked q/k/v) or "swiglu" (gate and up stacked)."""

    def fn(x, layers):
        x = x if norm is None else rms_norm(x, norm[0].to(x.dtype), norm[1])
        y = layers[0](x).to(x.dtype)
        if kind == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y

    return fn


def int4_case(name: str, shapes, k: int, product, baseline, theirs=None, tuned: bool = True) -> None:
    """One product of one row: bf16 weights (cuBLAS, the kernels) against int4 ones (rule, and autotuned with
    `tuned`); `theirs`: also GemLite's product (gemlite_product) over the same int4 weights stacked in one layer."""
    from longllama import int4
    from longllama.fast import gemv_int4_kernels

    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    group = int4.group_of(k)
    copies = 4 * _copies(shapes)
    dense = [
        [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for n, kk in shapes] for _ in range(copies)
    ]
    packed = [[int4.Int4Weight.from_float(w, group) for w in ws] for ws in dense]
    ref = baseline(x.float(), [w.dequantize().float() for w in packed[0]])
    dense_gb = sum(n * kk * 2 for n, kk in shapes) / 1e9
    int4_gb = sum(n * kk // 2 + 2 * 2 * n * kk // group for n, kk in shapes) / 1e9
    runs = (
        ("cuBLAS", dense, baseline, {}, dense_gb),
        ("triton", dense, product, {}, dense_gb),
        ("int4", packed, product, {}, int4_gb),
    ) + ((("int4-tuned", packed, product, {"autotune": True}, int4_gb),) if tuned else ())
    if theirs is not None:
        merged = [
            int4.Int4Weight.from_float(torch.cat(ws), group) if len(ws) > 1 else quantized[0]
            for ws, quantized in zip(dense, packed)
        ]
        for path, fp32 in (("gemlite", False), ("gemlite-f32", True)):
            runs += ((path, [[gemlite_layer(w, fp32)] for w in merged], theirs, {}, int4_gb),)
    for path, sets, fn, kw, gb in runs:
        fn(x, sets[0], **kw)  # the autotuner's sweep happens here, untimed
        us = cold_us([lambda ws=ws: fn(x, ws, **kw) for ws in sets])
        quantized = path.startswith(("int4", "gemlite"))
        err = ((fn(x, sets[0], **kw).float() - ref).norm() / ref.norm()).item() if quantized else 0.0
        print(f"{name:28s} {path:10s} {us:8.1f} {gb / us * 1e6:7.0f} {err:9.2e}")
    for kernel in (gemv_int4_kernels.gemv_int4, gemv_int4_kernels.gemv_int4_swiglu):
        for key, choice in kernel.tuned.items():
            if key[2:4] == (sum(n for n, _ in shapes) if kernel.name == "gemv_int4" else shapes[0][0], k):
                print(f"{'':28s} best {kernel.name}: {choice}")


def main_int4(args) -> None:
    from longllama.fast import gemv_int4_kernels

    swept = 0 if args.rule_only else len(gemv_int4_kernels.gemv_int4.configs)
    print(f"{torch.cuda.get_device_name()}, {swept} int4 configurations swept per product")
    print(f"{'product':28s} {'path':10s} {'us':>8s} {'GB/s':>7s} {'rel err':>9s}")
    stacked = lambda x, ws, **kw: gemv.linear_stacked(x, tuple(ws), max_rows=16, **kw)  # noqa: E731
    single = lambda x, ws, **kw: gemv.linear(x, ws[0], max_rows=16, **kw)  # noqa: E731
    paired = lambda x, ws, **kw: gemv.linear_swiglu(x, *ws, max_rows=16, **kw)  # noqa: E731
    cat = lambda x, ws: torch.cat([F.linear(x, w) for w in ws], -1)  # noqa: E731
    one = lambda x, ws: F.linear(x, ws[0])  # noqa: E731
    swiglu = lambda x, ws: F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1])  # noqa: E731
    shapes = {"3b": (3200, 8640), "code-7b": (4096, 11008)}

    def case(*a) -> None:
        int4_case(*a, tuned=not args.rule_only)

    def g(kind: str, norm=None):  # GemLite's product beside the others, with --gemlite
        return gemlite_product(kind, norm) if args.gemlite else None

    for shape in args.shapes.split(","):
        hidden, inter = shapes[shape]
        norm = random_norm(hidden)
        case(f"{shape} q/k/v {3 * hidden}x{hidden}", [(hidden, hidden)] * 3, hidden, stacked, cat, g("one"))
        case(f"{shape} o {hidden}x{hidden}", [(hidden, hidden)], hidden, single, one, g("one"))
        case(f"{shape} gate/up+SwiGLU {inter}x{hidden}", [(inter, hidden)] * 2, hidden, paired, swiglu, g("swiglu"))
        case(f"{shape} down {hidden}x{inter}", [(hidden, inter)], inter, single, one, g("one"))
        # As a decoding step runs q/k/v and gate/up: the RMSNorm in the same pass (each program normalises x)
        normed = lambda f: lambda x, ws, **kw: f(x, ws, norm=norm, **kw)  # noqa: E731
        case(
            f"{shape} q/k/v +RMSNorm",
            [(hidden, hidden)] * 3,
            hidden,
            normed(stacked),
            after_norm(cat, norm),
            g("one", norm),
        )
        case(
            f"{shape} gate/up+SwiGLU +RMSNorm",
            [(inter, hidden)] * 2,
            hidden,
            normed(paired),
            after_norm(swiglu, norm),
            g("swiglu", norm),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1", help="rows of x, e.g. 1,2,4,8,16 (at most 16: the kernels' limit)")
    ap.add_argument("--shapes", default="3b,code-7b")
    ap.add_argument("--int4", action="store_true", help="int4 weights against bf16, one row (see above)")
    ap.add_argument("--autotune", action="store_true", help="also the kernels' autotuned choice (printed at the end)")
    ap.add_argument("--gemlite", action="store_true", help="with --int4: also GemLite's int4 product (pip gemlite)")
    ap.add_argument("--rule-only", action="store_true", help="with --int4: the int4 kernels at their rule, no sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.int4:
        main_int4(args)
        return
    print(f"{torch.cuda.get_device_name()}\n{'product':28s} rows {'path':7s} {'us':>8s} {'GB/s':>7s} {'rel err':>9s}")
    kw = dict(max_rows=16)
    shapes = (("3b", 3200, 8640, 32000), ("code-7b", 4096, 11008, 32016))
    tune = args.autotune
    for (shape, hidden, inter, vocab), rows in itertools.product(shapes, [int(r) for r in args.rows.split(",")]):
        if shape not in args.shapes.split(","):
            continue

        def cat(x, ws):
            return torch.cat([F.linear(x, w) for w in ws], -1)

        def one(x, ws):
            return F.linear(x, ws[0])

        def swiglu(x, ws):
            return F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1])

        case(
            f"{shape} q/k/v {3 * hidden}x{hidden}",
            [(hidden, hidden)] * 3,
            hidden,
            lambda x, ws, **t: gemv.linear_stacked(x, tuple(ws), **kw, **t),
            cat,
            rows,
            tune,
        )
        # As a decoding step runs them: the RMSNorm before the product (one row: in the same pass, each program
        # summing the squares of its row first; several rows: the norm's own kernel first), against cuBLAS after it.
        norm = random_norm(hidden)
        case(
            f"{shape} q/k/v +RMSNorm",
            [(hidden, hidden)] * 3,
            hidden,
            lambda x, ws, **t: gemv.linear_stacked(x, tuple(ws), norm=norm, **kw, **t),
            after_norm(cat, norm),
            rows,
        )
        one_ours = lambda x, ws, **t: gemv.linear(x, ws[0], **kw, **t)  # noqa: E731
        case(f"{shape} o {hidden}x{hidden}", [(hidden, hidden)], hidden, one_ours, one, rows, tune)
        case(
            f"{shape} gate/up+SwiGLU {inter}x{hidden}",
            [(inter, hidden)] * 2,
            hidden,
            lambda x, ws, **t: gemv.linear_swiglu(x, *ws, **kw, **t),
            swiglu,
            rows,
            tune,
        )
        case(
            f"{shape} gate/up+SwiGLU +RMSNorm",
            [(inter, hidden)] * 2,
            hidden,
            lambda x, ws, **t: gemv.linear_swiglu(x, *ws, norm=norm, **kw, **t),
            after_norm(swiglu, norm),
            rows,
        )
        case(f"{shape} down {hidden}x{inter}", [(hidden, inter)], inter, one_ours, one, rows, tune)
        case(f"{shape} lm_head {vocab}x{hidden}", [(vocab, hidden)], hidden, one_ours, one, rows, tune)
    if tune:
        from longllama.fast import gemv_kernels

        for kernel in (
            gemv_kernels.gemv,
            gemv_kernels.gemv_swiglu,
            gemv_kernels.gemv_rows,
            gemv_kernels.gemv_rows_swiglu,
        ):
            for key, choice in kernel.tuned.items():
                print(f"best {kernel.name} {dict(zip(kernel.key, key[2:]))}: {choice}")


if __name__ == "__main__":
    main()
