"""benchmarks/bench_quant.py in its tiny mode (the GPU command's CPU rehearsal): every section writes records in
the results format with "quantize" and "mem_dtype", failures recorded rather than fatal."""

from __future__ import annotations

import json

import pytest
from conftest import run_benchmark

pytest.importorskip("torchao")


def test_tiny_run_writes_records(tmp_path, bf16_cpu_attention):  # the rehearsal runs bf16 attention
    out = tmp_path / "quant.json"
    result = run_benchmark(
        "bench_quant.py", "--tiny", "--device", "cpu", "--sections", "3b,7b,small", "--passkey-trials", "1",
        "--ppl-docs", "1", "--variants-3b", "none,int4-int8mem", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    kinds = {(r["benchmark"], r.get("quantize"), r.get("mem_dtype")) for r in records}
    assert {("decode", "none", "float32"), ("decode", "int4", "int8"), ("logits", "int4", "int8")} <= kinds
    assert {("long", "none", "bfloat16"), ("long", "int4", "int8")} <= kinds
    assert {("passkey", "none", "bfloat16"), ("passkey", "none", "int8"), ("perplexity", "int4", "int8")} <= kinds
    long = [r for r in records if r["benchmark"] == "long"]
    assert all(
        r["ms_per_token"] > 0 and r["tokens"] == 300 and r["plan"]["weights"] == r["quantize"].replace("none", "dense")
        for r in long
    )
    ppl = {r["impl"]: r["perplexity"] for r in records if r["benchmark"] == "perplexity"}
    assert len(ppl) == 4 and all(v > 1 for v in ppl.values())
    # int8 and int4 checkpoints round trip on any device
    checkpoints = {r["quantize"]: r for r in records if r["benchmark"] == "checkpoint"}
    assert checkpoints["int8"]["round_trip_identical"] is True
    assert checkpoints["int4"]["round_trip_identical"] is True
