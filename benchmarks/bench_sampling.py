"""Drawing a step's sampled tokens on one GPU: transformers' warpers and `torch.multinomial` row by row (how the batch
engine sampled before) against one launch of the sampling kernel for all rows (`sampling.sample_rows`, the batch
engine's path on GPUs), for 1 and 8 rows of a 32,000-token vocabulary, temperature 1, without and with top-p 0.9.
Each figure is the time of a call, host and GPU together (200 calls, synchronized once at the end).

    cd benchmarks && python bench_sampling.py
"""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from longllama.fast import sampling

VOCAB = 32000
CALLS = 200


def _ms_per_call(fn) -> float:
    for _ in range(5):  # compile, allocate
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS * 1e3


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    for rows in (1, 8):
        for top_p in (1.0, 0.9):
            logits = torch.randn(rows, VOCAB, device="cuda") * 3
            warpers = [TemperatureLogitsWarper(1.0)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
            processors = [LogitsProcessorList(warpers) for _ in range(rows)]
            generators = [torch.Generator("cuda").manual_seed(i) for i in range(rows)]

            def by_rows():
                tokens = logits.argmax(-1)
                for i in range(rows):
                    probs = torch.softmax(processors[i](None, logits[i : i + 1]), -1)
                    tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0, 0]
                return tokens

            indices = torch.arange(rows, device="cuda")
            temperature = torch.ones(rows, device="cuda")
            top_k = torch.full((rows,), VOCAB, dtype=torch.int32, device="cuda")
            top_ps = torch.full((rows,), top_p, device="cuda")

            def one_launch():
                tokens = logits.argmax(-1)
                seeds = torch.arange(rows, dtype=torch.long).pin_memory().to("cuda", non_blocking=True)
                sampling.sample_rows(
                    logits, indices, temperature, top_k, top_ps, seeds, tokens, uses_top_k=False, uses_top_p=top_p < 1
                )
                return tokens

            for name, fn in (("warpers, row by row", by_rows), ("sample_rows, one launch", one_launch)):
                ms = _ms_per_call(fn)
                print(f"{rows} rows, top_p {top_p}, {name}: {ms:.3f} ms a call", flush=True)


if __name__ == "__main__":
    main()
