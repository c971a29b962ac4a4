"""benchmarks/bench_inference.py's arithmetic: the project's benchmark floors (benchmarks/RESULTS.md) and the FLOPs an
ingest does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_inference")

from longllama.config import preset  # noqa: E402

PARAMS_3B = 3_426_473_600  # the 3B shape's parameters, embeddings and lm_head included (BENCHMARKS.md: 3.43 B)


def test_floors_are_those_of_the_benchmarks_page():
    config = preset("3b")
    ingest = {n: bench.ingest_floor_s(config, PARAMS_3B, n, hf=False) for n in (131072, 262144, 1048576)}
    assert ingest[131072] == pytest.approx(1.7, abs=0.05)  # "128k ~ 1.3e15 FLOP (~1.7 s at 750 TFLOP/s)"
    assert ingest[262144] == pytest.approx(4.2, abs=0.1)  # "256k ~ 3.1e15 (~4.2 s)"
    assert 37 <= ingest[1048576] <= 38.5  # "1M ~ 2.8e16 (~37 s)", local attention counted here
    assert bench.decode_floor_ms(config, PARAMS_3B, 32768, hf=False) == pytest.approx(2.7, abs=0.05)
    assert bench.decode_floor_ms(config, PARAMS_3B, 262144, hf=False) == pytest.approx(5.6, abs=0.1)  # "~5.5 ms"


def test_ingest_flops_count_the_layers_each_window_runs():
    config = preset("3b")
    n = 262144
    every = bench.ingest_flops(config, n, hf=False, skip_dead_layers=False)
    skip = bench.ingest_flops(config, n, hf=False, skip_dead_layers=True)
    h, inter = config.hidden_size, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 3 * h * inter) + 2 * h * config.context_window  # products + local
    m = n - config.last_context_length  # tokens of the memory windows
    dropped = m * 7 * per_token_layer  # layers 19-25 for all but the final window
    # layer 18 (the last memory layer) only projects those windows' keys and values: no queries, output, MLP, local
    # attention, nor their attention over the memory (~2 h n^2)
    dropped += m * (per_token_layer - 2 * 2 * h * h) + 2 * h * n * n
    assert every - skip == pytest.approx(dropped, rel=0.01)
    assert bench.ingest_flops(config, n, hf=True) > every  # full attention in every layer
