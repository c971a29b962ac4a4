"""Retrieval memory (`mem_retrieval="blocks"`) against dense and kNN memory attention, in one GPU command.

Sections (--sections picks them, in this order; a shared --deadline in seconds stops starting new trials or
measurements so the command ends in time, and whatever was not started is recorded as skipped):
  summaries  the shipped model (src/longllama/models/small): how well each block summary ranks blocks, at
             --summary-tokens: NLL of the last --ppl-target tokens of held-out text after that much context, and
             pass-key trials, with dense memory attention, with blocks ranked by the max/min bound (what
             mem_retrieval="blocks" does) and blocks ranked by their mean key, at budgets of 1, 4, 16 and 64 blocks.
  passkey    the shipped model: pass-key retrieval at each of --lengths (1M and 4M; 10M with --lengths) with
             blocks (--blocks, 64), dense and kNN (mem_top_k 128) memory and the no-memory control; each mode's
             trials (--trials for blocks, fewer for the slow modes: --slow-trials) on seeds from --seed, seconds
             per trial (--batch B: trials read B at a time, score_passkeys). Lengths run shortest first; a batch
             starts only if its estimate (the mode's slowest batch so far, scaled to the length) fits in the time
             left.
  3b         the 3B shape with random bf16 weights: ingest of --ingest-tokens (1M) with blocks and with dense
             memory (seconds, peak GPU memory), then decoding after it (ms per token, generate from the cache of the
             ingest: the static decoder on a GPU); then blocks read by retrieval.attend's gather instead of the
             block kernel (plan block_kernel=False), the baseline of that kernel.
             With --offload also blocks with the memory in pinned CPU memory (summaries on the GPU), twice: the
             chosen blocks read in place over the bus by the kernels (plan offload_in_place), then copied (each
             window's union gathered in CPU memory; --offload-ways picks them); with --offload-only those alone
             (the first of --modes);
             --step-baseline decodes on from each blocks cache with the plan's block_kernel off (the step's
             choice and gather in PyTorch), the baseline of the step's kernels.
--super-size S adds the two-level choice (superblocks of S blocks, mode "blocks2") after blocks in passkey and 3b;
--recent-blocks R adds blocks with the R most recent always read (mode "blocks-recent", mem_recent_blocks) the same way;
both add the two together after them (mode "blocks2-recent").
--modes keeps only the named modes of passkey and 3b (e.g. blocks-recent,no-memory).

Records follow benchmarks/results/*.json (benchmark, impl, model or shape, tokens, length, trials, accuracy,
seconds / ms_per_token, device, date, plan), each with "mem_retrieval" ("dense" or "blocks"), "mem_blocks" and
"mem_top_k"; --out writes them after every measurement. --tiny runs every section at tiny lengths and shapes on the
CPU (about a minute) to test the script.

    python benchmarks/bench_retrieval.py --out benchmarks/results/h100-retrieval.json
    python benchmarks/bench_retrieval.py --tiny --device cpu --out /tmp/retrieval.json
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quant import (  # noqa: E402
    Records,
    _Clock,
    _free,
    _peak_gib,
    _reset_peak,
    _sync,
    heldout_texts,
    random_model,
)

from longllama import LongLlamaForCausalLM  # noqa: E402
from longllama.config import preset  # noqa: E402
from longllama.memory import MemoryCache  # noqa: E402

SHIPPED = ROOT / "src" / "longllama" / "models" / "small"


class Clock:
    """Seconds left before the command's --deadline."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# how the 3b section reads an offloaded memory (--offload-ways): the plan's offload_in_place of each way
OFFLOAD_WAYS = {"in-place": True, "copy": False}


def modes(args) -> dict[str, dict]:
    """Config overrides of each memory mode."""
    return {
        "blocks": dict(mem_retrieval="blocks", mem_blocks=args.blocks, mem_top_k=None),
        "blocks2": dict(mem_retrieval="blocks", mem_blocks=args.blocks, mem_super_size=args.super_size, mem_top_k=None),
        "blocks-recent": dict(
            mem_retrieval="blocks", mem_blocks=args.blocks, mem_recent_blocks=args.recent_blocks, mem_top_k=None
        ),
        "blocks2-recent": dict(
            mem_retrieval="blocks",
            mem_blocks=args.blocks,
            mem_super_size=args.super_size,
            mem_recent_blocks=args.recent_blocks,
            mem_top_k=None,
        ),
        "dense": dict(mem_retrieval="dense", mem_top_k=None),
        "knn": dict(mem_retrieval="dense", mem_top_k=128),
        "no-memory": dict(mem_retrieval="dense", mem_top_k=None, mem_layers=[]),
    }


def shipped(args, **overrides) -> LongLlamaForCausalLM:
    return LongLlamaForCausalLM.from_pretrained(
        SHIPPED, dtype=getattr(torch, args.dtype), device_map=args.device, **overrides
    ).eval()


def mode_fields(model) -> dict:
    config = model.config
    return dict(
        mem_retrieval=config.mem_retrieval,
        mem_blocks=config.mem_blocks if config.mem_retrieval == "blocks" else None,
        mem_block_size=config.mem_block_size if config.mem_retrieval == "blocks" else None,
        mem_super_size=config.mem_super_size if config.mem_retrieval == "blocks" else None,
        mem_recent_blocks=config.mem_recent_blocks if config.mem_retrieval == "blocks" else None,
        mem_top_k=config.mem_top_k,
        mem_layers=list(config.mem_layers),
        plan=model.plan.to_dict(),
    )


# --------------------------------------------------------------------------------------------------------------------


def _mean_key_summaries(memory: MemoryCache, block_size: int, device=None):
    """Block summaries as (mean key, mean key): the bound relu(q).kmax - relu(-q).kmin is then q . mean."""
    keys = memory.keys.float()
    valid = memory.valid
    n = memory.length
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    keys = torch.nn.functional.pad(keys, (0, 0, 0, pad)).reshape(*keys.shape[:2], blocks, block_size, -1)
    weights = torch.nn.functional.pad(valid, (0, pad)).reshape(valid.shape[0], 1, blocks, block_size, 1).float()
    mean = (keys * weights).sum(3) / weights.sum(3).clamp_min(1)
    device = device or memory.device
    return mean.to(device), mean.to(device), (weights.sum(3)[:, 0, :, 0] > 0).to(device)


def section_summaries(args, records: Records, clock: Clock) -> None:
    from longllama.evals import passkey, perplexity
    from longllama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(SHIPPED)
    target = args.ppl_target
    documents = perplexity.load_documents(
        heldout_texts(), tokenizer, needed_tokens=args.summary_tokens + target, max_docs=args.ppl_docs
    )
    inputs = [
        perplexity.context_input(
            d, args.summary_tokens, max_context=args.summary_tokens, target_tokens=target, bos_id=tokenizer.bos_token_id
        )
        for d in documents
    ]
    n_garbage = passkey.n_garbage_for_tokens(tokenizer, args.summary_tokens, seed=args.seed)
    variants = [("dense", None)] + [(s, b) for s in ("bound", "mean") for b in (1, 4, 16, 64)]
    original = MemoryCache.summaries
    for variant in variants:
        summary, blocks = variant[0], variant[1]
        if clock.left() < 0:
            records.add(benchmark="summaries", skipped=True, summary=summary, blocks=blocks)
            continue
        overrides = modes(args)["dense"] if blocks is None else dict(modes(args)["blocks"], mem_blocks=blocks)
        model = shipped(args, **overrides)
        if summary == "mean":
            MemoryCache.summaries = _mean_key_summaries
        try:
            start = time.perf_counter()
            nll = [
                float(perplexity.target_nll(model, ids, target_tokens=target, last_context_length=256).mean())
                for ids in inputs
            ]
            correct = []
            for t in range(args.summary_trials):
                prompt, key = passkey.passkey_prompt(n_garbage, args.seed + t)
                with torch.no_grad():
                    scored = passkey.score_passkey(model, tokenizer, prompt, key, last_context_length=256)
                correct.append(scored["correct"])
            records.add(
                benchmark="summaries",
                impl="longllama",
                model="small",
                summary=summary,
                blocks=blocks,
                tokens=args.summary_tokens,
                ppl_docs=len(inputs),
                mean_nll=sum(nll) / len(nll),
                nll_per_doc=nll,
                passkey_trials=len(correct),
                passkey_accuracy=sum(correct) / max(1, len(correct)),
                seconds=time.perf_counter() - start,
                **mode_fields(model),
            )
        finally:
            MemoryCache.summaries = original
            del model
            _free(args.device)


def section_passkey(args, records: Records, clock: Clock) -> None:
    from longllama.evals import passkey
    from longllama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(SHIPPED)
    plan = [("blocks", args.trials), ("no-memory", 1), ("dense", args.slow_trials), ("knn", args.slow_trials)]
    if args.recent_blocks:  # right after the blocks ranked by their bound alone
        plan.insert(1, ("blocks-recent", args.trials))
    if args.super_size:  # the two-level choice right after the one-level one
        plan.insert(1, ("blocks2", args.trials))
    if args.super_size and args.recent_blocks:  # both: after the two
        plan.insert(3, ("blocks2-recent", args.trials))
    plan = [(mode, trials) for mode, trials in plan if args.modes is None or mode in args.modes]
    per_token: dict[str, float] = {}  # seconds per prompt token of each mode's trials so far
    for length in sorted(args.lengths):
        n_garbage = passkey.n_garbage_for_tokens(tokenizer, length, seed=args.seed)
        for mode, trials in plan:
            # time grows at least linearly with the length: a mode whose estimate exceeds the time left is skipped
            if clock.left() < per_token.get(mode, 0.0) * length:
                records.add(benchmark="passkey", length=length, skipped=True, mem_mode=mode)
                continue
            model = shipped(args, **modes(args)[mode])
            results, seconds = [], []  # seconds of each batch of trials
            for first in range(0, trials, args.batch):
                if clock.left() < (max(seconds) if seconds else 0):
                    break
                seeds = range(args.seed + first, args.seed + min(first + args.batch, trials))
                prompts = [passkey.passkey_prompt(n_garbage, seed) for seed in seeds]
                _sync(args.device)
                start = time.perf_counter()
                with torch.no_grad():
                    results += passkey.score_passkeys(model, tokenizer, prompts, last_context_length=256)
                _sync(args.device)
                seconds.append(time.perf_counter() - start)
            if seconds:
                per_token[mode] = max(seconds) / length
            if results:
                records.add(
                    benchmark="passkey",
                    impl="longllama",
                    model="small" if mode != "no-memory" else "small, mem_layers=[]",
                    mem_mode=mode,
                    length=length,
                    tokens=results[0]["tokens"],
                    trials=len(results),
                    seeds=[args.seed + t for t in range(len(results))],
                    accuracy=sum(r["correct"] for r in results) / len(results),
                    seconds_per_trial=sum(seconds) / len(results),
                    seconds=seconds,
                    batch=args.batch,
                    dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    **mode_fields(model),
                )
            del model
            _free(args.device)


def section_3b(args, records: Records, clock: Clock) -> None:
    config = preset("tiny" if args.tiny else "3b", mem_dtype="bfloat16")
    # (mode, memory in CPU memory, blocks read by the block kernel: False is retrieval.attend's gather, an
    # offloaded memory read in place by the kernels)
    extra = [("blocks2", args.super_size), ("blocks-recent", args.recent_blocks)]
    extra.append(("blocks2-recent", args.super_size and args.recent_blocks))
    variants = [("blocks", False, True, False)] + [(mode, False, True, False) for mode, wanted in extra if wanted]
    variants += [("dense", False, True, False), ("blocks", False, False, False)]
    offloaded = [("blocks", True, True, OFFLOAD_WAYS[way]) for way in args.offload_ways]
    variants += offloaded if args.offload else []
    variants = [v for v in variants if args.modes is None or v[0] in args.modes]
    if args.offload_only:  # the first mode asked for (blocks by default), its memory in pinned CPU memory
        variants = [((args.modes or ["blocks"])[0], *v[1:]) for v in offloaded]
    n = args.ingest_tokens
    for mode, offload, block_kernel, in_place in variants:
        impl = "longllama" + ("-offload" if offload else "") + ("-in-place" if in_place else "")
        impl += "" if block_kernel else "-gather"
        if clock.left() < 0:
            records.add(benchmark="ingest", shape=config_name(args), impl=impl, skipped=True, mem_mode=mode)
            continue
        model = random_model(config, args.device)
        model.config.update(dict(modes(args)[mode], mem_offload=offload))
        model.set_plan(block_kernel=block_kernel, offload_in_place=in_place)
        ids = torch.randint(3, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        ids = ids.to(args.device)
        out = cache = None
        try:
            with torch.no_grad():  # a short warm-up: compilation, kernels, plans
                model(ids[:, : 3 * config.context_window], logits_to_keep=1)
            _reset_peak(args.device)
            _sync(args.device)
            start = time.perf_counter()
            with torch.no_grad():
                out = model(ids, logits_to_keep=1)
            _sync(args.device)
            seconds = time.perf_counter() - start
            memory_gib = (
                sum(layer.memory.nbytes() for layer in out.past_key_values.layers if layer.memory is not None) / 2**30
            )
            fields = dict(shape=config_name(args), impl=impl, mem_mode=mode, tokens=n, **mode_fields(model))
            records.add(
                benchmark="ingest",
                seconds=seconds,
                tokens_per_s=n / seconds,
                peak_gib=_peak_gib(args.device),
                memory_gib=memory_gib,
                weights_gib=sum(t.nbytes for t in model.parameters()) / 2**30,
                **fields,
            )
            token = out.logits[:, -1:].argmax(-1)
            cache = out.past_key_values
            runs = [("generate (the static decoder on a GPU)", False)]
            if args.step_baseline and block_kernel and mode != "dense":
                # then the same cache decoded on with the step's choice and gather in PyTorch (block_kernel off)
                runs.append(("generate, block_kernel off: the step's choice and gather in PyTorch", True))
            for path, baseline in runs:
                if baseline:
                    model.set_plan(block_kernel=False)
                changed = {"impl": impl + "-step-pytorch", "plan": model.plan.to_dict()} if baseline else {}
                records.add(
                    benchmark="decode",
                    mode="greedy",
                    ms_per_token=_decode_ms(model, token, cache, args),
                    path=path,
                    peak_gib=_peak_gib(args.device),
                    **{**fields, **changed},
                )
        except Exception as exc:  # noqa: BLE001 - recorded, the next variant still runs
            records.add(benchmark="ingest", shape=config_name(args), impl=impl, mem_mode=mode, error=str(exc)[:300])
        finally:
            # the cache (the memory: 42 GB at 1M tokens) goes with the model, before the next variant allocates
            del model, out, cache
            _free(args.device)


def _decode_ms(model, token: torch.Tensor, cache, args) -> float:
    """Milliseconds a token of greedy decoding on from `cache` through generate (the static decoder on a GPU), over
    --decode-tokens tokens after two that absorb the graph capture."""
    arrivals = _Clock(args.device)
    steps = args.decode_tokens + 2
    with torch.no_grad():
        model.generate(
            token, cache=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, streamer=arrivals
        )
    _sync(args.device)
    t = arrivals.times  # the prompt first, then each token
    return (t[-1] - t[2]) / (len(t) - 3) * 1e3


def config_name(args) -> str:
    return "tiny" if args.tiny else "3b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="3b,passkey", help="comma-separated: summaries, passkey, 3b")
    ap.add_argument("--tiny", action="store_true", help="tiny lengths and shapes (a CPU test of the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="the shipped model's dtype (default: bfloat16; float32 --tiny)")
    ap.add_argument("--deadline", type=float, default=420, help="seconds after which nothing new starts")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1 << 20, 1 << 22])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--super-size", type=int, default=0, help="also the two-level choice with superblocks of this size")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=None, help="only these modes (comma-separated)")
    ap.add_argument("--recent-blocks", type=int, default=0, help="also blocks with this many recent blocks kept")
    ap.add_argument("--trials", type=int, default=4, help="pass-key trials with blocks")
    ap.add_argument("--slow-trials", type=int, default=1, help="pass-key trials with dense and kNN memory")
    ap.add_argument("--batch", type=int, default=1, help="pass-key trials read together (seconds are per batch)")
    ap.add_argument("--seed", type=int, default=100, help="first pass-key seed (new seeds: earlier runs used 0-19)")
    ap.add_argument("--summary-tokens", type=int, default=32768)
    ap.add_argument("--summary-trials", type=int, default=5)
    ap.add_argument("--ppl-target", type=int, default=255)
    ap.add_argument("--ppl-docs", type=int, default=4)
    ap.add_argument("--ingest-tokens", type=int, default=1 << 20)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--offload", action="store_true", help="3b: also blocks with the memory in pinned CPU memory")
    ap.add_argument(
        "--offload-only",
        action="store_true",
        help="3b: only the first of --modes (default blocks) with the memory in pinned CPU memory",
    )
    ap.add_argument(
        "--offload-ways",
        type=lambda s: s.split(","),
        default=["in-place", "copy"],
        help="3b: how an offloaded memory is read, in this order: in-place (plan offload_in_place), copy",
    )
    ap.add_argument(
        "--step-baseline",
        action="store_true",
        help="3b: after each blocks decode, decode on from the same cache with the step's choice and gather in PyTorch",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: read at least one trial at a time")
    unknown = set(args.modes or ()) - set(modes(args))
    if unknown:
        ap.error(f"--modes {','.join(sorted(unknown))}: use some of {', '.join(modes(args))}")
    if set(args.offload_ways) - set(OFFLOAD_WAYS):
        ap.error(f"--offload-ways {','.join(args.offload_ways)}: use some of {', '.join(OFFLOAD_WAYS)}")
    if args.tiny:
        args.lengths = [1500, 3000]
        args.trials, args.slow_trials, args.summary_trials = 2, 1, 1
        args.summary_tokens, args.ppl_target, args.ppl_docs = 2048, 32, 1
        args.ingest_tokens, args.decode_tokens = 400, 4
        args.blocks = min(args.blocks, 4)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    records = Records(args.out, dict(device=card, date=datetime.date.today().isoformat(), torch=torch.__version__))
    clock = Clock(args.deadline)
    sections = {"summaries": section_summaries, "passkey": section_passkey, "3b": section_3b}
    for name in args.sections.split(","):
        start = time.perf_counter()
        sections[name](args, records, clock)
        print(f"section {name}: {time.perf_counter() - start:.1f} s", flush=True)
    records.save()


if __name__ == "__main__":
    main()
