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

from longllama import LongLlamaForCausalLM
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


def _worker(rank: int, world: int, folder: str, overrides: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = _model(**overrides)
        plan = model.shard_memory()
        assert plan.to_dict()["memory_shards"] == world
        torch.save(_run(model), f"{folder}/rank{rank}.pt")
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


def test_sharding_needs_distributed_and_dense_reading():
    with pytest.raises(InputError, match="torchrun"):
        _model().shard_memory()
    with pytest.raises(InputError, match="read densely"):
        _model(mem_top_k=4).shard_memory()
