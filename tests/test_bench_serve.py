"""benchmarks/bench_serve.py in a tiny run (the GPU command's CPU rehearsal): BatchGenerator and `longllama serve`
in a process of its own answer every stream in full, the first-token part times its three sources, requests
arriving at random are all answered, and the records say which server measured what."""

from __future__ import annotations

import json

import pytest
from conftest import run_benchmark

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def test_tiny_run_measures_batch_and_http_streams(tmp_path):
    out = tmp_path / "serve.json"
    result = run_benchmark(
        "bench_serve.py", "--shape", "tiny", "--device", "cpu", "--doc-tokens", "1536", "--stream-doc-tokens", "1024",
        "--question-tokens", "16", "--new-tokens", "8", "--repeats", "1", "--streams", "1,2", "--parts",
        "ttft,concurrent,arrivals,http", "--arrivals", "4", "--arrival-rate", "100", "--rounds", "1", "--work",
        str(tmp_path / "work"), "--out", str(out), "--recompute-layers", "0,1,5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    decode = [r for r in records if r["benchmark"] == "concurrent_decode"]
    http = {r["streams"]: r for r in decode if r["http"]}
    batch = {r["streams"]: r for r in decode if not r["http"] and r["engine"] == "batch"}
    assert set(http) == set(batch) == {1, 2}
    assert all(r["http_server"] == "process" and r["tokens_per_s"] > 0 for r in http.values())
    # the server's counters over each run: every stream's prompt read, a step per token after the first
    assert all(r["server"]["prompts"] == k and r["server"]["steps"] >= 7 for k, r in http.items())
    assert all(0 < r["token_ms"] < 1e3 * r["seconds"] and r["first_spread_s"] >= 0 for r in http.values())
    assert all(r["tokens_per_s"] > 0 and r["memory_tokens"] > 0 for r in batch.values())
    # one round: the engine alone again right before each HTTP run, the HTTP record its cost against that run
    rounds = [r for r in decode if not r["http"] and r.get("round") == 0]
    assert [r["streams"] for r in rounds] == [1, 2] and all(r["round"] == 0 for r in http.values())
    for alone in rounds:
        cost = alone["tokens_per_s"] / http[alone["streams"]]["tokens_per_s"] - 1
        assert http[alone["streams"]]["cost_per_token"] == pytest.approx(cost, abs=1e-3)
    # the first token comes with the prompt's reading, each of the other seven from a step of its own
    assert all(r["steps"] == 7 and 0 < r["step_ms_median"] <= 1e3 * r["seconds"] for r in batch.values())
    (arrived,) = [r for r in records if r["benchmark"] == "arrivals"]
    assert arrived["requests"] == 4 and arrived["new_tokens"] >= 4 * 4 and arrived["layouts"] >= 1
    ttft = {(r["source"], r.get("recompute_layers")): r for r in records if r["benchmark"] == "ttft"}
    # tiny has two memory layers: 5 layers to recompute means both (the document read again from its saved tokens)
    assert set(ttft) == {("reingest", None), ("gpu_memory", None)} | {("disk_memory", k) for k in (0, 1, 2)}
    assert all(r["seconds"] > 0 and r["tokens"] > 1024 for r in ttft.values())
    assert all(ttft["disk_memory", k]["max_abs_diff"] == 0 for k in (0, 1, 2))  # the build's cache, however loaded
