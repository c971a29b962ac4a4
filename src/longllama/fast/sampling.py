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

`sample_rows` draws for chosen rows of a batch of independent sequences (batch.py), each row with its own settings
and its own key for the random draws, in one launch: a batch's rows sampled one by one through the warpers cost
~0.25 ms per row and step on an H100 (benchmarks/HISTORY.md, "Eight rows a step").
"""

from __future__ import annotations

import functools

import torch

from longllama.fast import kernels

MAX_VOCAB = 65536  # one program holds a row in registers; larger vocabularies take the warpers


@functools.lru_cache(maxsize=1)
def _kernels():
    from longllama.fast import sampling_kernels

    return sampling_kernels.sample, sampling_kernels.sample_rows


def _options(block: int) -> dict:
    return {} if kernels.interpreting() else {"num_warps": 32 if block >= 16384 else 8}


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
    kernels.launch_fixed(
        "sample",
        _kernels()[0],
        (b,),
        (
            logits,
            logits.stride(0),
            tokens,
            floor,
            seed,
            vocab,
            float(temperature),
            int(top_k) if use_k else 0,
            float(top_p),
        ),
        TOP_K=use_k,
        TOP_P=top_p < 1.0,
        BLOCK=block,
        **_options(block),
    )
    return (tokens, floor) if floors else tokens


def sample_rows(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    out: torch.Tensor,
    *,
    uses_top_k: bool = True,
    uses_top_p: bool = True,
) -> None:
    """A token for each row `rows` (n,) int64 of logits (b, V) (float, rows contiguous), written to out[rows] (out:
    (b,) int64; its other rows are left as they are, e.g. greedy choices). Each drawn row has its own settings, (n,)
    each on logits' device: temperature fp32 (> 0), top_k int32 (V or more: no top-k), top_p fp32 (1: no top-p), and
    seed int64, the key of its random draws, which depend on nothing else (not on the other rows). The tokens kept
    are sample's, as transformers' warpers keep them. `uses_top_k` / `uses_top_p` False: no drawn row has one (the
    kernel skips that search)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = kernels.pow2(logits.shape[1])
    kernels.launch_fixed(
        "sample_rows",
        _kernels()[1],
        (rows.shape[0],),
        (logits, logits.stride(0), rows, out, temperature, top_k, top_p, seeds, logits.shape[1]),
        TOP_K=uses_top_k,
        TOP_P=uses_top_p,
        BLOCK=block,
        **_options(block),
    )
