"""Matrix-vector products of decoding (one row of x, bf16) on the GPU: cuBLAS (F.linear) against longllama.gemv's
Triton kernel, for the weight shapes of the 3B and Code 7B models; and the gate/up/SwiGLU pair in one pass against
two products and a SwiGLU. Prints microseconds, GB/s of weights read and the error against an fp32 product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

from longllama import gemv

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640), (32000, 3200), (4096, 4096), (11008, 4096), (4096, 11008)]


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3  # microseconds, launches inside a CUDA graph


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}\n{'N x K':>13s} {'path':18s} {'us':>8s} {'GB/s':>7s} {'rel err':>9s}")
    for n, k in SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ref = x.float() @ w.float().T
        for name, fn in (("cuBLAS", lambda: F.linear(x, w)), ("triton gemv", lambda: gemv.linear(x, w))):
            us = bench(fn)
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            print(f"{n:6d} x {k:5d} {name:18s} {us:8.1f} {w.numel() * 2 / us / 1e3:7.0f} {err:9.2e}")
    for n, k in ((8640, 3200), (11008, 4096)):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        g, u = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
        ref = F.silu(x.float() @ g.float().T) * (x.float() @ u.float().T)
        paths = (("cuBLAS x2 + SwiGLU", lambda: F.silu(F.linear(x, g)) * F.linear(x, u)),
                 ("triton gate+up", lambda: gemv.linear_swiglu(x, g, u)))
        for name, fn in paths:
            us = bench(fn)
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            print(f"{n:6d} x {k:5d} {name:18s} {us:8.1f} {2 * g.numel() * 2 / us / 1e3:7.0f} {err:9.2e}")


if __name__ == "__main__":
    main()
