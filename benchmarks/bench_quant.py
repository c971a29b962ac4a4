"""Quantized weights (int8, int4) and 8-bit memory against bf16, side by side on one GPU, in one command.

Sections (each model built, measured and freed in turn; --sections picks them):
  3b     the 3B shape with random bf16 weights (one seed: every variant quantizes the same weights). Per weight
         variant (none, int8, int4, int4 with lm_head too): logits of a --check-tokens input against bf16 (relative
         error, largest difference, top-1 agreement), an ingest of --tokens (one forward, logits of the last
         position), and decoding after --decode-after tokens (ms per token from streamed tokens; the first token's
         wait is the prompt's ingest with a cache).
  7b     the Code 7B shape reading --long-tokens (256k) tokens, bf16 against int4 weights + int8 memory (and the
         two halves apart with --split-7b): peak GPU memory (allocated, from after the weights are in place, so it
         is what a loaded quantized checkpoint needs), the ingest (first token's wait) and ms per token after it.
  small  the shipped model (src/longllama/models/small): pass key at --passkey-tokens (128k) over --passkey-trials
         seeds (--passkey-trials-quantized with int8/int4 weights), held-out perplexity of --ppl-target tokens
         after --ppl-context (16k) tokens of context, and (quantized weights) a checkpoint round trip, per
         (weights, memory) variant. Held-out text: the installed packages the training corpus holds out
         (scripts/corpus.py's rule by package name, seed 0, 5 %), read from this machine's Python.

Records follow benchmarks/results/*.json (benchmark, impl, shape, tokens, seconds / ms_per_token, device, date, plan)
with "quantize" ("none", "int8", "int4") and "mem_dtype" fields; --out writes them after every measurement (a run
cut short keeps what finished; a variant that fails is recorded with its error and the next one runs). --tiny runs
every section on tiny shapes (CPU, about a minute) for testing.

    python benchmarks/bench_quant.py --out benchmarks/results/h100-quant.json
    python benchmarks/bench_quant.py --tiny --device cpu --out /tmp/quant.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # corpus.py: the held-out split of the training corpus

from longllama import LongLlamaForCausalLM  # noqa: E402
from longllama.config import preset  # noqa: E402
from longllama.quantize import quantize_model  # noqa: E402

SHIPPED = ROOT / "src" / "longllama" / "models" / "small"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def random_model(config, device: str, seed: int = 0):
    """A bf16 model of `config` with weights drawn N(0, 0.02) from `seed` on `device` (the same draw every time)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LongLlamaForCausalLM(copy.deepcopy(config))  # quantize_model records itself in the config
    model.to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def variant(model, quantize: str, *, lm_head: bool = False, mem_dtype: str | None = None):
    """`model` with its weights quantized (in place, on their device) and its memory dtype set."""
    quantize_model(model, quantize, lm_head=lm_head)
    if mem_dtype is not None:
        model.config.mem_dtype = mem_dtype
    return model


class _Clock:
    """A streamer noting when each token arrives (generate puts the prompt first, then each token)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_timed(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """One greedy generation of new_tokens + 2 after `ids`: the prompt's ingest (the first token's wait), ms per
    token from the third token on (the first two absorb graph capture and tuning), and peak memory."""
    clock = _Clock(device)
    _sync(device)
    with torch.no_grad():
        model.generate(
            ids, max_new_tokens=new_tokens + 2, min_new_tokens=new_tokens + 2, do_sample=False, streamer=clock
        )
    _sync(device)
    t = clock.times
    steps = t[3:]
    return dict(
        ingest_seconds=t[1] - t[0],
        ms_per_token=(steps[-1] - t[2]) / len(steps) * 1e3,
        peak_gib=_peak_gib(device),
    )


def ingest_timed(model, ids: torch.Tensor, device: str) -> float:
    """Seconds of one forward over `ids` with the last position's logits (no cache kept)."""
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


def warm_up(model, device: str) -> float:
    """A short generation through every path a long one takes (window groups, decoding kernels): compilation and
    tuning stay out of the timed runs. Returns its seconds."""
    plan, window = model.plan, model.config.context_window
    n = max(2, 2 * (plan.window_group_tokens // window) + 1) * window
    ids = torch.randint(3, model.config.vocab_size, (1, n), device=device)
    start = time.perf_counter()
    ingest_timed(model, ids, device)
    generate_timed(model, ids[:, : 3 * window], 4, device)
    return time.perf_counter() - start


def logits_of(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, logits_to_keep=keep).logits[0].float().cpu()


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative (Frobenius) error, largest absolute difference and top-1 agreement of logits against `ref`."""
    return dict(
        rel_error=round(((logits - ref).norm() / ref.norm()).item(), 5),
        max_abs=round((logits - ref).abs().max().item(), 5),
        top1_agree=round((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
        ref_abs_max=round(ref.abs().max().item(), 4),
    )


def plan_of(model) -> dict:
    """The plan as a record field, with the fast paths that failed so far (each then served by its fallback)."""
    return {**model.plan.to_dict(), "failures": model.plan.failures.names()}


def guarded(records: Records, what: dict, run, device: str) -> None:
    """run(); a failure is recorded (one line, the variant named) and the next variant goes on: one GPU command
    should bring back every measurement that works."""
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        traceback.print_exc()
        records.add(**what, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    finally:
        _free(device)


class Records:
    """The records so far, written to --out (atomically) after every section."""

    def __init__(self, out: str | None, common: dict):
        self.out, self.common, self.items = out, common, []

    def add(self, **record) -> None:
        record = {**record, **self.common}
        self.items.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "plan"}), flush=True)
        self.save()  # a run cut short keeps every finished measurement

    def save(self) -> None:
        if not self.out:
            return
        path = Path(self.out)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.items, indent=1))
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------


def section_3b(args, records: Records) -> None:
    shape = "tiny" if args.tiny else "3b"
    config = preset(shape, **({"attn_impl": "fast"} if not args.tiny else {}))
    tokens, after, check = args.tokens, args.decode_after, args.check_tokens
    ids = torch.randint(
        3, config.vocab_size, (1, max(tokens, after, check)), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(args.device)
    ref = []
    names = args.variants_3b.split(",")
    unknown = [name for name in names if name not in VARIANTS_3B]
    if unknown:
        raise SystemExit(f"unknown --variants-3b {', '.join(unknown)}: pick from {', '.join(VARIANTS_3B)}")
    for name in names:
        quantize, lm_head, mem_dtype = VARIANTS_3B[name]
        impl = f"longllama-{name}"
        what = dict(benchmark="3b", impl=impl, shape=args.shape_3b, quantize=quantize)
        guarded(
            records,
            what,
            lambda q=quantize, h=lm_head, m=mem_dtype, i=impl: _one_3b(args, records, config, ids, ref, q, h, m, i),
            args.device,
        )
    records.save()


# The 3B section's variants: name -> (weights, lm_head quantized too, memory dtype or None for the model's).
# The logits of each are compared with the first one's ("none" first: bf16).
VARIANTS_3B = {
    "none": ("none", False, None),
    "int8": ("int8", False, None),
    "int4": ("int4", False, None),
    "int4-lm_head": ("int4", True, None),
    "int4-int8mem": ("int4", False, "int8"),
}


def _one_3b(args, records, config, ids, ref: list, quantize: str, lm_head: bool, mem_dtype, impl: str) -> None:
    tokens, after, check = args.tokens, args.decode_after, args.check_tokens
    model = variant(random_model(config, args.device), quantize, lm_head=lm_head, mem_dtype=mem_dtype)
    try:
        base = dict(impl=impl, shape=args.shape_3b, quantize=quantize, mem_dtype=model.config.mem_dtype)
        base["lm_head_quantized"] = lm_head
        warm = warm_up(model, args.device)
        logits = logits_of(model, ids[:, :check], args.keep)
        if quantize == "none":
            ref[:] = [logits]
        elif ref:
            records.add(benchmark="logits", tokens=check, vs="none (bf16)", **compare(logits, ref[0]), **base)
        seconds = [ingest_timed(model, ids[:, :tokens], args.device) for _ in range(2)][-1]
        records.add(
            benchmark="ingest",
            tokens=tokens,
            seconds=round(seconds, 4),
            tokens_per_s=round(tokens / seconds),
            warmup_seconds=round(warm, 2),
            plan=plan_of(model),
            **base,
        )
        timed = generate_timed(model, ids[:, :after], args.decode_tokens, args.device)
        records.add(
            benchmark="decode",
            tokens=after,
            mode="greedy",
            ms_per_token=round(timed["ms_per_token"], 3),
            prompt_ingest_seconds=round(timed["ingest_seconds"], 3),
            plan=plan_of(model),
            **base,
        )
    finally:
        del model
        _free(args.device)


def section_7b(args, records: Records) -> None:
    shape = "tiny" if args.tiny else "code-7b"
    config = preset(shape, **({"attn_impl": "fast"} if not args.tiny else {}))
    ids = torch.randint(3, config.vocab_size, (1, args.long_tokens), generator=torch.Generator().manual_seed(2))
    ids = ids.to(args.device)
    variants = [("none", "bfloat16"), ("int4", "int8")]
    if args.split_7b:
        variants += [("int4", "bfloat16"), ("none", "int8")]
    for quantize, mem_dtype in variants:
        impl = f"longllama-{quantize}-mem-{mem_dtype}"
        what = dict(benchmark="long", impl=impl, shape=args.shape_7b, quantize=quantize, mem_dtype=mem_dtype)
        guarded(records, what, lambda q=quantize, m=mem_dtype: _one_7b(args, records, config, ids, q, m), args.device)
    records.save()


def _one_7b(args, records, config, ids, quantize: str, mem_dtype: str) -> None:
    n = ids.shape[1]
    model = variant(random_model(config, args.device), quantize, mem_dtype=mem_dtype)
    try:
        warm = warm_up(model, args.device)
        _free(args.device)
        _reset_peak(args.device)  # from here: what a loaded checkpoint of these weights needs
        weights = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        timed = generate_timed(model, ids, args.decode_tokens, args.device)
        records.add(
            benchmark="long",
            impl=f"longllama-{quantize}-mem-{mem_dtype}",
            shape=args.shape_7b,
            quantize=quantize,
            mem_dtype=mem_dtype,
            tokens=n,
            peak_gib=None if timed["peak_gib"] is None else round(timed["peak_gib"], 2),
            weights_gib=None if weights is None else round(weights, 2),
            prompt_ingest_seconds=round(timed["ingest_seconds"], 3),
            tokens_per_s=round(n / timed["ingest_seconds"]),
            ms_per_token=round(timed["ms_per_token"], 3),
            warmup_seconds=round(warm, 2),
            plan=plan_of(model),
        )
    finally:
        del model
        _free(args.device)


def heldout_texts() -> list[str]:
    """Documents of the packages the training corpus holds out (scripts/corpus.py's split rule, by name: the same
    on every machine), installed here: the standard library's and the distributions'. Only the held-out packages are
    read (the corpus also drops held-out files duplicated in training packages; that check is skipped here)."""
    import corpus

    options = corpus.CorpusOptions()
    sources = corpus.find_sources(options)
    split = corpus.split_packages(
        {s.name: s.size() for s in sources},
        seed=options.seed,
        heldout_fraction=options.heldout_fraction,
        max_heldout_bytes=options.max_heldout_bytes,
    )
    held = [s for s in sources if split[s.name] == corpus.HELDOUT]
    packages = [corpus._read_package(s, corpus.HELDOUT, set(), options) for s in held]
    return sorted((doc for p in packages for doc in p.documents), key=len, reverse=True)


def section_small(args, records: Records) -> None:
    from longllama.evals import perplexity
    from longllama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(SHIPPED)
    target = args.ppl_target
    try:
        documents = perplexity.load_documents(
            heldout_texts(), tokenizer, needed_tokens=args.ppl_context + target, max_docs=args.ppl_docs
        )
    except Exception as exc:  # noqa: BLE001 - no held-out text long enough here: the pass keys still run
        records.add(benchmark="perplexity", shape="small", error=f"{type(exc).__name__}: {exc}"[:300])
        documents = []
    variants = [("none", "bfloat16"), ("none", "int8"), ("int8", "int8"), ("int4", "int8")]
    for quantize, mem_dtype in variants:
        what = dict(benchmark="small", impl=f"small-{quantize}-mem-{mem_dtype}", quantize=quantize, mem_dtype=mem_dtype)
        guarded(
            records,
            what,
            lambda q=quantize, m=mem_dtype: _one_small(args, records, tokenizer, documents, q, m),
            args.device,
        )
    records.save()


def _round_trip(args, records, model, base: dict) -> None:
    ids = torch.randint(3, model.config.vocab_size, (1, 3 * model.config.context_window), device=args.device)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(Path(folder) / "q")
        size = (Path(folder) / "q" / "model.safetensors").stat().st_size
        again = LongLlamaForCausalLM.from_pretrained(Path(folder) / "q", device_map=args.device)
        again.config.mem_dtype = model.config.mem_dtype
        same = torch.equal(logits_of(model, ids, 64), logits_of(again, ids, 64))
    records.add(benchmark="checkpoint", round_trip_identical=same, file_bytes=size, **base)


def _one_small(args, records, tokenizer, documents, quantize: str, mem_dtype: str) -> None:
    from longllama.evals import passkey, perplexity

    model = LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype=torch.bfloat16).to(args.device).eval()
    variant(model, quantize, mem_dtype=mem_dtype)
    lcl = model.config.last_context_length
    base = dict(impl=f"small-{quantize}-mem-{mem_dtype}", shape="small", quantize=quantize, mem_dtype=mem_dtype)
    try:
        if quantize != "none":  # the quantized checkpoint of this device's layout: saved, loaded, the same logits
            guarded(
                records,
                dict(benchmark="checkpoint", **base),
                lambda m=model: _round_trip(args, records, m, base),
                args.device,
            )
        start = time.perf_counter()
        trials = passkey.run_passkey(
            model,
            tokenizer,
            lengths=[args.passkey_tokens],
            trials=args.passkey_trials if quantize == "none" else args.passkey_trials_quantized,
            last_context_length=lcl,
            progress=False,
        )
        records.add(
            benchmark="passkey",
            tokens=args.passkey_tokens,
            trials=len(trials),
            correct=sum(t["correct"] for t in trials),
            seconds=round(time.perf_counter() - start, 1),
            **base,
        )
        if not documents:
            return
        rows = perplexity.run_perplexity(
            model,
            documents,
            contexts=[args.ppl_context],
            target_tokens=args.ppl_target,
            bos_id=tokenizer.bos_token_id,
            last_context_length=lcl,
            progress=False,
        )
        nll = sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)
        records.add(
            benchmark="perplexity",
            context=args.ppl_context,
            documents=len(rows),
            target_tokens=args.ppl_target,
            mean_nll=round(nll, 5),
            perplexity=round(math.exp(nll), 4),
            **base,
        )
    finally:
        del model
        _free(args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="3b,7b,small", help="comma-separated: 3b, 7b, small")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (a CPU test of the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32768, help="3B ingest length")
    ap.add_argument("--decode-after", type=int, default=32768, help="3B prompt before decoding")
    ap.add_argument("--check-tokens", type=int, default=8192, help="3B logits comparison input")
    ap.add_argument("--keep", type=int, default=512, help="positions whose logits are compared")
    ap.add_argument("--decode-tokens", type=int, default=32)
    names = ", ".join(VARIANTS_3B)
    ap.add_argument("--variants-3b", default="none,int8,int4,int4-lm_head", help=f"3B variants, bf16 first: {names}")
    ap.add_argument("--long-tokens", type=int, default=262144, help="Code 7B input")
    ap.add_argument("--split-7b", action="store_true", help="also int4 with bf16 memory and bf16 with int8 memory")
    ap.add_argument("--passkey-tokens", type=int, default=131072)
    ap.add_argument("--passkey-trials", type=int, default=20, help="pass-key seeds with bf16 weights")
    ap.add_argument("--passkey-trials-quantized", type=int, default=5, help="pass-key seeds with int8/int4 weights")
    ap.add_argument("--ppl-context", type=int, default=16384)
    ap.add_argument("--ppl-target", type=int, default=255)
    ap.add_argument("--ppl-docs", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.decode_after, args.check_tokens, args.keep = 200, 150, 150, 32
        args.long_tokens, args.decode_tokens = 300, 4
        args.passkey_tokens, args.passkey_trials = 1024, min(args.passkey_trials, 2)
        args.passkey_trials_quantized = min(args.passkey_trials_quantized, 1)
        args.ppl_context, args.ppl_target, args.ppl_docs = 1024, 64, min(args.ppl_docs, 2)
    args.shape_3b = "tiny" if args.tiny else "3b"
    args.shape_7b = "tiny" if args.tiny else "code-7b"
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    import torchao

    common = dict(
        device=card, date=datetime.date.today().isoformat(), torch=torch.__version__, torchao=torchao.__version__
    )
    records = Records(args.out, common)
    sections = {"3b": section_3b, "7b": section_7b, "small": section_small}
    for name in args.sections.split(","):
        start = time.perf_counter()
        sections[name](args, records)
        print(f"section {name}: {time.perf_counter() - start:.1f} s", flush=True)
    records.save()


if __name__ == "__main__":
    main()
