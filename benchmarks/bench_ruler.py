"""RULER throughput: samples a minute per task on the 3B shape (random bf16 weights), in one GPU command.

Each task's samples at --length are made (on the CPU, as `longllama eval ruler` makes them) and answered by
`model.generate` one after the other, after one warm-up generation that takes compilation and tuning out of the
timed samples. The model is the 3B shape with the shipped tokenizer's vocabulary (8,192 tokens where the 3B
checkpoint has 32,000: the tokenizer must decode what the model writes); its weights are random, so its answers
run to each task's full new-token budget and its scores mean nothing. Records per task: samples, samples per
minute (making and answering), mean seconds to make a sample and to answer it, mean prompt tokens; a --deadline in
seconds stops starting new tasks. --tiny runs the tiny shape at a short length on the CPU to test the script.

    python benchmarks/bench_ruler.py --length 131072 --samples 3 --out benchmarks/results/h100-ruler-3b.json
    python benchmarks/bench_ruler.py --tiny --device cpu --out /tmp/ruler.json
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import SHIPPED, Records, _sync, random_model, warm_up  # noqa: E402

from longllama.config import preset  # noqa: E402
from longllama.evals import ruler  # noqa: E402
from longllama.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny shape at 2k tokens on the CPU (tests the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=131072, help="tokens per sample (the model's own tokens)")
    ap.add_argument("--tasks", default=",".join(ruler.TASKS), help="comma-separated RULER tasks (default: all)")
    ap.add_argument("--samples", type=int, default=3, help="samples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=480, help="seconds after which no new task starts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    tasks = [t for t in args.tasks.split(",") if t]
    length = 2048 if args.tiny else args.length
    tokenizer = load_tokenizer(SHIPPED)
    ruler.check_lengths(tokenizer, tasks, [length], seed=args.seed)
    shape = "tiny" if args.tiny else "3b"
    model = random_model(preset(shape, vocab_size=len(tokenizer)), args.device)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    records = Records(args.out, dict(device=card, date=datetime.date.today().isoformat(), torch=torch.__version__))
    warm_seconds = warm_up(model, args.device)
    records.add(benchmark="ruler_warm_up", shape=shape, seconds=warm_seconds)
    for task in tasks:
        if time.perf_counter() - start > args.deadline:
            records.add(benchmark="ruler_throughput", shape=shape, task=task, length=length, skipped=True)
            continue
        _sync(args.device)
        done = ruler.run_ruler(
            model, tokenizer, tasks=[task], lengths=[length], samples=args.samples, seed=args.seed, progress=False
        )
        _sync(args.device)
        (cell,) = ruler.summarize(done)
        records.add(
            benchmark="ruler_throughput",
            shape=shape,
            vocab_size=model.config.vocab_size,
            task=task,
            length=length,
            samples=len(done),
            samples_per_minute=cell["samples_per_minute"],
            make_seconds=sum(r["generate_seconds"] for r in done) / len(done),
            answer_seconds=sum(r["model_seconds"] for r in done) / len(done),
            answer_seconds_each=[r["model_seconds"] for r in done],
            mean_tokens=cell["mean_tokens"],
            max_new_tokens=ruler.TASKS[task].max_new_tokens,
            plan=model.plan.to_dict(),
        )
    records.save()
    print(f"bench_ruler: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
