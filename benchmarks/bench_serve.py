"""Serving benchmark on one GPU: time to first token over a long document, and concurrent streams decoded together.

A random bf16 model of one shape is saved to a folder and loaded from it (as `longllama serve` loads a model), with the
shipped model's tokenizer; documents are pass-key haystacks (their content does not change the timings).
- ttft: a `--question-tokens` question after a `--doc-tokens` document, from the request to the first new token:
  (reingest) the document and question read as one prompt; (gpu_memory) after a DocumentMemory held on the GPU;
  (disk_memory) DocumentMemory.load from its folder (the files dropped from the OS page cache first, so they are read
  from the disk; checksums verified) and then the question; once for each of `--recompute-layers` (the records'
  `recompute_layers`: the first k memory layers computed again from the saved tokens while the others are read).
- arrivals (not in the default parts): --arrivals requests arriving at random, at most max(--streams) together:
  tokens per second, and the graph captures and row layouts their joins and ends cost.
- concurrent_decode: 1, 4 and 8 streams (`--streams`) over different `--stream-doc-tokens` memories, `--new-tokens`
  each, decoded together by BatchGenerator: aggregate new tokens per second from submitting the questions to the last
  token; the same through HTTP (`longllama serve` in a process of its own, or with `--http-server thread` its app
  in this process; streamed completions from one thread per client, in a process of their own, connected before
  the clock starts and sending together); and one stream through model.generate (the single-sequence decoder) as the
  baseline. The batch records carry the steps' median wall time (`step_ms_median`) and the GPU's time per step
  (`gpu_ms`), the HTTP ones the time per token within the streams (`token_ms`) and the server engine's counters over
  the run (`server`: steps, their seconds and GPU seconds, prompts and reading passes, layouts, graph captures); both
  suppress EOS (the HTTP requests' ignore_eos) and, with --temperature, sample each stream with a seed of its own.
  --rounds N: each stream count's engine run and HTTP run again, alternating, N times with the server up (the
  HTTP records then carry their round's `cost_per_token`): a GPU's speed drifts by several per cent over minutes.
  --trace: the most streams once more under torch's profiler.
Prints a table; --out writes records in the format of benchmarks/results/*.json.

    python benchmarks/bench_serve.py --shape 3b --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from bench_inference import _random_model

from longllama import LongLlamaForCausalLM, timings
from longllama.batch import BatchGenerator
from longllama.cli import SHIPPED_MODEL
from longllama.config import preset
from longllama.document_memory import DocumentMemory
from longllama.evals import passkey
from longllama.plan import parse_overrides
from longllama.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model_folder(shape: str, folder: Path, device: str) -> None:
    """A random bf16 model of `shape` saved (safetensors) with the shipped tokenizer; kept from an earlier run with
    the same --work folder (the same seed and shape give the same weights)."""
    done = folder / f".{shape}-saved"
    if done.exists():
        return
    torch.manual_seed(0)
    config = preset(shape)
    if config.vocab_size < 8192:  # the shipped tokenizer's ids must fit (a toy shape for trying the script out)
        config = preset(shape, vocab_size=8192)
    model = _random_model(LongLlamaForCausalLM, config, device)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (SHIPPED_MODEL / name).is_file():
            shutil.copy(SHIPPED_MODEL / name, folder / name)
    del model
    done.touch()


def _document(tokenizer, tokens: int, seed: int) -> str:
    prompt, _ = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, tokens, seed=seed), 1000 + seed)
    return prompt


def _question(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _drop_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _first_token(engine: BatchGenerator, ids: list[int], **kwargs) -> float:
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        stream = engine.add(ids, max_new_tokens=1, **kwargs)
        if hasattr(engine, "admit"):  # reads the prompt (older code read it in add): the first token is on the host
            engine.admit()
    assert stream.finished and len(stream.tokens) == 1
    return time.perf_counter() - start


def ttft(model, tokenizer, args, work: Path) -> list[dict]:
    engine = BatchGenerator(model, max_rows=1)
    vocab = len(tokenizer)
    text = _document(tokenizer, args.doc_tokens, 0)
    question = _question(0, args.question_tokens, vocab)
    memory = DocumentMemory.build(model, tokenizer, text, template="none")
    ids = list(memory.format.prefix_ids) + memory.format.document_ids(text)
    assert len(ids) == memory.tokens
    records = []

    def record(source: str, times: list[float], **extra) -> None:
        records.append(
            dict(benchmark="ttft", source=source, tokens=memory.tokens, question_tokens=len(question),
                 seconds=round(min(times[1:] or times), 4), first_seconds=round(times[0], 4), runs=len(times),
                 **extra)
        )  # fmt: skip
        print(f"ttft {source:12s} {memory.tokens} tokens: {records[-1]['seconds'] * 1e3:9.1f} ms "
              f"(first {times[0] * 1e3:.1f} ms)", flush=True)  # fmt: skip

    times = [_first_token(engine, ids + question) for _ in range(args.repeats)]
    record("reingest", times)
    cached = dict(cache=memory.cache, last_context_length=memory.last_context_length)
    times = [_first_token(engine, question, **cached) for _ in range(args.repeats + 2)]
    record("gpu_memory", times, memory_gib=round(memory.nbytes() / 2**30, 3))
    folder = memory.save(work / "document")
    size = sum(p.stat().st_size for p in folder.iterdir())
    layers = len(model.config.mem_layers)
    for k in sorted({min(int(k), layers) for k in args.recompute_layers.split(",")}):
        options = dict(recompute_layers=k) if k else {}  # (older code has no recompute_layers)
        times, loads = [], []
        for _ in range(args.repeats):
            _drop_from_page_cache(folder)
            _sync()
            start = time.perf_counter()
            loaded = DocumentMemory.load(folder, model, tokenizer, **options)
            _sync()
            loads.append(time.perf_counter() - start)
            cached = dict(cache=loaded.cache, last_context_length=loaded.last_context_length)
            times.append(loads[-1] + _first_token(engine, question, **cached))
        differs = _largest_difference(memory.cache, loaded.cache)
        del loaded
        record("disk_memory", times, load_seconds=round(min(loads), 4), file_gib=round(size / 2**30, 3),
               recompute_layers=k, memory_layers=layers, max_abs_diff=differs)  # fmt: skip
    return records


def _largest_difference(built, loaded) -> float:
    """The largest difference between two caches' local caches and memories (0: the load gave the build's)."""
    largest = 0.0
    for a, b in zip(built.layers, loaded.layers):
        pairs = [(a.keys, b.keys), (a.values, b.values)]
        if a.memory is not None:
            pairs += list(zip(a.memory.padded(), b.memory.padded()))
        for x, y in pairs:
            largest = max(largest, (x.float() - y.float()).abs().max().item())
    return largest


def _memories(model, tokenizer, args) -> list[DocumentMemory]:
    return [
        DocumentMemory.build(model, tokenizer, _document(tokenizer, args.stream_doc_tokens, 1 + i), template="none")
        for i in range(max(args.streams))
    ]


def _sampling(args, stream: int) -> dict:
    """BatchGenerator.add's sampling options of stream `stream` (--temperature; a seed of its own)."""
    return {"do_sample": True, "temperature": args.temperature, "seed": stream} if args.temperature > 0 else {}


def _engine(model, args, rows: int) -> BatchGenerator:
    options = dict(overlap=False) if args.no_overlap else {}  # older code has no overlap argument
    return BatchGenerator(model, max_rows=rows, **options)


def concurrent(model, tokenizer, args, memories) -> tuple[list[dict], Callable[[int], dict]]:
    """The records of the engine's runs (and the single-sequence baseline), and `measure(k)`, one more run of k
    streams as a record (the rounds of over_http)."""
    engine = _engine(model, args, max(args.streams))
    vocab = len(tokenizer)
    records = []

    def run(k: int, new_tokens: int) -> tuple[float, float, dict]:
        """(seconds in all, seconds of the prompts' reading, the CUDA graph captures' count and seconds and the
        steps' wall times: with overlap a step's wall time is the GPU's time for one step once the queue is full)."""
        _sync()
        mark = timings.mark()
        gpu = engine.stats().get("gpu_seconds", 0.0) if hasattr(engine, "stats") else None
        start = time.perf_counter()
        steps = []
        with torch.no_grad():
            for i in range(k):
                m = memories[i]
                # EOS suppressed, as the server does for the HTTP runs' requests (ignore_eos): the same work a step
                engine.add(_question(i, args.question_tokens, vocab), cache=m.cache,
                           last_context_length=m.last_context_length, max_new_tokens=new_tokens,
                           **suppress, **_sampling(args, i))  # fmt: skip
            if hasattr(engine, "admit"):  # the prompts are read here (older code read each in add)
                engine.admit()
            _sync()
            added = time.perf_counter() - start
            while engine.active:
                before = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - before)
        captures = [e for e in timings.since(mark) if e.kind == "capture"]
        counted = dict(captures=len(captures), capture_seconds=round(sum(e.seconds for e in captures), 4))
        if steps:
            middle = sorted(steps)[len(steps) // 2]
            counted.update(steps=len(steps), step_ms_median=round(middle * 1e3, 3),
                           step_ms_slow=round(sum(t for t in steps if t > 2 * middle) * 1e3, 2))  # fmt: skip
            if gpu is not None:  # the device's own time per step (BatchGenerator.stats)
                counted["gpu_ms"] = round((engine.stats().get("gpu_seconds", 0.0) - gpu) / len(steps) * 1e3, 3)
        return time.perf_counter() - start, added, counted

    engine_overlap = getattr(engine, "overlap", False)
    suppress = {"suppress_tokens": [tokenizer.eos_token_id]}

    def measure(k: int) -> dict:
        run(k, 4)  # warm-up: graph capture for this batch size, kernels for its shapes
        seconds, added, counted = run(k, args.new_tokens)
        rate = k * args.new_tokens / seconds
        print(f"decode {k} streams (batch):     {rate:9.1f} tokens/s  ({seconds:.3f} s; reading the {k} prompts "
              f"{added:.3f} s; {counted})", flush=True)  # fmt: skip
        return dict(benchmark="concurrent_decode", streams=k, http=False, engine="batch", temperature=args.temperature,
                    new_tokens=args.new_tokens, memory_tokens=memories[0].tokens, overlap=engine_overlap,
                    seconds=round(seconds, 4), tokens_per_s=round(rate, 1), add_seconds=round(added, 4),
                    **counted)  # fmt: skip

    for k in args.streams:
        records.append(measure(k))
    if args.trace and torch.cuda.is_available():
        _trace(run, max(args.streams))
    m = memories[0]
    question = torch.tensor([_question(0, args.question_tokens, vocab)], device=model.lm_head.weight.device)
    for n in (4, args.new_tokens):
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(question, cache=m.cache, last_context_length=m.last_context_length, max_new_tokens=n,
                           min_new_tokens=n)  # fmt: skip
        _sync()
        seconds = time.perf_counter() - start
    rate = args.new_tokens / seconds
    records.append(dict(benchmark="concurrent_decode", streams=1, http=False, engine="generate",
                        new_tokens=args.new_tokens, memory_tokens=m.tokens, seconds=round(seconds, 4),
                        tokens_per_s=round(rate, 1)))  # fmt: skip
    print(f"decode 1 stream (generate):     {rate:9.1f} tokens/s  ({seconds:.3f} s)", flush=True)
    return records, measure


def _trace(run, k: int, new_tokens: int = 32) -> None:
    """The GPU kernels of `k` streams decoded together (graph replays included), under torch's profiler: the
    heaviest by their own GPU time, and the kernels' time per step against the steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    run(k, 4)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, added, counted = run(k, new_tokens)
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=20), flush=True)
    kernels_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(
        f"trace {k} streams: kernels {kernels_ms / counted['steps']:.3f} ms a step, wall {counted} "
        f"(reading the prompts {added:.3f} s of {seconds:.3f} s)",
        flush=True,
    )


def arrivals(model, tokenizer, args, memories) -> list[dict]:
    """Requests arriving at random (exponential gaps at --arrival-rate a second), each over one of the memories
    with a question and 0.5-1.5x --new-tokens (seeded), at most max(--streams) decoded together, the others
    waiting: new tokens per second in all, and the CUDA graph captures and row layouts the joins and ends cost."""
    import random

    k = max(args.streams)
    engine = _engine(model, args, k)
    vocab = len(tokenizer)
    rng = random.Random(0)
    t, plan = 0.0, []
    for i in range(args.arrivals):
        t += rng.expovariate(args.arrival_rate)
        plan.append((t, i % len(memories), rng.randint(args.new_tokens // 2, args.new_tokens * 3 // 2)))
    decoder = engine._decoder
    layouts = getattr(decoder, "layouts", None)
    count_layouts = [0]
    if layouts is None:  # older code has no counter: count the calls
        real = decoder._layout

        def counted(*a, **kw) -> None:
            count_layouts[0] += 1
            real(*a, **kw)

        decoder._layout = counted
    _sync()
    mark = timings.mark()
    start = time.perf_counter()
    streams, waiting = [], list(plan)
    with torch.no_grad():
        while waiting or engine.active:
            now = time.perf_counter() - start
            while waiting and waiting[0][0] <= now and not engine.full:
                _, i, n = waiting.pop(0)
                m = memories[i]
                streams.append(engine.add(_question(len(streams), args.question_tokens, vocab), cache=m.cache,
                                          last_context_length=m.last_context_length, max_new_tokens=n))  # fmt: skip
            if engine.active:
                engine.step()
            elif waiting:
                time.sleep(max(0.0, min(0.005, waiting[0][0] - now)))
    _sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(s.tokens) for s in streams)
    captures = [e for e in timings.since(mark) if e.kind == "capture"]
    laid = decoder.layouts - layouts if layouts is not None else count_layouts[0]
    record = dict(benchmark="arrivals", streams=k, requests=len(streams), arrival_rate=args.arrival_rate,
                  new_tokens=tokens, seconds=round(seconds, 4), tokens_per_s=round(tokens / seconds, 1),
                  captures=len(captures), capture_seconds=round(sum(e.seconds for e in captures), 4), layouts=laid,
                  overlap=getattr(engine, "overlap", False))  # fmt: skip
    print(f"arrivals: {len(streams)} requests at {args.arrival_rate}/s, at most {k} together: {tokens / seconds:.1f} "
          f"tokens/s ({seconds:.2f} s), {len(captures)} captures ({record['capture_seconds']:.2f} s), {laid} "
          f"layouts", flush=True)  # fmt: skip
    return [record]


def over_http(model, tokenizer, args, work: Path, keep, measure: Callable[[int], dict] | None = None) -> None:
    """The concurrent streams through HTTP; each record handed to `keep` as soon as it is measured (the server's
    start and the memories' reading take a while on a fresh machine). With `measure` (concurrent's), each of
    `--rounds` rounds measures the engine alone, then the same streams through HTTP, and the overhead per round is
    printed: a GPU's speed drifts by several per cent over minutes, which runs minutes apart would count as the
    server's."""
    import httpx
    import uvicorn

    from longllama.serve import ServeConfig, create_app

    k_max = max(args.streams)
    # Every memory stays loaded (the default budget of 4 GiB holds five of the 3B shape's 16k-token memories: the
    # others would be read from disk again for each request, which is not the server overhead measured here).
    config = ServeConfig(model_id="bench", memory_dir=str(work / "memories"), queue=4 * k_max, max_batch=k_max,
                         max_tokens=args.new_tokens, max_prompt_tokens=args.question_tokens * 8,
                         max_body_bytes=64 << 20, memory_budget=1 << 40)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.http_server == "process":  # what a user runs: `longllama serve`, its model on its main thread
        command = [sys.executable, "-m", "longllama.cli", "serve", "--model", str(work / "model"), "--port",
                   str(port), "--memory-dir", config.memory_dir, "--queue", str(config.queue), "--max-batch",
                   str(config.max_batch), "--max-tokens", str(config.max_tokens), "--max-prompt-tokens",
                   str(config.max_prompt_tokens), "--max-body-bytes", str(config.max_body_bytes), "--memory-budget",
                   str(config.memory_budget), "--device", args.device, "--dtype", "bfloat16"]  # fmt: skip
        for change in args.plan or ():
            command += ["--plan", change]
        # Its output goes to a file: a server left running must not hold this benchmark's pipe open.
        log = open(work / "serve.log", "wb")  # noqa: SIM115 (closed with the process below)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = thread = None
    else:  # create_app in this process, its model on a thread of its own
        app = create_app(model, tokenizer, config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        process = None
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if process is not None and process.poll() is not None:
                tail = (work / "serve.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"longllama serve ended with status {process.returncode}:\n{tail}") from None
            time.sleep(0.2)
    ids = []
    for i in range(k_max):
        text = _document(tokenizer, args.stream_doc_tokens, 1 + i)
        made = httpx.post(f"{url}/v1/memories", json={"text": text, "template": "none"}, timeout=600)
        made.raise_for_status()
        ids.append(made.json()["id"])
    print(f"http: server up and {k_max} memories made in {time.perf_counter() - began:.1f} s", flush=True)
    question = "What is the pass key? The pass key is"
    # The clients run in a process of their own: in this one their threads would take the interpreter from the
    # server's model thread, and the numbers would measure that contention rather than the server.
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(k: int, n: int) -> tuple[float, int, dict, dict]:
        """(seconds, new tokens, the clients' per-token timing, the server engine's counters over the run: where the
        model thread's time went)."""
        before = httpx.get(f"{url}/health", timeout=10).json().get("engine", {})  # older servers have none
        seconds, tokens, timing = pool.submit(_http_clients, url, ids[:k], question, n, args.temperature).result()
        after = httpx.get(f"{url}/health", timeout=10).json().get("engine", {})
        return seconds, tokens, timing, {key: round(after[key] - before[key], 4) for key in after}

    for k in args.streams:
        for round_ in range(args.rounds if measure is not None else 1):
            alone = measure(k) if measure is not None else None
            run(k, 4)
            seconds, tokens, timing, engine = run(k, args.new_tokens)
            assert tokens == k * args.new_tokens, (tokens, k)
            rate = tokens / seconds
            print(f"decode {k} streams (HTTP, {args.http_server}): {rate:9.1f} tokens/s  ({seconds:.3f} s; {timing}; "
                  f"the server's engine: {engine})", flush=True)  # fmt: skip
            record = dict(benchmark="concurrent_decode", streams=k, http=True, engine="batch",
                          http_server=args.http_server, temperature=args.temperature, new_tokens=args.new_tokens,
                          memory_tokens=None, seconds=round(seconds, 4), tokens_per_s=round(rate, 1), **timing,
                          server=engine)  # fmt: skip
            if alone is not None:
                # the server's cost per token: its time per token over the engine's, less one
                cost = alone["tokens_per_s"] / rate - 1
                alone["round"] = record["round"] = round_
                record["cost_per_token"] = round(cost, 4)
                print(f"round {round_}, {k} streams: the server's cost per token {100 * cost:.1f} %", flush=True)
            keep([r for r in (alone, record) if r is not None])
    pool.shutdown()
    if process is not None:
        stopping = time.perf_counter()
        process.terminate()
        try:  # a server still there 20 s after it stopped serving prints its threads' stacks (cli.serve)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # it prints its threads' stacks (cli.serve) before it is killed
            time.sleep(2)
            process.kill()
            process.wait()
        log.close()
        seconds = time.perf_counter() - stopping
        print(f"http: the server stopped {seconds:.1f} s after SIGTERM (status {process.returncode}); its output: "
              f"{work / 'serve.log'}", flush=True)  # fmt: skip
        if seconds > 5:
            print((work / "serve.log").read_text(errors="replace")[-6000:], flush=True)
    else:
        server.should_exit = True
        thread.join(timeout=30)


def _http_clients(
    url: str, memory_ids: list[str], question: str, n: int, temperature: float = 0.0
) -> tuple[float, int, dict]:
    """One streaming completion of `n` tokens per memory, all at once (a thread each); (seconds until the last
    ended, new tokens counted from the streams' usage, and per-token timing: `token_ms`, the mean over the streams of
    the time from a stream's first text to its last over its tokens between, which leaves out when the requests
    arrived and were read; `first_spread_s`, from the first stream's first text to the last stream's)."""
    import httpx

    counts = [0] * len(memory_ids)
    first = [0.0] * len(memory_ids)
    last = [0.0] * len(memory_ids)
    # Each client is made (and connected) before the clock starts, and all send at once: making an httpx client
    # (its TLS context) took milliseconds of this process's interpreter each, which spread the requests out.
    clients = [httpx.Client(timeout=600) for _ in memory_ids]
    for c in clients:
        c.get(f"{url}/health")
    ready = threading.Barrier(len(memory_ids) + 1)

    def client(i: int) -> None:
        body = {"prompt": question, "memory": memory_ids[i], "max_tokens": n, "temperature": temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        if temperature > 0:  # each stream its own seed, as the engine's runs (_sampling)
            body["seed"] = i
        ready.wait()
        with clients[i].stream("POST", f"{url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if '"usage":{' in line:
                    counts[i] = json.loads(line[6:])["usage"]["completion_tokens"]
                elif '"text":""' not in line:
                    last[i] = time.perf_counter()
                    first[i] = first[i] or last[i]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(memory_ids))]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in clients:
        c.close()
    # Streams whose text came in fewer than two pieces say nothing of the time per token: a random model's greedy
    # tokens can be pieces of characters that are held back until the end.
    timed = [(a, b, c) for a, b, c in zip(first, last, counts) if b > a]
    per_token = [(b - a) / max(1, c - 1) for a, b, c in timed]
    timing = dict(token_ms=round(1e3 * sum(per_token) / len(per_token), 3) if timed else None,
                  first_spread_s=round(max(a for a, _, _ in timed) - min(a for a, _, _ in timed), 4) if timed else None,
                  timed_streams=len(timed))  # fmt: skip
    return seconds, sum(counts), timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--doc-tokens", type=int, default=131072)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--stream-doc-tokens", type=int, default=16384)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="ttft,concurrent,http")
    parser.add_argument(
        "--recompute-layers",
        default="0",
        help="ttft part: memory layers recomputed in the disk loads, comma-separated (e.g. 0,1,2)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="with concurrent and http: each stream count's engine and HTTP runs again, alternating, this many "
        "times with the server up, each HTTP record with its round's cost per token",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample the concurrent and HTTP streams (each its own seed); 0: greedy. A random model's greedy "
        "tokens can repeat one piece of a character, which the server holds back to the end: few pieces are sent",
    )
    parser.add_argument("--http-server", choices=("process", "thread"), default="process",
                        help="http part: `longllama serve` in a process of its own (its model on its main thread), "
                        "or create_app in this process with the model on a thread of its own")  # fmt: skip
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="concurrent part: each step's tokens handed out before the next step is launched",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="concurrent part: the most streams once more under torch's profiler (GPU only)",
    )
    parser.add_argument("--arrivals", type=int, default=32, help="arrivals part: requests")
    parser.add_argument("--arrival-rate", type=float, default=8.0, help="arrivals part: requests a second")
    parser.add_argument("--work", help="folder for the model and memories (default: a temporary one)")
    parser.add_argument("--out")
    parser.add_argument("--plan", action="append", metavar="KEY=VALUE", help="execution plan changes (repeatable)")
    args = parser.parse_args(argv)
    args.streams = [int(k) for k in args.streams.split(",")]
    parts = set(args.parts.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "model"
    start = time.perf_counter()
    _model_folder(args.shape, folder, args.device)
    model = LongLlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(args.device).eval()
    changes = parse_overrides(args.plan)
    if changes:
        model.set_plan(**changes)
    tokenizer = load_tokenizer(folder)
    print(f"model saved and loaded in {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    records: list[dict] = []

    def keep(new: list[dict]) -> None:  # written after each part: a later failure keeps what was measured
        for r in new:
            r.update(shape=args.shape, device=device, date=datetime.date.today().isoformat(), torch=torch.__version__,
                     plan_changes=changes)  # fmt: skip
        records.extend(new)
        if args.out:
            out = Path(args.out)
            temp = out.with_name(f".{out.name}.tmp")
            temp.write_text(json.dumps({"records": records}, indent=1) + "\n")
            os.replace(temp, out)

    if "ttft" in parts:
        keep(ttft(model, tokenizer, args, work))
    memories = _memories(model, tokenizer, args) if parts & {"concurrent", "arrivals"} else []
    measure = None
    if "concurrent" in parts:
        engine_records, measure = concurrent(model, tokenizer, args, memories)
        keep(engine_records)
    if "arrivals" in parts:
        keep(arrivals(model, tokenizer, args, memories))
    if "http" in parts:
        over_http(model, tokenizer, args, work, keep, measure if args.rounds else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
