"""Sampling a token from logits with temperature, top-k and top-p in one GPU kernel (sampling_kernels.py).

transformers' warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, then softmax and
torch.multinomial) take about fifteen small kernels per step, a sort of the vocabulary among them: sampling cost
~0.16 ms per token more than greedy decoding of the 3B model on an H100, ~0.07 with this kernel (bench_inference.py,
temperature 0.8, top-p 0.9; benchmarks/RESULTS.md). The kernel keeps the same tokens without
sorting: the top-k floor is the k-th largest scaled logit, the top-p floor the least logit whose larger tokens hold
less than top_p of the top-k mass, both found by bisection; a token is then drawn among the kept ones by the
Gumbel-max rule, with the kept tokens' softmax weights. Where the warpers' sorted order would split tokens of
exactly equal logits at a floor, the kernel keeps them all, and the masses are summed in another order (fp32
rounding), so which tokens are kept can differ only in such ties or at a cumulative mass within rounding of top_p.
The random stream differs from torch.multinomial's: a seed drawn from torch's generator per step makes runs
reproducible under torch.manual_seed.
"""

from __future__ import annotations

import functools

import torch

from longllama.fast import kernels

MAX_VOCAB = 65536  # one program holds a row in registers; larger vocabularies take the warpers


@functools.lru_cache(maxsize=1)
def _kernel():
    from longllama.fast import sampling_kernels

    return sampling_kernels.sample


def applies(logits: torch.Tensor, *, cpu: bool = False) -> bool:
    """Whether the kernel serves logits (b, V): CUDA (or CPU under the interpreter with `cpu`) and V <= MAX_VOCAB."""
    return kernels.usable(logits, cpu=cpu) and logits.dim() == 2 and logits.shape[1] <= MAX_VOCAB


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    floors: bool = False,
):
    """One token per row of logits (b, V) (any float dtype): softmax(logits / temperature) restricted to the top_k
    largest (ties kept) and then to the top-p nucleus of those, as transformers' warpers define them. Returns the
    tokens (b,) int64, and with `floors` also each row's least kept scaled logit (b,) fp32."""
    b, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    floor = torch.empty(b, dtype=torch.float32, device=logits.device)
    seed = torch.randint(0, 2**31 - 1, (1,), device=logits.device)
    use_k = bool(top_k) and top_k < vocab
    block = kernels.pow2(vocab)
    options = {} if kernels.interpreting() else {"num_warps": 32 if block >= 16384 else 8}
    _kernel()[(b,)](
        logits,
        logits.stride(0),
        tokens,
        floor,
        seed,
        vocab,
        float(temperature),
        int(top_k) if use_k else 0,
        float(top_p),
        TOP_K=use_k,
        TOP_P=top_p < 1.0,
        BLOCK=block,
        **options,
    )
    return (tokens, floor) if floors else tokens
