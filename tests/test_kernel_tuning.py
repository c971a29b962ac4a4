"""How the decoding kernels get their configurations without timing anything (kernels.Kernel): a table tuned on this
GPU (fast/tuning.py) before the shipped table before the rule (fast/tables.py); the rule's configurations valid for
the model shapes (and computing the right thing in Triton's interpreter); the tuned table's file round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_steps

from longllama import timings
from longllama.config import PRESETS, preset
from longllama.fast import decode_attention, gemv, kernels, tables, tuning

triton = pytest.importorskip("triton")

SHIPPED_SMALL = json.loads(
    (__import__("pathlib").Path(__file__).parents[1] / "src/longllama/models/small/config.json").read_text()
)


def _configs(name: str):
    if name == "small":
        c = SHIPPED_SMALL
        return dict(
            hidden=c["hidden_size"],
            inter=c["intermediate_size"],
            heads=c["num_attention_heads"],
            kv=c["num_key_value_heads"],
            d=c["head_dim"],
            vocab=c["vocab_size"],
        )
    c = preset(name)
    return dict(
        hidden=c.hidden_size,
        inter=c.intermediate_size,
        heads=c.num_attention_heads,
        kv=c.num_key_value_heads,
        d=c.head_dim,
        vocab=c.vocab_size,
    )


def _gemv_keys(s):
    """(N, K, NORM, swiglu) of a decoding step's products: q/k/v stacked, output, gate/up, down, lm_head."""
    qkv = (s["heads"] + 2 * s["kv"]) * s["d"]
    return [
        (qkv, s["hidden"], True, False),
        (s["hidden"], s["heads"] * s["d"], False, False),
        (s["inter"], s["hidden"], True, True),
        (s["hidden"], s["inter"], False, False),
        (s["vocab"], s["hidden"], True, False),
    ]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


SHAPES = ["tiny", "small", "3b", "code-7b"]


@pytest.mark.parametrize("shipped", ["none", "as shipped"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_rule_gives_valid_configurations_for_every_shape(shape, shipped):
    assert set(SHAPES) - {"small"} <= set(PRESETS)
    s = _configs(shape)
    for n, k, norm, swiglu in _gemv_keys(s):
        for m in (1, 2, 4):
            table = {} if shipped == "none" else (tables.GEMV_SWIGLU if swiglu else tables.GEMV)
            rule = tables.gemv_swiglu_rule if swiglu else tables.gemv_rule
            meta, warps, stages = rule(dict(N=n, K=k, M=m, NORM=norm), table, "torch.bfloat16")
            bn, bk = meta["BLOCK_N"], meta["BLOCK_K"]
            assert set(meta) == {"BLOCK_N", "BLOCK_K"}
            assert _is_pow2(bn) and _is_pow2(bk) and bk >= 16 and bn * bk <= 8192, (n, k, meta)
            assert bk <= max(16, 1 << (k - 1).bit_length())  # no block wider than K needs
            assert warps in (1, 2, 4, 8) and stages in (None, 1, 2, 3, 4)
            # the several-row kernels' tiles: tl.dot takes at least 16 in every dimension
            meta, warps, stages = tables.gemv_rows_rule(dict(N=n, K=k, M=8), {}, "torch.bfloat16")
            assert all(_is_pow2(v) and v >= 16 for v in meta.values()) and set(meta) == {"BLOCK_N", "BLOCK_K"}
            assert warps in (1, 2, 4, 8) and stages in (1, 2, 3, 4)
    width = 8 * math.ceil(s["d"] / 8)  # the local buffers' rows (attention.kernel_head_dim) and a memory of 16s
    for tokens in (64, 2048, 32768, 262144, 1 << 20):
        chunk = decode_attention.chunk_for(tokens, s["heads"])
        for stored in (width, 16 * math.ceil(s["d"] / 16)):
            read = min(stored, 16 * math.ceil(s["d"] / 16))
            table = {} if shipped == "none" else tables.DECODE_ATTENTION
            meta, warps, stages = tables.decode_attention_rule(
                dict(chunk=chunk, D=s["d"], D_READ=read), table, "torch.bfloat16"
            )
            assert _is_pow2(meta["BLOCK_N"]) and chunk % meta["BLOCK_N"] == 0  # whole tiles per chunk
            assert warps in (1, 2, 4, 8) and stages in (1, 2, 3)


def test_the_rule_takes_a_shape_measured_on_another_gpu():
    key = dict(N=9600, K=3200, M=1, NORM=True)  # the 3B model's q/k/v product, measured on the H100
    measured = tables.GEMV[("NVIDIA H100 80GB HBM3", "torch.bfloat16", 9600, 3200, 1, True)]
    assert tables.gemv_rule(key, tables.GEMV, "torch.bfloat16") == (*measured, None)
    assert tables.gemv_rule(key, {}, "torch.bfloat16") == ({"BLOCK_N": 4, "BLOCK_K": 1024}, 4, None)


def _fp32_linear(x, w):
    return F.linear(x.float(), w.float())


@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_the_rules_configurations_compute_the_products(monkeypatch, shape):
    """The rule's (unmeasured) configurations for the small shapes, run by Triton's interpreter, against fp32."""
    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    s = _configs(shape)
    torch.manual_seed(0)
    x = torch.randn(1, 1, s["hidden"], dtype=torch.bfloat16)
    for n, k, _, _ in _gemv_keys(s)[:2]:
        if k != s["hidden"]:
            continue
        meta, _, _ = tables.gemv_rule(dict(N=n, K=k, M=1, NORM=False), {}, "torch.bfloat16")
        monkeypatch.setattr(gemv, "_DEFAULTS", meta)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        want = _fp32_linear(x, w)
        assert_within_steps(
            gemv.linear(x, w, cpu=True), want, dtype=torch.bfloat16, steps=4, magnitude=want.abs().max()
        )
    d = s["d"]
    q = torch.randn(1, s["heads"], d)
    keys = torch.randn(1, s["kv"], 64, d)
    values = torch.randn(1, s["kv"], 64, d)
    chunk = decode_attention.chunk_for(64, s["heads"])
    meta, _, _ = tables.decode_attention_rule(dict(chunk=chunk, D=d, D_READ=d), {}, "torch.float32")
    monkeypatch.setattr(decode_attention, "_DEFAULTS", meta)
    out = decode_attention.attend(q, keys, values, torch.tensor([63]))
    group = s["heads"] // s["kv"]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    ref = ((q[:, :, None] @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v)[:, :, 0]
    assert (out - ref).abs().max() < 1e-5


class _FakeJit:
    """Stands in for a compiled Triton kernel: records the launch options instead of running anything."""

    arg_names = ["x_ptr", "N", "K"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launches.append((args, options))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGLLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _kernel(shipped):
    rule = lambda key, table, dtype: ({"BLOCK_N": 8, "BLOCK_K": 256}, 2, None)  # noqa: E731
    return kernels.Kernel("gemv", _FakeJit(), [], ["N", "K"], shipped, rule)


def test_a_tuned_table_beats_the_shipped_one_which_beats_the_rule(cache_dir, monkeypatch):
    monkeypatch.setattr(kernels, "_device_name", lambda t: "Some GPU")
    x = torch.zeros(4, dtype=torch.bfloat16)
    shipped = {("Some GPU", "torch.bfloat16", 64, 32): ({"BLOCK_N": 2, "BLOCK_K": 512}, 4, 3)}
    kernel = _kernel(shipped)
    mark = timings.mark()
    kernel.run(lambda meta: (1,), (x, 64, 32), {})
    kernel.run(lambda meta: (1,), (x, 128, 32), {})
    assert kernel.fn.launches[0][1] == {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}
    assert kernel.fn.launches[1][1] == {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 2}
    configs = [e for e in timings.since(mark) if e.kind == "config"]
    assert [e.source for e in configs] == ["shipped table", "rule"]
    assert {e.kind for e in timings.since(mark)} == {"config", "compile"}  # first launches of each configuration

    tuned = {"gemv": (["N", "K"], {("torch.bfloat16", 64, 32): ({"BLOCK_N": 1, "BLOCK_K": 1024}, 8, 2)})}
    path = tuning.write(tuning.file_for("Some GPU"), "Some GPU", tuned)
    assert path.parent == cache_dir / "tuning"
    fresh = _kernel(shipped)  # a later process: the table on disk comes first
    fresh.run(lambda meta: (1,), (x, 64, 32), {})
    assert fresh.fn.launches[0][1] == {"BLOCK_N": 1, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 2}
    assert fresh.cache[("Some GPU", "torch.bfloat16", 64, 32)][3] == "tuned table"


def test_the_tuned_table_round_trips_and_merges(cache_dir):
    path = tuning.file_for("NVIDIA H200")
    first = {
        "decode_attention": (["chunk", "D", "D_READ"], {("torch.bfloat16", 256, 100, 112): ({"BLOCK_N": 32}, 1, 3)})
    }
    second = {
        "gemv": (
            ["N", "K", "M", "NORM"],
            {("torch.bfloat16", 9600, 3200, 1, True): ({"BLOCK_N": 4, "BLOCK_K": 1024}, 4, None)},
        )
    }
    tuning.write(path, "NVIDIA H200", first)
    tuning.write(path, "NVIDIA H200", second)  # merged with what was there
    assert tuning.read(path) == {
        "decode_attention": {("torch.bfloat16", 256, 100, 112): ({"BLOCK_N": 32}, 1, 3)},
        "gemv": {("torch.bfloat16", 9600, 3200, 1, True): ({"BLOCK_N": 4, "BLOCK_K": 1024}, 4, None)},
    }
    assert tuning.table("NVIDIA H200") == tuning.read(path)
    assert not list(path.parent.glob(".*.tmp"))  # nothing left of the atomic write
    raw = json.loads(path.read_text())
    assert raw["device"] == "NVIDIA H200" and raw["format"] == tuning.FORMAT


def test_a_broken_table_is_ignored_with_a_warning(cache_dir):
    path = tuning.file_for("Broken GPU")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="longllama tune"):
        assert tuning.table("Broken GPU") == {}


def test_the_shipped_tables_name_configurations_of_their_lists():
    # `longllama tune` tunes over these lists: a shipped entry outside them could never have been measured there.
    from longllama.fast import decode_kernels, gemv_kernels

    listed = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in gemv_kernels._CONFIGS}
    for table in (tables.GEMV, tables.GEMV_SWIGLU):
        assert table and all((tuple(sorted(meta.items())), w) in listed for meta, w, *_ in table.values())
    decode_listed = {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in decode_kernels._CONFIGS}
    assert tables.DECODE_ATTENTION
    for meta, w, *stages in tables.DECODE_ATTENTION.values():  # num_stages: as listed, default 3
        assert (meta["BLOCK_N"], w, stages[0] if stages and stages[0] else 3) in decode_listed


def test_autotuning_is_a_plan_choice_off_by_default():
    from longllama.plan import ExecutionPlan, parse_overrides

    assert ExecutionPlan().autotune is False
    assert ExecutionPlan().replace(**parse_overrides(["autotune=true"])).autotune is True
