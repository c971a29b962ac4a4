"""Attention kernels that return a log-sum-exp, on the memory-attention shape: 2048 queries x M keys, 32 heads,
bf16, head_dim 100 zero-padded to 104 or 128. Prints time and TFLOP/s counted on the true head_dim 100."""

from __future__ import annotations

import torch
import triton.testing

from longllama.attention import partial_attention


def main() -> None:
    torch.manual_seed(0)
    m = 65536
    print(f"{'kernel':10s} {'dim':>4s} {'ms':>8s} {'TFLOP/s (d=100)':>16s}")
    for dim in (104, 128):
        q = torch.randn(1, 32, 2048, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 32, m, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 32, m, dim, device="cuda", dtype=torch.bfloat16)
        for kernel in ("flash", "cudnn", "efficient"):
            try:
                fn = lambda: partial_attention(q, k, v, causal=False, scale=0.1, kernel=kernel)  # noqa: E731
                fn()
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            except RuntimeError as exc:
                print(f"{kernel:10s} {dim:4d} failed: {str(exc).splitlines()[0][:100]}")
                continue
            flops = 4 * 32 * 2048 * m * 100
            print(f"{kernel:10s} {dim:4d} {ms:8.3f} {flops / ms / 1e9:16.1f}")


if __name__ == "__main__":
    main()
