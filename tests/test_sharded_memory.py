"""Memory sharded over processes (sharding.py, `model.shard_memory`): 2 and 4 gloo processes on the CPU, each
holding a slice of every memory, give the logits, generated tokens and beam search results of one process holding
the whole memory (the reference: the unsharded model, whose attention is tested against transformers elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longllama import LongLlamaForCausalLM, retrieval
from longllama.config import preset
from longllama.errors import InputError


def _model(**overrides) -> LongLlamaForCausalLM:
    torch.manual_seed(0)
    return LongLlamaForCausalLM(preset("tiny", **overrides)).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 320, (2, 600), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: padding flags reach the memory slices
    return ids, mask


def _run(model: LongLlamaForCausalLM) -> dict:
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        tokens = model.generate(ids[:, :500], attention_mask=mask[:, :500], max_new_tokens=60, do_sample=False)
        beams = model.generate(
            ids[:1, :300],
            max_new_tokens=6,
            num_beams=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    lengths = [layer.memory.length for layer in out.past_key_values.layers if layer.memory is not None]
    return {
        "logits": out.logits,
        "tokens": tokens,
        "beams": beams.sequences,
        "beam_scores": beams.sequences_scores,
        "memory": lengths,
    }


def _run_blocks(model: LongLlamaForCausalLM) -> dict:
    """Inputs whose memory appends are all one window (64 tokens): block b of 4 keys is in append b // 16."""
    ids = torch.randint(1, 320, (2, 24 + 64 * 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids[:, : 24 + 64 * 6], max_new_tokens=60, do_sample=False)
    return {"logits": logits, "tokens": tokens}


def _worker(rank: int, world: int, folder: str, overrides: dict, runner: str = "_run") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = _model(**overrides)
        plan = model.shard_memory()
        assert plan.to_dict()["memory_shards"] == world
        torch.save(globals()[runner](model), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single() -> dict:
    torch.set_num_threads(1)
    return _run(_model())


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_memory_equals_one_process(tmp_path: Path, single: dict, world: int):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(tmp_path), {}), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for result in results:
        torch.testing.assert_close(result["logits"], single["logits"], atol=2e-5, rtol=1e-5)
        assert torch.equal(result["tokens"], single["tokens"])
        assert torch.equal(result["beams"], single["beams"])
        torch.testing.assert_close(result["beam_scores"], single["beam_scores"], atol=1e-5, rtol=1e-5)
    # each process holds a slice: together exactly the whole memory, none more than its share plus a window
    for layer in range(len(single["memory"])):
        held = [result["memory"][layer] for result in results]
        assert sum(held) == single["memory"][layer]
        assert max(held) <= single["memory"][layer] // world + 64


def test_sharded_int8_memory_with_grouped_query_attention_equals_one_process(tmp_path: Path):
    overrides = dict(mem_dtype="int8", num_key_value_heads=2)
    mp.spawn(_worker, args=(2, str(tmp_path), overrides), nprocs=2, join=True)
    torch.set_num_threads(1)
    want = _run(_model(**overrides))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["logits"], want["logits"], atol=2e-5, rtol=1e-5)
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["beams"], want["beams"])


@pytest.mark.parametrize("recent", [0, 1])
def test_sharded_block_retrieval_reads_each_process_best_blocks(tmp_path: Path, monkeypatch, recent):
    """With block retrieval each process reads the best blocks of its own slice (with `recent`, its slice's most
    recent block among them). Reference: one process whose choice is the union, over the processes' slices, of each
    slice's best blocks (the slices known from the round-robin rule), read in one softmax."""
    world, overrides = 2, dict(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4, mem_recent_blocks=recent)
    mp.spawn(_worker, args=(world, str(tmp_path), overrides, "_run_blocks"), nprocs=world, join=True)
    original = retrieval.select_blocks

    def per_slice(qg, kmax, kmin, any_valid, blocks, real, bounds=None, super_size=0, supers=None, recent=0):
        owner = (torch.arange(kmax.shape[2]) * 4 // 64) % world  # block -> append -> process
        chosen = []
        for rank in range(world):
            mine = torch.nonzero(owner == rank).flatten()
            if len(mine):
                sliced = kmax[:, :, mine], kmin[:, :, mine], any_valid[:, mine]
                picked = original(qg, *sliced, blocks, real, bounds, recent=recent)
                chosen.append(mine[picked])
        return torch.cat(chosen, dim=-1).sort(dim=-1).values

    monkeypatch.setattr(retrieval, "select_blocks", per_slice)
    torch.set_num_threads(1)
    reference = _run_blocks(_model(**overrides))
    monkeypatch.undo()
    plain = _run_blocks(_model(**overrides))
    assert (plain["logits"] - reference["logits"]).abs().max() > 1e-4  # the union differs from one global choice
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], reference["logits"], atol=2e-5, rtol=1e-5)
        assert torch.equal(result["tokens"], reference["tokens"])


def test_sharding_needs_distributed_and_no_knn():
    with pytest.raises(InputError, match="torchrun"):
        _model().shard_memory()
    with pytest.raises(InputError, match="no kNN memory"):
        _model(mem_top_k=4).shard_memory()
