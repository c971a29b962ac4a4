"""Memory sharded over processes: each process of a torch.distributed group holds a slice of every memory layer's
memory, so that N processes (GPUs) hold N times the memory (docs/retrieval.md#sharded-memory).

Every process runs the whole model on the same input (weights, local caches and everything outside memory attention
are replicated; launch with torchrun and give each process the same prompt). Memory appends are dealt round-robin:
the i-th append event of a memory layer (a memory window of a long input, or a local cache overflowing into memory)
is stored by process i mod N only, so a process holds about 1/N of every memory. A memory layer's attention then runs
on every process over its own slice and the results are merged exactly (log-sum-exp), with one all-reduce of the
running maxima and one of the partial sums and weighted values:

    m = max over processes of the slice maxima and of the local scores' maximum
    out = (sum_local exp(s - m) v + sum over processes of sum_slice exp(s - m) v) / (the same sums of exp(s - m))

which is the one softmax over local and memory keys of docs/inference.md#attention, up to the order of sums (equal
to a single process within fp32 rounding; tested with 2 and 4 gloo processes). Every process computes the same
output, so the layers above agree everywhere and generation picks the same tokens on every process.

The API is `model.shard_memory(group)` (hf.py), recorded in the execution plan (`memory_shard`, `memory_shards` in
records). With block retrieval (mem_retrieval="blocks") each process reads the best blocks of its own slice, so N
processes read up to N times mem_blocks blocks per query group, merged the same way; kNN memory is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longllama import retrieval
from longllama.attention import _memory_scores, _memory_weighted, _scores, clamp_value
from longllama.errors import InputError
from longllama.memory import MemoryCache
from longllama.plan import ExecutionPlan


@dataclass(frozen=True)
class MemoryShard:
    """This process's place in the group that shares the memory: `rank` of `world`, over `group` (None: the default
    process group)."""

    group: Any
    rank: int
    world: int

    @classmethod
    def of(cls, group: Any = None) -> MemoryShard:
        """The shard of this process in `group` (torch.distributed initialised: torchrun, init_process_group)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise InputError(
                "shard_memory needs torch.distributed: launch with torchrun and call "
                "torch.distributed.init_process_group() first"
            )
        return cls(group=group, rank=dist.get_rank(group), world=dist.get_world_size(group))

    def takes(self, memory: MemoryCache) -> bool:
        """Whether this process stores the next append event of `memory` (round-robin); counts the event."""
        turn = memory.appends
        memory.appends += 1
        return turn % self.world == self.rank


def check_readable(config) -> None:
    """A one-line error when the config reads the memory in a way sharding cannot merge."""
    if config.mem_top_k is not None:
        raise InputError(
            "sharded memory takes no kNN memory (each process's top keys are not the top keys of the whole "
            "memory): set mem_top_k to null, or use mem_retrieval='blocks' (each process reads its best blocks)"
        )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    memory: MemoryCache | None,
    shard: MemoryShard,
    plan: ExecutionPlan | None = None,
) -> torch.Tensor:
    """One softmax over the local keys (the same on every process) and the memory of all processes (each holding its
    slice, maybe none yet), merged by log-sum-exp. Shapes as attention.attend; every process of the group must call
    it for the same layer with the same q, k, v. Under a `plan` with block retrieval each process reads only the
    best blocks of its own slice (retrieval.py), where its slice is larger than that."""
    c_min = clamp_value(q.dtype)
    local = _scores(q, k, visible, c_min).float()  # (b*s, h, n, kv)
    has_memory = memory is not None and memory.length > 0
    mem_scores = None
    block_read = None
    if has_memory and plan is not None and retrieval.retrieves(memory, plan):
        block_read = retrieval.read_blocks(q, memory, retrieval.BlockChoice.of(plan))
        mem_scores = block_read.scores.float()
        peak = mem_scores.amax(dim=-1)
    elif has_memory:
        from longllama.model import read_memory  # model imports this module

        mem_k, mem_v, _, valid, scales = read_memory(memory, q.device)
        k_scale, v_scale = scales if scales is not None else (None, None)
        mem_k = mem_k if k_scale is not None else mem_k.to(k.dtype)
        mem_scores = _memory_scores(q, mem_k, valid, c_min, None, memory.share, k_scale=k_scale).float()
        peak = mem_scores.amax(dim=-1)
    else:
        peak = torch.full(local.shape[:-1], float("-inf"), device=q.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=shard.group)
    peak = torch.maximum(peak, local.amax(dim=-1))[..., None]
    p_local = torch.exp(local - peak)
    d = q.shape[-1]
    partial = torch.zeros(*local.shape[:-1], d + 1, device=q.device)  # memory's weighted values and sum of weights
    if has_memory:
        p_mem = torch.exp(mem_scores - peak)
        if block_read is not None:
            partial[..., :d] = block_read.weighted(p_mem)
        else:
            partial[..., :d] = _memory_weighted(
                p_mem, mem_v.float() if v_scale is None else mem_v, memory.share, v_scale
            )
        partial[..., d] = p_mem.sum(dim=-1)
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=shard.group)
    b, h, n, kv = p_local.shape
    hkv = v.shape[1]
    local_out = (p_local.reshape(b, hkv, (h // hkv) * n, kv) @ v.float()).view(b, h, n, d)
    total = p_local.sum(dim=-1, keepdim=True) + partial[..., d:]
    return ((local_out + partial[..., :d]) / total).to(q.dtype)
