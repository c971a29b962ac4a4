"""How much a pool of threads speeds up compiling Triton kernels (what kernels.compile_ahead relies on): 16 distinct
specialisations of the RMSNorm kernel (fast/elementwise_kernels.py) compiled one after another, or on a pool of
threads, each with its launcher built and its binary loaded, as a first launch does. Run each mode in a new process
with an empty Triton cache:

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probe_compile_threads.py seq 1
    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probe_compile_threads.py pool 8

Prints the seconds of importing torch and Triton, making Triton's driver, and the 16 compilations (wall, and the
sum and largest of each compilation's own seconds). Needs a CUDA GPU.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    mode, threads = sys.argv[1], int(sys.argv[2])
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import triton

    t2 = time.perf_counter()
    triton.runtime.driver.active.get_current_target()  # makes the driver (its CUDA module is built on an empty cache)
    t3 = time.perf_counter()
    from longllama.fast import elementwise_kernels

    device = torch.device("cuda")
    # distinct row lengths: distinct kernels; the two modes use different ones, so neither reads the other's
    sizes = [96 + 64 * i + (0 if mode == "seq" else 32) for i in range(16)]

    def one(n: int) -> float:
        start = time.perf_counter()
        with torch.cuda.device(device):
            x = torch.empty(4, n, device=device, dtype=torch.bfloat16)
            w = torch.empty(n, device=device, dtype=torch.bfloat16)
            kernel = elementwise_kernels.rms_norm_rows.warmup(
                x, x, w, x, x, 1e-6, N=n, ADD=True, BLOCK_N=triton.next_power_of_2(n), grid=(4,), num_warps=4
            )
            kernel._init_handles()
        return time.perf_counter() - start

    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    if mode == "seq":
        each = [one(n) for n in sizes]
    else:
        with ThreadPoolExecutor(threads) as pool:
            each = list(pool.map(one, sizes))
    t5 = time.perf_counter()
    print(
        f"{mode} threads={threads}: import torch {t1 - t0:.2f} import triton {t2 - t1:.2f} driver utils "
        f"{t3 - t2:.2f} 16 kernels {t5 - t4:.2f} s (sum of each {sum(each):.2f}, max {max(each):.2f})"
    )


if __name__ == "__main__":
    main()
