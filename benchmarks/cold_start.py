"""Time to the first generated token in fresh processes, with an empty cache directory and then with the same one
again (warm), for `longllama generate` with a long prompt on a model of random weights and `longllama passkey` with
the shipped model, and generate with --compile on empty caches (what torch.compile costs a first run); then,
optionally, the steady-state benchmark (bench_inference.py, in the warm cache) and `longllama tune`.

Each command runs in a new Python process with LONGLLAMA_CACHE pointing at a folder of this run (the libraries'
own cache variables unset, so they follow it) and --verbose, whose report (longllama.timings) gives, in seconds since
the process started, when the first new token reached the host and how long the weights took to load:
first_token_s = (first token) - (weight loading); second_token_s likewise for the second token, the first the
decoder computes (its kernels compiled, its CUDA graph captured). For passkey the first token is the end of the
first trial's generation (the evaluation streams nothing). Records go to --out (rewritten after each step,
atomically) in the format of benchmarks/results/*.json, with "benchmark": "cold_start".

    python benchmarks/cold_start.py --out results/cold.json                      # 3B shape, 32k prompt, GPU
    python benchmarks/cold_start.py --bench --tune-out tuned.json --out cold.json  # + steady state and a table
    python benchmarks/cold_start.py --shape tiny --device cpu --prompt-tokens 256 --passkey-length 1k --out x.json

The random checkpoint is written to a temporary folder first (not timed). --budget-s stops before a step that the
time left cannot hold (its estimate), so one call fits a machine's command limit; the records so far are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SHIPPED = SRC / "longllama" / "models" / "small"
CACHE_VARIABLES = (
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR",
    "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",
    "XDG_CACHE_HOME",
)
# `at kind seconds s  name  [source]`, as longllama.timings.report writes a line
EVENT = re.compile(
    r"^\s*(?P<at>[\d.]+)\s+(?P<kind>[a-z]+)\s+(?P<seconds>[\d.]+) s  (?P<name>.*?)(?:  \[(?P<source>.*)\])?$"
)


def parse_report(stderr: str) -> list[dict]:
    """The events of a --verbose report (the lines after its header)."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if "timings (seconds since the process started" in line), None)
    if start is None:
        return []
    events = []
    for line in lines[start + 1 :]:
        m = EVENT.match(line)
        if m:
            events.append(
                dict(
                    at=float(m["at"]),
                    kind=m["kind"],
                    seconds=float(m["seconds"]),
                    name=m["name"],
                    source=m["source"] or "",
                )
            )
    return events


def summarize(events: list[dict]) -> dict:
    """first_token_s (process start to first token, weight loading excluded), load_s, and per kind count/seconds."""
    load = sum(e["seconds"] for e in events if e["kind"] == "load")
    token = next((e["at"] for e in events if e["kind"] == "token" and e["name"] == "first new token"), None)
    second = next((e["at"] for e in events if e["kind"] == "token" and e["name"] == "second new token"), None)
    kinds: dict[str, dict] = {}
    for e in events:
        entry = kinds.setdefault(e["kind"], {"count": 0, "seconds": 0.0})
        entry["count"] += 1
        entry["seconds"] = round(entry["seconds"] + e["seconds"], 3)
    sources: dict[str, int] = {}
    for e in events:
        if e["kind"] in ("compile", "config") and e["source"]:
            key = f"{e['kind']}: {e['source']}"
            sources[key] = sources.get(key, 0) + 1
    return dict(
        first_token_s=None if token is None else round(token - load, 3),
        first_token_at_s=token,
        second_token_s=None if second is None else round(second - load, 3),
        load_s=round(load, 3),
        kinds=kinds,
        sources=sources,
    )


def child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env["LONGLLAMA_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_command(args: list[str], cache: Path, timeout: float) -> tuple[int, str, str, float]:
    """`longllama ARGS` in a fresh process with its caches in `cache`: (exit status, stdout, stderr, seconds)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "longllama.cli", *args],
            env=child_env(cache),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        text = [x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)]
        code, stdout, stderr = 124, *text
    return code, stdout, stderr, time.perf_counter() - start


def random_checkpoint(folder: Path, shape: str, device: str) -> int:
    """A checkpoint of `shape` with random bf16 weights (normal, std 0.02) and the shipped tokenizer; its vocabulary
    at least the tokenizer's. Returns the vocabulary size."""
    import torch

    from longllama import LongLlamaForCausalLM
    from longllama.config import PRESETS, preset

    tokenizer_vocab = json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
    vocab = max(PRESETS[shape]["vocab_size"], tokenizer_vocab)
    with torch.device("meta"):
        model = LongLlamaForCausalLM(preset(shape, vocab_size=vocab))
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    model.config.dtype = torch.bfloat16
    model.cpu().save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (SHIPPED / name).exists():
            shutil.copy(SHIPPED / name, folder / name)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the child processes need the GPU's memory, not this one's allocator
    return vocab


def prompt_text(tokens: int) -> tuple[str, int]:
    """Filler text of about `tokens` tokens (shipped tokenizer) and its count (with the BOS token)."""
    from longllama.tokenizer import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer(SHIPPED)
    unit = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    per = len(encode_prompt(tokenizer, unit, bos=False))
    text, count = "", 1
    while count < tokens:  # units merge at their joins: add until the count is reached, then one unit at most over
        text += unit * max(1, (tokens - count) // per)
        count = len(encode_prompt(tokenizer, text, bos=True))
    return text, count


def write_atomically(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(temp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the records")
    ap.add_argument("--shape", default="3b", choices=["tiny", "3b", "code-7b"], help="random model of generate")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--prompt-tokens", type=int, default=32768, help="generate's prompt length (32768)")
    ap.add_argument("--new-tokens", type=int, default=16, help="generate's new tokens (16)")
    ap.add_argument("--passkey-length", default="128k", help="passkey's --lengths (128k)")
    ap.add_argument("--passkey-trials", type=int, default=2)
    ap.add_argument("--bench", action="store_true", help="then bench_inference.py --shape 3b (steady state, warm)")
    ap.add_argument("--tune-out", help="then `longllama tune --shape SHAPE` writing its table to this file")
    ap.add_argument("--skip-compiled", action="store_true", help="skip generate --compile on empty caches")
    ap.add_argument(
        "--commands",
        type=lambda text: [c for c in text.split(",") if c],
        default=["generate", "passkey"],
        help="which commands, in this order (generate,passkey)",
    )
    ap.add_argument("--budget-s", type=float, default=560.0, help="skip steps the time left cannot hold")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (model, caches)")
    args = ap.parse_args()
    if not args.commands or set(args.commands) - {"generate", "passkey"}:
        ap.error(f"--commands {','.join(args.commands)}: name generate and/or passkey, comma-separated")
    started = time.perf_counter()
    out = Path(args.out)
    sys.path.insert(0, str(SRC))
    import torch

    cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    body = dict(
        what=f"cold start: {args.shape} shape (random bf16 weights) generate with a {args.prompt_tokens}-token "
        f"prompt, passkey {args.passkey_length} with the shipped model; fresh processes, empty then warm caches",
        device=card,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        records=[],
    )
    work = Path(tempfile.mkdtemp(prefix="longllama-cold-"))

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    try:
        model_dir = work / "model"
        prompt_tokens = None
        if "generate" in args.commands:
            t = time.perf_counter()
            random_checkpoint(model_dir, args.shape, args.device)
            text, prompt_tokens = prompt_text(args.prompt_tokens)
            (work / "prompt.txt").write_text(text)
            print(f"random {args.shape} checkpoint, prompt ({prompt_tokens} tokens) in {time.perf_counter() - t:.1f} s")
        commands = {
            "generate": [
                "generate",
                "--model",
                str(model_dir),
                "--prompt-file",
                str(work / "prompt.txt"),
                "--max-new-tokens",
                str(args.new_tokens),
                "--device",
                args.device,
                "--verbose",
            ],
            "passkey": [
                "passkey",
                "--lengths",
                args.passkey_length,
                "--trials",
                str(args.passkey_trials),
                "--device",
                args.device,
                "--verbose",
            ],
        }
        # (command, compile setting, caches): each in a fresh process; "warm" reuses the command's cache folder.
        # The last one is generate with --compile on empty caches: what torch.compile's graphs cost a first run.
        runs = [(command, None, caches) for command in args.commands for caches in ("empty", "warm")]
        if not args.skip_compiled and "generate" in args.commands:
            runs.append(("generate", True, "empty"))
        estimates = {"empty": 150.0, "warm": 60.0}
        filled = set()  # cache folders an empty-cache run has filled: only those give "warm" runs
        for command, compiled, caches in runs:
            argv = commands[command] + ([] if compiled is None else ["--compile" if compiled else "--no-compile"])
            cache = work / (f"cache-{command}" + ("" if compiled is None else f"-compile-{compiled}"))
            if caches == "warm" and cache not in filled:
                print(f"skipped {command} (warm caches): its empty-cache run did not run")
                continue
            if left() < estimates[caches]:
                print(f"skipped {command} ({caches} caches): {left():.0f} s left")
                continue
            code, _, stderr, wall = run_command(argv, cache, timeout=max(30.0, left() - 20))
            filled.add(cache)
            events = parse_report(stderr)
            record = dict(
                benchmark="cold_start",
                command=command,
                caches=caches,
                **summarize(events),
                compile="default" if compiled is None else compiled,
                wall_s=round(wall, 2),
                returncode=code,
                argv=["longllama", *argv],
                events=events,
                device=card,
                date=body["date"],
            )
            if command == "generate":
                record.update(shape=args.shape, prompt_tokens=prompt_tokens, new_tokens=args.new_tokens)
            if code != 0:
                record["stderr_tail"] = stderr[-2000:]
            body["records"].append(record)
            write_atomically(out, body)
            print(
                f"{command:9s} caches {caches:5s} compile {record['compile']}: first token {record['first_token_s']} s "
                f"after start (load {record['load_s']} s excluded), process {wall:.1f} s, rc {code}; {record['kinds']}"
            )
        if args.bench and left() > 150:
            bench_out = work / "bench.json"
            cmd = [
                sys.executable,
                str(ROOT / "benchmarks" / "bench_inference.py"),
                "--shape",
                "3b",
                "--tokens",
                "32768,131072,262144",
                "--decode-after",
                "32768,262144",
                "--impls",
                "longllama",
                "--out",
                str(bench_out),
            ]
            t = time.perf_counter()
            done = subprocess.run(
                cmd, env=child_env(work / "cache-generate"), cwd=ROOT / "benchmarks", timeout=max(60.0, left() - 10)
            )
            if bench_out.exists():
                for rec in json.loads(bench_out.read_text()):
                    body["records"].append({**rec, "caches": "warm", "note": "steady state, new defaults"})
            print(f"bench_inference: rc {done.returncode} in {time.perf_counter() - t:.1f} s")
            write_atomically(out, body)
        if args.tune_out and left() > 240:
            t = time.perf_counter()
            argv = ["tune", "--shape", args.shape, "--tokens", "32768,262144", "--out", args.tune_out]
            code, stdout, stderr, wall = run_command(argv, work / "cache-tune", timeout=max(60.0, left() - 10))
            body["records"].append(
                dict(
                    benchmark="tune", command="tune", argv=["longllama", *argv], returncode=code, wall_s=round(wall, 1)
                )
            )
            print(f"tune: rc {code} in {wall:.1f} s: {(stdout + stderr).strip()[-500:]}")
            write_atomically(out, body)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({len(body['records'])} records) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
