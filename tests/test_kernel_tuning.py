"""Measured autotuning choices (kernels.measured_choice): a known GPU, dtype and key compiles only its measured
configuration; anything else keeps the whole list for Triton's autotuner."""

from __future__ import annotations

import pytest
import torch

from longllama.fast import kernels

triton = pytest.importorskip("triton")


def _configs():
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n in (1, 4) for k in (256, 1024) for w in (2, 4)
    ]


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(kernels, "_device_name", lambda t: "NVIDIA H100 80GB HBM3")


def test_a_measured_key_keeps_only_its_configuration(h100):
    measured = {("NVIDIA H100 80GB HBM3", "torch.bfloat16", 9600, 3200, 1, True): ({"BLOCK_N": 4, "BLOCK_K": 1024}, 4)}
    prune = kernels.measured_choice(measured, ["N", "K", "M", "NORM"])
    x = torch.zeros(3200, dtype=torch.bfloat16)
    picked = prune(_configs(), {"x_ptr": x, "N": 9600, "M": 1}, K=3200, NORM=True)  # constexprs come as kwargs
    assert [(c.kwargs, c.num_warps) for c in picked] == [({"BLOCK_N": 4, "BLOCK_K": 1024}, 4)]


@pytest.mark.parametrize("change", ["key", "dtype", "gpu", "missing config"])
def test_anything_unmeasured_is_tuned_over_the_whole_list(monkeypatch, change):
    name = "NVIDIA H200" if change == "gpu" else "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(kernels, "_device_name", lambda t: name)
    meta = {"BLOCK_N": 8, "BLOCK_K": 256} if change == "missing config" else {"BLOCK_N": 1, "BLOCK_K": 256}
    measured = {("NVIDIA H100 80GB HBM3", "torch.bfloat16", 3200, 3200, 1, False): (meta, 2)}
    prune = kernels.measured_choice(measured, ["N", "K", "M", "NORM"])
    x = torch.zeros(3200, dtype=torch.float16 if change == "dtype" else torch.bfloat16)
    n = 4096 if change == "key" else 3200
    configs = _configs()
    assert prune(configs, {"x_ptr": x, "N": n, "M": 1}, K=3200, NORM=False) == configs


def test_the_shipped_tables_name_configurations_of_their_lists():
    # An entry outside its kernel's list would silently fall back to tuning in full.
    from longllama.fast import gemv_kernels, tables

    listed = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in gemv_kernels._CONFIGS}
    for table in (tables.GEMV, tables.GEMV_SWIGLU):
        assert table and all((tuple(sorted(meta.items())), w) in listed for meta, w in table.values())
    from longllama.fast import decode_kernels

    decode_listed = {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in decode_kernels._CONFIGS}
    assert tables.DECODE_ATTENTION
    for meta, w, *stages in tables.DECODE_ATTENTION.values():  # num_stages: as listed, default 3
        assert (meta["BLOCK_N"], w, stages[0] if stages else 3) in decode_listed


def test_an_unexpected_call_convention_tunes_over_everything(monkeypatch):
    def broken(t):
        raise RuntimeError("no device name")

    monkeypatch.setattr(kernels, "_device_name", broken)
    prune = kernels.measured_choice({}, ["N"])
    configs = _configs()
    assert prune(configs, {"x_ptr": torch.zeros(2), "N": 1}) == configs
