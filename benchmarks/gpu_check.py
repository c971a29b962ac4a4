"""Correctness on the GPU (bf16): longllama equals transformers LLaMA on a short input, and the attention paths agree
on a long one; then the fast paths' parts against fp32 maths (fused attention kernels, FlashAttention 4's memory
attention and its window-group split, kNN memory, the rope kernel, the decoding kernels, the sampler, the static
decoder, the batch decoder, block retrieval over an offloaded memory read in place). Each path is chosen through
the execution plan (`model.set_plan`, or a plan handed to the function).
Prints relative errors ||a - b|| / ||b||; exits non-zero if a bound is missed, a check raises, or a fast path fell
back to another one (a plan's failure record, or a warning from the compiled functions or the Triton decoding step):
a fallback would otherwise pass on the path it fell back to.

Random-weight models attend almost uniformly, so their bf16 outputs are ill-conditioned (two correct bf16 LLaMAs can
differ by several %): each bf16 result is judged against an fp32 run, and must be no worse than 1.5x the error of
transformers' own bf16 LLaMA against that fp32 run."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

import torch

from longllama import LongLlamaForCausalLM
from longllama.config import preset
from longllama.plan import ExecutionPlan


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


class Fallbacks(logging.Handler):
    """Warnings of the fast wing (a compiled function or the Triton decoding step that gave up and runs the plain
    one): printed, and kept to fail the check."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")
        print(f"fallback: {self.messages[-1]}")


def kernel_plan(**changes) -> ExecutionPlan:
    """A fast-path plan for one GPU, for the checks that call the kernels' functions directly."""
    return ExecutionPlan(device="cuda", attention="fast", **changes)


def check_static_decoder(model, prompt) -> bool:
    """CUDA-graph decoding (the Triton step) against the generic path. Greedy tokens of a random-weight model flip
    on near-ties once the two round differently, after which the histories differ; so the scores are compared over
    the steps whose inputs are still equal (up to and including the first differing token). Bound 5e-2: the bf16
    scores of a random-weight model are ill-conditioned (see the module docstring); the unfused static path, which
    kept all 64 tokens equal, was 3.2e-2 from the dynamic one (h100-2026-11-26-gpu-check.txt), the Triton step 2.8e-2
    over its first 30 steps."""
    outs = {}
    for decoder in ("dynamic", "static"):
        outs[decoder] = model.generate(
            prompt,
            max_new_tokens=64,
            do_sample=False,
            decoder=decoder,
            output_scores=True,
            return_dict_in_generate=True,
            last_context_length=1990,
        )
    a, b = outs["dynamic"], outs["static"]
    new_a, new_b = a.sequences[:, prompt.shape[1] :], b.sequences[:, prompt.shape[1] :]
    differ = (new_a != new_b).any(0).nonzero()
    equal = int(differ[0]) if len(differ) else new_a.shape[1]
    steps = min(equal + 1, len(a.scores))
    e = rel(torch.stack(b.scores[:steps]), torch.stack(a.scores[:steps]))
    failed = model.plan.failures.names()
    print(
        f"static (CUDA graph) vs dynamic decoding: first {equal} of {new_a.shape[1]} new tokens equal; scores over "
        f"the {steps} steps with equal inputs rel {e:.2e}" + (f"; fell back: {', '.join(failed)}" if failed else "")
    )
    return e < 5e-2 and not failed


def check_batch_decoder(model) -> bool:
    """Rows over their own memories decoded together (BatchDecoder: CUDA graphs, one launch reading every row's
    memory) against each row alone (the static decoder), the same forced tokens fed to both: the logits of every
    step. Bound 5e-2 as for the static decoder (bf16 scores of a random-weight model; the two split the keys into
    different chunks)."""
    from longllama.fast.batch_decode import BatchDecoder
    from longllama.fast.decode import StaticDecoder

    g = torch.Generator(device="cuda").manual_seed(7)
    vocab, local = model.config.vocab_size, model.config.last_context_length
    documents = [torch.randint(3, vocab, (1, n), device="cuda", generator=g) for n in (3000, 5200, 2500, 4100)]
    steps = 16
    forced = torch.randint(3, vocab, (steps, len(documents)), device="cuda", generator=g)

    def cache(ids):
        return model(ids, use_cache=True, last_context_length=local).cache

    batch = BatchDecoder(model, plan=model.plan, graphs=True)
    for ids in documents:
        batch.add(cache(ids))
    together = torch.stack([batch.step(forced[i]) for i in range(steps)])  # (steps, rows, vocab)
    tables = len(batch._row_tables)
    errors = []
    for row, ids in enumerate(documents):
        alone = StaticDecoder(model, cache(ids), plan=model.plan, graphs=True)
        logits = torch.stack([alone.step(forced[i, row : row + 1])[0] for i in range(steps)])
        errors.append(rel(together[:, row], logits))
    failed = model.plan.failures.names()
    print(
        f"batch decoder ({len(documents)} rows, own memories of {[d.shape[1] for d in documents]} tokens, one launch "
        f"tables {tables}) vs each row alone, {steps} forced steps: logits rel "
        + ", ".join(f"{e:.2e}" for e in errors)
        + (f"; fell back: {', '.join(failed)}" if failed else "")
    )
    return max(errors) < 5e-2 and tables > 0 and not failed


def check_offload_in_place() -> bool:
    """Block retrieval over a memory offloaded to page-locked CPU memory (mem_offload) with the plan's
    offload_in_place, the kernels reading the chosen blocks over the bus, against the same memory on the GPU: the
    same kernels over the same values, so the logits and the greedy tokens must be equal; the copying path
    (offload_in_place off: each window's blocks gathered in CPU memory, PyTorch's attention over them) within bf16
    rounding of the GPU run. A 4-layer model of the 3B width, 6,000 tokens, 8 blocks of 64 a group, 2 recent."""
    from longllama.fast import block_attention

    torch.manual_seed(0)
    cfg = preset(
        "3b", num_hidden_layers=4, mem_layers=[1, 3], mem_retrieval="blocks", mem_blocks=8, mem_recent_blocks=2
    )
    with torch.device("cuda"):
        model = LongLlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    ids = torch.randint(3, cfg.vocab_size, (1, 6000), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    runs = {}
    for name, offload, in_place in [("gpu", False, False), ("in place", True, True), ("copied", True, False)]:
        model.config.update({"mem_offload": offload})
        model.set_plan(offload_in_place=in_place)
        out = model(ids, logits_to_keep=256)
        memory = next(layer.memory for layer in out.past_key_values.layers if layer.memory is not None)
        reads = block_attention.reads_in_place(memory, ids.device, model.plan)
        tokens = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, -16:]
        runs[name] = (out.logits, tokens, memory.pinned, reads)
    gpu, in_place, copied = runs["gpu"], runs["in place"], runs["copied"]
    same = torch.equal(in_place[0], gpu[0]) and torch.equal(in_place[1], gpu[1])
    e = rel(copied[0], gpu[0])
    print(
        f"offloaded memory, blocks read in place (pinned {in_place[2]}, kernels read it {in_place[3]}): logits and "
        f"16 greedy tokens equal to the memory on the GPU: {same}; copied (kernels read it {copied[3]}): logits "
        f"rel {e:.2e}, tokens equal {torch.equal(copied[1], gpu[1])}"
    )
    return same and in_place[2] and in_place[3] and not copied[3] and e < 5e-2


def check_kernels() -> bool:
    """The CUDA partial attention (with its log-sum-exp) against fp32 maths, head_dim 100 padded to 104."""
    from longllama.fast.attention import memory_attention, memory_pieces, partial_attention
    from longllama.ops import merge_partials

    ok = True
    for causal, n, m in [(True, 2048, 2048), (False, 2048, 20000), (False, 1, 20000)]:
        q = torch.randn(1, 32, n, 104, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 32, m, 104, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 32, m, 104, device="cuda", dtype=torch.bfloat16)
        q[..., 100:] = 0
        k[..., 100:] = 0
        ref_out, ref_lse = partial_attention(
            q.cpu().float(), k.cpu().float(), v.cpu().float(), causal=causal, scale=0.1
        )
        results = {}
        for kernel in ("flash", "cudnn") if n > 1 else ("flash",):  # cudnn: the memory kernel when FA4 is not there
            results[kernel] = partial_attention(q, k, v, causal=causal, scale=0.1, kernel=kernel)
            e_out, e_lse = rel(results[kernel][0].cpu(), ref_out), rel(results[kernel][1].cpu(), ref_lse)
            print(f"kernel {kernel} causal={causal} n={n} m={m}: out rel {e_out:.2e}, lse rel {e_lse:.2e}")
            ok &= e_out < 2e-2 and e_lse < 1e-3
        out, lse = results["flash"]  # the default kernel, for the merge check below
    a, la = partial_attention(q, k[:, :, :5000], v[:, :, :5000], causal=False, scale=0.1)
    b, lb = partial_attention(q, k[:, :, 5000:], v[:, :, 5000:], causal=False, scale=0.1)
    e = rel(merge_partials(a, la, b, lb), out)
    print(f"merge of two halves vs one attention: rel {e:.2e}")
    ok &= e < 2e-2
    # Memory attention as the plan's memory_kernel chooses it: cuDNN in pieces of memory_piece x 2^j keys (20000
    # keys: 16384 + 2048 + 1024 by cuDNN, the last 544 by FlashAttention) against FlashAttention in one call, head_dim
    # 100 stored as 112.
    q = torch.randn(1, 32, 2048, 100, device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.nn.functional.pad(x[..., :100], (0, 12)) for x in (q, k, v))
    plans = {kernel: kernel_plan(memory_kernel=kernel) for kernel in ("flash", "cudnn")}
    pieces = {kernel: memory_attention(q, k, v, scale=0.1, plan=plan) for kernel, plan in plans.items()}
    e = rel(pieces["cudnn"][0], pieces["flash"][0])
    e_lse = rel(pieces["cudnn"][1], pieces["flash"][1])
    print(
        f"memory attention, cuDNN in pieces {memory_pieces(k.shape[2], plans['cudnn'].memory_piece)} vs "
        f"FlashAttention in one call: out rel {e:.2e}, lse rel {e_lse:.2e}"
    )
    return ok and e < 2e-2 and e_lse < 1e-3


def check_flash4() -> bool:
    """FlashAttention 4's memory attention (when installed, on Hopper) against fp32 maths, memory stored 112 wide: one
    call; a group of windows each seeing its own prefix of one shared memory in one call; and the same group split as
    the ingest splits it (flash4.group_attention: the common prefix for all rows, in 1 and in 3 key parts folded by the
    fold kernel, then the rest per row), merged by log-sum-exp. The plan's tile for width 112 serves every call."""
    from longllama.fast import flash4
    from longllama.ops import merge_memory_parts

    plan = kernel_plan()
    q = torch.nn.functional.pad(torch.randn(3, 32, 2048, 100, device="cuda", dtype=torch.bfloat16), (0, 12))
    if not flash4.usable(q, plan):
        print("FlashAttention 4: not installed or not a Hopper GPU; skipped")
        return True
    k, v = (
        torch.nn.functional.pad(torch.randn(1, 32, 20000, 100, device="cuda", dtype=torch.bfloat16), (0, 12))
        for _ in range(2)
    )
    used = [5000, 12000, 20000]

    def compare(label, rows, out, lse, prefixes) -> bool:
        good = True
        for i, m in enumerate(prefixes):
            s = rows[i].float() @ k[0, :, :m].float().transpose(-1, -2) * 0.1
            want = torch.softmax(s, -1) @ v[0, :, :m, :100].float()
            e, e_lse = rel(out[i, ..., :100].float(), want), rel(lse[i], s.logsumexp(-1))
            print(f"FlashAttention 4 memory attention, {label}, {m} keys: out rel {e:.2e}, lse rel {e_lse:.2e}")
            good &= e < 2e-2 and e_lse < 1e-3
        return good

    out, lse = flash4.memory_attention(q[:1], k, v, scale=0.1, plan=plan)
    ok = compare("one call", q[:1], out, lse, [k.shape[2]])
    out, lse = flash4.memory_attention(q, k, v, scale=0.1, plan=plan, used=used)
    ok &= compare("prefix of a group", q, out, lse, used)
    for parts in (1, 3):
        split = plan.replace(key_parts=parts)
        out, lse = merge_memory_parts(flash4.group_attention(q, k, v, scale=0.1, used=used, plan=split), 100)
        ok &= compare(f"group split, common prefix in {parts} key part{'s' if parts > 1 else ''}", q, out, lse, used)
    return ok


def check_top_k() -> bool:
    """kNN memory attention (fast.attention.top_k_memory_attention: a running top 64 over chunks of scores) in fp32
    against the top 64 of all scores at once: 4096 queries x 32 heads sharing 8 key/value heads, 16384 memory keys,
    many chunks (the model's long input reads at most a few)."""
    from longllama.fast import attention as fast_attention

    q = torch.randn(1, 32, 4096, 100, device="cuda")
    k, v = (torch.randn(1, 8, 16384, 100, device="cuda") for _ in range(2))
    out, lse = fast_attention.top_k_memory_attention(q, k, v, top_k=64, scale=0.1)
    chunks = -(-k.shape[2] // max(64, fast_attention._TOP_K_SCORES // (32 * 4096)))
    qg = q.view(8, 4 * 4096, 100)  # query heads 4j..4j+3 share key/value head j
    want_out, want_lse = [], []
    for j in range(8):
        top, index = (qg[j] @ k[0, j].T * 0.1).topk(64, dim=-1)
        want_out.append(torch.einsum("rk,rkd->rd", torch.softmax(top, -1), v[0, j][index]))
        want_lse.append(top.logsumexp(-1))
    e = rel(out, torch.stack(want_out).view(out.shape))
    e_lse = rel(lse, torch.stack(want_lse).view(lse.shape))
    print(
        f"kNN memory attention, top 64 of 16384 keys read in {chunks} chunks, fp32: out rel {e:.2e}, "
        f"lse rel {e_lse:.2e}"
    )
    return e < 1e-2 and e_lse < 1e-4


def check_rope_kernel() -> bool:
    """The Triton kernel of ops.rope_pad (the ingest path's rotation and padding, fast.fused) in bf16 against the
    function in fp32: q of 4 windows x 2048 tokens x 32 heads x 100, padded to 112."""
    from longllama.fast.fused import kernel_rope_pad
    from longllama.ops import rope_pad

    q, k, v = (torch.randn(4, 2048, 32, 100, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cos, sin = (torch.randn(1, 1, 2048, 100, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    got = kernel_rope_pad(q, k, v, cos, sin, 112, True)
    if got is None:
        print("rope_pad kernel: did not apply")
        return False
    want = rope_pad(*(t.float() for t in (q, k, v, cos, sin)), 112, True)
    errors = [rel(g, w) for g, w in zip(got, want)]
    zeros = all(not g[..., 100:].any() for g in got)
    print(
        f"rope_pad kernel, q / k / v vs fp32: rel {errors[0]:.2e} / {errors[1]:.2e} / {errors[2]:.2e}, "
        f"padding zero: {zeros}"
    )
    return max(errors) < 1e-2 and zeros


def check_decode_kernels() -> bool:
    """The Triton kernels of a decoding step (3B head shape, bf16) against fp32 maths."""
    import math

    import torch.nn.functional as F

    from longllama.fast import decode_attention, gemv
    from longllama.ops import rotate

    ok = True
    q = torch.randn(1, 32, 100, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(1, 32, 2048, 100, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mem = [F.pad(torch.randn(1, 32, 20000, 100, device="cuda", dtype=torch.bfloat16), (0, 12)) for _ in range(2)]
    for used, memory in [(1500, mem), (2048, mem), (1, None)]:
        out = decode_attention.attend(q, keys, values, torch.tensor([used - 1], device="cuda"), memory)
        k, v = keys[:, :, :used].float(), values[:, :, :used].float()
        if memory is not None:
            k, v = torch.cat([k, memory[0][..., :100].float()], 2), torch.cat([v, memory[1][..., :100].float()], 2)
        ref = ((q.float()[:, :, None] @ k.transpose(-1, -2) / math.sqrt(100)).softmax(-1) @ v)[:, :, 0]
        e = rel(out, ref)
        print(f"decode attention kernel, {used} local slots, memory {0 if memory is None else 20000}: rel {e:.2e}")
        ok &= e < 1e-2
    qkv = torch.randn(1, 1, 9600, device="cuda", dtype=torch.bfloat16)
    cos, sin = (f(torch.randn(2048, 100, device="cuda")).bfloat16() for f in (torch.cos, torch.sin))
    raw, rot, vals = (torch.zeros(1, 32, 2048, 100, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q = decode_attention.rope_store(qkv, cos, sin, torch.tensor([7], device="cuda"), raw, rot, vals, 32, rotate=True)
    heads = qkv.view(1, 96, 100).float()
    e = max(
        rel(q, rotate(heads[:, :32], cos[7].float(), sin[7].float())),
        rel(rot[:, :, 7], rotate(heads[:, 32:64], cos[7].float(), sin[7].float())),
    )
    heads16 = qkv.view(1, 96, 100)
    stored = torch.equal(raw[:, :, 7], heads16[:, 32:64]) and torch.equal(vals[:, :, 7], heads16[:, 64:])
    print(f"rope_store: rotated q and k rel {e:.2e}, raw key and value stored exactly: {stored}")
    ok &= e < 1e-2 and stored
    x = torch.randn(1, 1, 3200, device="cuda", dtype=torch.bfloat16)
    w = [torch.randn(n, 3200, device="cuda", dtype=torch.bfloat16) / 50 for n in (3200, 3200, 3200, 8640, 8640)]
    residual = torch.randn(1, 1, 3200, device="cuda", dtype=torch.bfloat16)
    x32 = x.float()
    checks = {
        "q/k/v stacked": (gemv.linear_stacked(x, tuple(w[:3])), torch.cat([x32 @ t.float().T for t in w[:3]], -1)),
        "residual + product": (gemv.linear(x, w[0], residual=residual), residual.float() + x32 @ w[0].float().T),
        "gate/up + SwiGLU": (gemv.linear_swiglu(x, w[3], w[4]), F.silu(x32 @ w[3].float().T) * (x32 @ w[4].float().T)),
    }
    for name, (got, ref) in checks.items():
        e = rel(got, ref)
        print(f"matrix-vector kernel, {name}: rel {e:.2e}")
        ok &= e < 1e-2
    return ok


def check_sampling() -> bool:
    """The sampling kernel (fast.sampling) against transformers' warpers: the kept tokens over a 32000-token
    vocabulary (fp32 logits, no ties), and the frequencies of 200000 draws over 8 tokens."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from longllama.fast import sampling

    ok = True
    logits = torch.randn(8, 32000, device="cuda") * 4
    for temperature, top_k, top_p in [(0.8, None, 0.9), (1.0, 50, 0.95), (0.7, 40, 1.0)]:
        _, floors = sampling.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, floors=True)
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        scores = TopKLogitsWarper(top_k)(None, scores) if top_k else scores
        scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
        same = torch.equal(logits / temperature >= floors[:, None], torch.isfinite(scores))
        print(
            f"sampling kernel, temperature {temperature}, top_k {top_k}, top_p {top_p}: kept tokens as the "
            f"warpers keep them: {same}"
        )
        ok &= same
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device="cuda")
    tokens = sampling.sample(base.expand(200000, -1), temperature=0.5, top_k=6, top_p=0.95)
    want = torch.softmax(TopPLogitsWarper(0.95)(None, TopKLogitsWarper(6)(None, base[None] / 0.5)), -1)[0]
    freq = torch.bincount(tokens, minlength=8).float() / tokens.numel()
    e = (freq - want).abs().max().item()
    print(f"sampling kernel, 200000 draws over 8 tokens: max |frequency - probability| {e:.1e}")
    return ok and e < 5e-3


# Long-input paths: (name, config fields, plan changes), each against the fp32 eager run.
LONG_PATHS = [
    ("eager", dict(attn_impl="eager"), {}),
    ("fast", dict(attn_impl="fast"), {}),
    ("fast, elementwise not compiled", dict(attn_impl="fast"), dict(compile=False)),
    ("fast, memory by cuDNN", dict(attn_impl="fast"), dict(memory_kernel="cudnn")),
    ("fast, window groups' common prefix in 3 key parts", dict(attn_impl="fast"), dict(key_parts=3)),
    ("sdpa", dict(torch_attention=True), {}),
    ("grouped", dict(attn_impl="eager", mem_attention_grouping=(4, 512)), {}),
]
TOP_K_PATHS = [("eager, top-k 64", dict(attn_impl="eager"), {}), ("fast, top-k 64", dict(attn_impl="fast"), {})]


def run_path(model, name: str, config: dict, changes: dict, ids, want, bound: float, against: str) -> bool:
    """One forward of `ids` with these config fields and plan changes, then both restored; one that raises fails."""
    saved = {key: getattr(model.config, key) for key in config}
    restore = {key: getattr(model.plan, key) for key in changes}
    try:
        for key, value in config.items():
            setattr(model.config, key, value)
        model.set_plan(**changes)
        plan = model.plan  # the forward's plan: its failure record is read below
        e = rel(model(ids, use_cache=False).logits, want)
    except Exception:  # noqa: BLE001 - reported, counted as a failure; the other paths still run
        traceback.print_exc()
        print(f"bf16, long input, {name}: raised: FAIL")
        return False
    finally:
        for key, value in saved.items():
            setattr(model.config, key, value)
        model.set_plan(**restore)
    failed = plan.failures.names()
    print(
        f"bf16, long input, {name} vs {against}: rel {e:.2e}" + (f"; fell back: {', '.join(failed)}" if failed else "")
    )
    return e <= bound and not failed


def check_model(ours, llama, cfg) -> bool:
    """The short input against transformers' LLaMA (fp32, bf16) and every long-input path against fp32 eager; leaves
    both models in bf16."""
    ok = True
    short = torch.randint(3, cfg.vocab_size, (2, 1000), device=ours.device)
    long = torch.randint(3, cfg.vocab_size, (1, 9000), device=ours.device)
    ref_short = llama(short).logits
    ours_fp32 = ours(short, use_cache=False).logits
    ours.config.attn_impl = "eager"
    ref_long = ours(long, use_cache=False).logits  # fp32 eager: the executable spec
    ours.config.mem_top_k = 64
    ref_long_top_k = ours(long, use_cache=False).logits  # fp32 eager with kNN memory (a masked top k)
    ours.config.mem_top_k, ours.config.attn_impl = None, "auto"
    e = rel(ours_fp32, ref_short)
    print(f"fp32, short input, ours vs LLaMA: rel {e:.2e}")
    ok &= e < 1e-4
    ours.to(torch.bfloat16)
    llama.to(torch.bfloat16)
    base = rel(llama(short).logits, ref_short)
    e = rel(ours(short, use_cache=False).logits, ref_short)
    print(f"bf16, short input vs fp32: ours {e:.2e}, transformers LLaMA {base:.2e}")
    bound = 1.5 * base + 1e-3
    ok &= e <= bound
    for name, config, changes in LONG_PATHS:
        ok &= run_path(ours, name, config, changes, long, ref_long, bound, "fp32 eager")
    ours.config.mem_top_k = 64
    try:
        for name, config, changes in TOP_K_PATHS:
            ok &= run_path(ours, name, config, changes, long, ref_long_top_k, bound, "fp32 eager top-k 64")
    finally:
        ours.config.mem_top_k = None
    return ok


def checked(name: str, fn, *args) -> bool:
    """fn(*args), a check; one that raises fails (and the others still run)."""
    try:
        return bool(fn(*args))
    except Exception:  # noqa: BLE001 - reported, counted as a failure
        traceback.print_exc()
        print(f"{name}: raised: FAIL")
        return False


# each check's name for --only
CHECKS = {
    "model paths": "model",
    "kernels": "kernels",
    "FlashAttention 4": "flash4",
    "kNN memory": "topk",
    "rope kernel": "rope",
    "decoding kernels": "decoding",
    "sampling": "sampling",
    "static decoder": "static",
    "batch decoder": "batch",
    "offloaded memory read in place": "offload",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = list(CHECKS.values())
    ap.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(names)}")
    args = ap.parse_args()
    only = set(names) if args.only is None else set(args.only.split(","))
    if only - set(names):
        ap.error(f"unknown check(s) {', '.join(sorted(only - set(names)))}: choose among {', '.join(names)}")
    from bench_inference import plan_record
    from transformers import LlamaConfig, LlamaForCausalLM

    fallbacks = Fallbacks()
    logging.getLogger("longllama.fast").addHandler(fallbacks)
    torch.manual_seed(0)
    cfg = preset("3b", num_hidden_layers=6, mem_layers=[2, 4])
    with torch.device("cuda"):
        ours = LongLlamaForCausalLM(cfg).eval()
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=2048,
    )
    llama_cfg._attn_implementation = "eager"
    with torch.device("cuda"):
        llama = LlamaForCausalLM(llama_cfg).eval()
    llama.load_state_dict(ours.state_dict())
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"plan: {plan_record(ours)}")
    ok = True
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        if "model" in only:
            ok &= checked("model paths", check_model, ours, llama, cfg)
        for name, fn in [
            ("kernels", check_kernels),
            ("FlashAttention 4", check_flash4),
            ("kNN memory", check_top_k),
            ("rope kernel", check_rope_kernel),
            ("decoding kernels", check_decode_kernels),
            ("sampling", check_sampling),
        ]:
            if CHECKS[name] in only:
                ok &= checked(name, fn)
        ours.to(torch.bfloat16)  # as check_model leaves it, should that have stopped early
        if "static" in only:
            prompt = torch.randint(3, cfg.vocab_size, (1, 3000), device="cuda")
            ok &= checked("static decoder", check_static_decoder, ours, prompt)
        if "batch" in only:
            ok &= checked("batch decoder", check_batch_decoder, ours)
        if "offload" in only:
            ok &= checked("offloaded memory read in place", check_offload_in_place)
    if fallbacks.messages:
        print(f"{len(fallbacks.messages)} fallback warning(s) from the fast paths (see above): FAIL")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
