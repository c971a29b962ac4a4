"""Retrieval memory (`mem_retrieval="blocks"`): memory attention that reads only the memory blocks that matter.

The memory's keys are grouped in blocks of `block_size` consecutive keys. Each block keeps a summary (memory.py):
the per-dimension max and min of its keys, so that for any key k of the block and any query q

    q . k  <=  sum_d max(q_d * kmax_d, q_d * kmin_d)  =  relu(q) . kmax - relu(-q) . kmin

The queries of a window are taken in groups of `QUERY_GROUP` consecutive queries per key/value head (with grouped-
query attention, the query heads of one key/value head join the group); a group ranks the blocks by the largest
bound over its queries and keeps its `blocks` best (in memory order); the `recent` most recent blocks of the memory
(the text just before the window, which most tokens lean on: docs/retrieval.md) are always among them. Every query
of the group then attends exactly, in one softmax with its local keys (docs/inference.md#attention), to the keys of
those blocks; the other memory keys count as hidden. With `blocks` at least the number of blocks this is dense memory
attention (tested); with fewer it is an approximation of kNN memory that reads `blocks * block_size` keys per group
instead of all of them.
docs/retrieval.md gives the measurements behind the choice.

Shapes as in attention.py: q (b*s, h, n, d) with s the memory's `share` (beams of one prompt read one stored row);
the s rows of one stored row are folded into its query dimension (attention.fold_rows) before grouping, so beams of
one prompt share their selection. Keys and values are gathered from where the memory is stored: for a memory held
in CPU memory (`mem_offload`) the union of the selected blocks is copied to the query's device, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longllama.attention import _scores, _weighted, clamp_value, fold_rows, unfold_rows
from longllama.memory import MemoryCache, reduce_superblocks

if TYPE_CHECKING:
    from longllama.plan import ExecutionPlan

QUERY_GROUP = 64  # consecutive queries (per key/value head) sharing one selection of blocks
_BOUND_ELEMENTS = 1 << 24  # bound scores computed at a time (groups chunked to stay below)
# The two-level choice ranks this many candidate blocks per block it keeps (select_two_level).
SUPER_CANDIDATES = 16


@dataclass(frozen=True)
class BlockChoice:
    """How a query group chooses the memory it reads: its best `blocks` blocks of `block_size` keys, ranked in two
    levels through superblocks of `super_size` blocks (0: one level), `recent` of them always the memory's most
    recent (select_blocks). One object from the plan's fields (`of`), so a new setting reaches every reader."""

    blocks: int
    block_size: int
    super_size: int = 0
    recent: int = 0

    @classmethod
    def of(cls, plan: ExecutionPlan) -> BlockChoice:
        """The plan's mem_blocks, mem_block_size, mem_super_size and mem_recent_blocks."""
        return cls(plan.mem_blocks, plan.mem_block_size, plan.mem_super_size, plan.mem_recent_blocks)


def _grouped(x: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """(b, h, T, c) -> (b, kv_heads, groups, (h / kv_heads) * group, c): queries in groups of `group` consecutive
    positions, the query heads of one key/value head side by side; T padded with zeros to whole groups."""
    b, h, t, c = x.shape
    rep = h // kv_heads
    groups = -(-t // group)
    x = x.reshape(b, kv_heads, rep, t, c)
    if groups * group != t:
        x = F.pad(x, (0, 0, 0, groups * group - t))
    x = x.reshape(b, kv_heads, rep, groups, group, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, kv_heads, groups, rep * group, c)


def _ungrouped(x: torch.Tensor, heads: int, length: int, group: int) -> torch.Tensor:
    """_grouped undone: (b, kv_heads, groups, rep * group, c) -> (b, heads, length, c)."""
    b, kv_heads, groups, _, c = x.shape
    rep = heads // kv_heads
    x = x.reshape(b, kv_heads, groups, rep, group, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, heads, groups * group, c)[:, :, :length]


def select_blocks(
    qg: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    any_valid: torch.Tensor,
    blocks: int,
    real: torch.Tensor,
    bounds: Callable[..., torch.Tensor] | None = None,
    super_size: int = 0,
    supers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    recent: int = 0,
) -> torch.Tensor:
    """The `blocks` best blocks (ascending indices, (b, kv_heads, groups, blocks)) of each query group.

    qg (b, kv_heads, groups, rows, d) grouped queries; kmax, kmin (b, kv_heads, B, d) block summaries; any_valid (b,
    B) whether a block holds a valid key; real (groups, rows) whether a row is a query (not group padding).
    `bounds(qg, kmax, kmin, any_valid, real)`, where given, computes each group's best bound per block (b, kv_heads,
    groups, B), -inf for blocks without a valid key (the kernels' path: fast/block_attention.py); else the bounds
    are computed here, a chunk of groups at a time. `super_size` > 0: the two-level choice (select_two_level)
    where the memory holds more than SUPER_CANDIDATES * blocks blocks (and superblocks are at most
    (SUPER_CANDIDATES - 1) * blocks blocks, so that the candidates always hold `blocks` blocks of the memory);
    `supers`: their summaries where the memory keeps them (MemoryCache.super_summaries), else reduced here.
    `recent`: the last `recent` blocks (those holding a valid key) are chosen whatever their bound, the rest of the
    `blocks` by it."""
    b, hkv, groups, rows, _ = qg.shape
    n_blocks = kmax.shape[2]
    keep = min(blocks, n_blocks)
    if two_level(super_size, keep, n_blocks):
        supers = supers or reduce_superblocks(kmax, kmin, any_valid, super_size)
        return select_two_level(qg, kmax, kmin, any_valid, keep, real, bounds, super_size, supers, recent)
    forced = _recent_blocks(any_valid, recent)  # (b, 1, 1, B) or None
    if bounds is not None:
        best = bounds(qg, kmax, kmin, any_valid, real)
        if forced is not None:
            best = best.masked_fill(forced, float("inf"))
        return best.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    kmax_t, kmin_t = kmax.transpose(-1, -2)[:, :, None], kmin.transpose(-1, -2)[:, :, None]  # (b, hkv, 1, d, B)
    hidden = ~any_valid[:, None, None, :]
    step = max(1, _BOUND_ELEMENTS // max(1, b * hkv * rows * n_blocks))
    chosen = []
    for g0 in range(0, groups, step):
        q = qg[:, :, g0 : g0 + step].float()
        bound = q.clamp(min=0) @ kmax_t + q.clamp(max=0) @ kmin_t  # (b, hkv, c, rows, B)
        bound = bound.masked_fill(~real[g0 : g0 + step, :, None], float("-inf")).amax(dim=-2)
        bound = bound.masked_fill(hidden, float("-inf"))
        if forced is not None:
            bound = bound.masked_fill(forced, float("inf"))
        chosen.append(bound.topk(keep, dim=-1, sorted=False).indices)
    return torch.cat(chosen, dim=2).sort(dim=-1).values


def _recent_blocks(any_valid: torch.Tensor, recent: int) -> torch.Tensor | None:
    """Which blocks (b, 1, 1, B) select_blocks keeps whatever their bound: the last `recent` ones that hold a valid
    key; None for none."""
    if recent <= 0:
        return None
    n_blocks = any_valid.shape[-1]
    last = torch.arange(n_blocks, device=any_valid.device) >= n_blocks - recent
    return (any_valid & last)[:, None, None, :]


def two_level(super_size: int, keep: int, n_blocks: int) -> bool:
    """Whether select_blocks chooses in two levels (its docstring says when)."""
    return 0 < super_size <= (SUPER_CANDIDATES - 1) * keep and SUPER_CANDIDATES * keep < n_blocks


def select_two_level(
    qg: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    any_valid: torch.Tensor,
    keep: int,
    real: torch.Tensor,
    bounds: Callable[..., torch.Tensor] | None,
    super_size: int,
    supers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    recent: int = 0,
) -> torch.Tensor:
    """select_blocks in two steps, so that a query group reads O(B / super_size + keep) summaries instead of B: rank
    superblocks of `super_size` blocks by their bound and keep the best ceil(SUPER_CANDIDATES * keep / super_size),
    then rank only the blocks inside them (select_blocks says when). An approximation of select_blocks: a block
    whose superblock's (looser) bound misses the cut is not considered. `supers`: the superblocks' summaries
    (memory.reduce_superblocks). `recent` as in select_blocks: the superblocks holding those blocks are kept too."""
    b, hkv, groups, rows, d = qg.shape
    n_blocks = kmax.shape[2]
    n_supers = supers[0].shape[2]
    # the superblocks that hold the last `recent` blocks: at most ceil(keep / super_size) + 1 of the candidates'
    # ceil(SUPER_CANDIDATES * keep / super_size), since super_size <= (SUPER_CANDIDATES - 1) * keep
    recent_supers = n_supers - max(0, n_blocks - recent) // super_size if recent > 0 else 0
    best = select_blocks(qg, *supers, -(-SUPER_CANDIDATES * keep // super_size), real, bounds, recent=recent_supers)
    offsets = torch.arange(super_size, device=best.device)
    candidates = (best[..., None] * super_size + offsets).flatten(-2)  # (b, hkv, groups, C): ascending
    inside = candidates < n_blocks  # the last superblock may be short
    candidates = candidates.clamp(max=n_blocks - 1)
    width = candidates.shape[-1]
    step = max(1, _BOUND_ELEMENTS // max(1, b * hkv * width * max(rows, d)))
    chosen = []
    for g0 in range(0, groups, step):
        cand = candidates[:, :, g0 : g0 + step]
        c = cand.shape[2]
        index = cand.reshape(b, hkv, c * width, 1).expand(-1, -1, -1, d)
        cmax = kmax.gather(2, index).reshape(b, hkv, c, width, d).transpose(-1, -2)
        cmin = kmin.gather(2, index).reshape(b, hkv, c, width, d).transpose(-1, -2)
        q = qg[:, :, g0 : g0 + step].float()
        bound = q.clamp(min=0) @ cmax + q.clamp(max=0) @ cmin  # (b, hkv, c, rows, width)
        bound = bound.masked_fill(~real[g0 : g0 + step, :, None], float("-inf")).amax(dim=-2)
        valid = any_valid.gather(1, cand.reshape(b, -1)).reshape(cand.shape)
        # a candidate without a valid key ranks below every valid one, and one past the memory below those: the
        # keep chosen are distinct blocks of the memory (keep <= the candidates inside it)
        bound = bound.masked_fill(~valid, torch.finfo(bound.dtype).min)
        if recent > 0:
            bound = bound.masked_fill(valid & (cand >= n_blocks - recent), float("inf"))
        bound = bound.masked_fill(~inside[:, :, g0 : g0 + step], float("-inf"))
        chosen.append(cand.gather(-1, bound.topk(keep, dim=-1, sorted=False).indices))
    return torch.cat(chosen, dim=2).sort(dim=-1).values


def gather_blocks(
    memory: MemoryCache, chosen: torch.Tensor, block_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (b, kv_heads, groups, keep * block_size, d) in `dtype` and valid flags (b, kv_heads, groups,
    keep * block_size) of the chosen blocks (b, kv_heads, groups, keep), on `device`. Positions past the memory's end
    (the last block may be short) count as invalid. From a memory on another device only the union of the chosen
    blocks is copied; memory.read_bytes counts the bytes of keys and values read."""
    b, hkv, groups, keep = chosen.shape
    d, length, src = memory.head_dim, memory.length, memory.device
    tokens = _block_tokens(chosen, block_size)
    if src != device or memory.pin_memory:  # held apart (offloaded): the union of the blocks, copied once
        union, inverse = _row_union(chosen.reshape(b, hkv, -1))
        part = _gather_tokens(memory, _block_tokens(union, block_size))
        k, v, valid = (t.to(device, non_blocking=True) for t in part[:3])
        scales = None if part[3] is None else tuple(t.to(device, non_blocking=True) for t in part[3])
        local = _block_tokens(inverse.reshape(chosen.shape), block_size)
        k, v, valid = (_take(t, local) for t in (k, v, valid))
        scales = None if scales is None else tuple(_take(t, local) for t in scales)
    else:
        k, v, valid, scales = _gather_tokens(memory, tokens)
    valid = valid & (tokens < length).to(valid.device)
    if scales is not None:
        k, v = (k.float() * scales[0][..., None]).to(dtype), (v.float() * scales[1][..., None]).to(dtype)
    else:
        k, v = k.to(dtype), v.to(dtype)
    shape = (b, hkv, groups, keep * block_size)
    return k.reshape(*shape, d), v.reshape(*shape, d), valid.reshape(shape)


def _block_tokens(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The token positions (b, kv_heads, K * block_size) of blocks (b, kv_heads, ..., K), block after block."""
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offsets).reshape(*blocks.shape[:2], -1)


def _row_union(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, head) the distinct values of x (b, hkv, K) ascending, padded to a common count by repeating the
    largest, and each entry's place in its row's list: x == union.gather(-1, inverse)."""
    ordered, order = x.sort(dim=-1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    place = new.cumsum(dim=-1) - 1  # (b, hkv, K): each sorted entry's index in the union
    width = int(place[..., -1].max()) + 1
    union = ordered[..., -1:].expand(*x.shape[:2], width).clone()
    union.scatter_(-1, place, ordered)
    inverse = torch.empty_like(place).scatter_(-1, order, place)
    return union, inverse


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (b, hkv, L, ...) at positions index (b, hkv, K) of its third dimension."""
    b, hkv = index.shape[:2]
    bi = torch.arange(b, device=t.device)[:, None, None]
    hi = torch.arange(hkv, device=t.device)[None, :, None]
    return t[bi, hi, index.to(t.device)]


def _gather_tokens(memory: MemoryCache, tokens: torch.Tensor):
    """Stored keys, values (b, hkv, K, d), valid flags (b, hkv, K) and int8 scales (or None) at `tokens` (b, hkv, K,
    clamped into the memory), read where the memory is stored."""
    d, src = memory.head_dim, memory.device
    index = tokens.to(src).clamp(max=memory.length - 1)
    pk, pv = memory.padded()
    k, v = _take(pk[..., :d], index), _take(pv[..., :d], index)
    bi = torch.arange(memory.batch, device=src)[:, None, None]
    valid = memory.valid[bi, index]
    scales = memory.scales()
    scales = None if scales is None else tuple(_take(t, index) for t in scales)
    memory.read_bytes += k.nbytes + v.nbytes + (0 if scales is None else sum(t.nbytes for t in scales))
    return k, v, valid, scales


@dataclass
class BlockRead:
    """The memory part of one call under block retrieval: scores of every query over its group's gathered keys
    (b*s, h, n, K), and what `weighted` needs to apply probabilities over them to the gathered values."""

    scores: torch.Tensor
    values: torch.Tensor  # (b, hkv, groups, K, d)
    heads: int
    length: int  # queries per stored row (share x n)
    group: int
    share: int

    def weighted(self, p: torch.Tensor) -> torch.Tensor:
        """Probabilities (b*s, h, n, K) times the gathered values: (b*s, h, n, d), in p's dtype."""
        pm = _grouped(fold_rows(p, self.share), self.values.shape[1], self.group)  # (b, hkv, groups, rows, K)
        out = pm.to(self.values.dtype) @ self.values
        return unfold_rows(_ungrouped(out, self.heads, self.length, self.group), self.share).to(p.dtype)


def choose(
    q: torch.Tensor,
    memory: MemoryCache,
    choice: BlockChoice,
    group: int = QUERY_GROUP,
    bounds: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The blocks every query group of q (b*s, h, n, d) reads under `choice`: (the queries grouped as select_blocks
    takes them, (b, kv_heads, groups, rows, d); the chosen blocks (b, kv_heads, groups, keep); the group size).
    `bounds` as in select_blocks."""
    blocks, block_size, super_size = choice.blocks, choice.block_size, choice.super_size
    share, hkv = memory.share, memory.kv_heads
    heads = q.shape[1]
    qf = fold_rows(q, share)  # (b, h, T, d)
    length = qf.shape[2]
    group = min(group, length)  # one group either way; no padding rows to score (a decoding step: 1)
    qg = _grouped(qf, hkv, group)  # (b, hkv, groups, rows, d)
    groups = qg.shape[2]
    t_index = torch.arange(groups, device=q.device)[:, None] * group + torch.arange(group, device=q.device)
    real = (t_index < length).repeat(1, heads // hkv)  # (groups, rows): rows are (head, position) pairs
    kmax, kmin, any_valid = memory.summaries(block_size, q.device)
    supers = None
    if two_level(super_size, min(blocks, kmax.shape[2]), kmax.shape[2]):
        supers = memory.super_summaries(block_size, super_size, q.device)
    chosen = select_blocks(qg, kmax, kmin, any_valid, blocks, real, bounds, super_size, supers, choice.recent)
    return qg, chosen, group


def read_blocks(q: torch.Tensor, memory: MemoryCache, choice: BlockChoice, group: int = QUERY_GROUP) -> BlockRead:
    """Choose (under `choice`) and gather the blocks of every query group of q (b*s, h, n, d) and score them
    (BlockRead)."""
    share = memory.share
    c_min = clamp_value(q.dtype)
    d, heads = q.shape[-1], q.shape[1]
    length = q.shape[2] * share
    qg, chosen, group = choose(q, memory, choice, group)
    mk, mv, mvalid = gather_blocks(memory, chosen, choice.block_size, q.device, q.dtype)
    scores = (qg @ mk.transpose(-1, -2)) / math.sqrt(d)  # (b, hkv, groups, rows, K)
    scores = scores.masked_fill(~mvalid[:, :, :, None, :], c_min).clamp_min(c_min)
    scores = unfold_rows(_ungrouped(scores, heads, length, group), share)  # (b*s, h, n, K)
    return BlockRead(scores=scores, values=mv, heads=heads, length=length, group=group, share=share)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    memory: MemoryCache,
    choice: BlockChoice,
    group: int = QUERY_GROUP,
) -> torch.Tensor:
    """One softmax over the local keys and the memory keys of the blocks each query group chooses under `choice`
    (module docstring). q (b*s, h, n, d) rotated queries; k, v (b*s, h_kv, kv, d) local keys (rotated) and values;
    visible (b*s|1, 1, n, kv) or None; `memory` the layer's non-empty memory (s = memory.share). Returns (b*s, h, n,
    d)."""
    read = read_blocks(q, memory, choice, group)
    local = _scores(q, k, visible, clamp_value(q.dtype))
    probs = torch.softmax(torch.cat([local, read.scores], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    kv = k.shape[2]
    return _weighted(probs[..., :kv], v) + read.weighted(probs[..., kv:])


def attend_planned(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    memory: MemoryCache,
    plan: ExecutionPlan,
) -> torch.Tensor:
    """attend with the plan's block settings (BlockChoice.of)."""
    return attend(q, k, v, visible=visible, memory=memory, choice=BlockChoice.of(plan))


def step_blocks(
    q: torch.Tensor,
    memory: MemoryCache,
    choice: BlockChoice,
    bounds: Callable[..., torch.Tensor] | None = None,
    gather: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None] | None:
    """For one decoding query per row, q (b, h, d): the blocks each key/value head chooses under `choice` (as
    read_blocks does for a single query) as stored, padded keys and values (b, kv_heads, keep * block_size, width)
    and int8 scales (b, kv_heads, keep * block_size) or None: a memory in the layout the decoding kernels read. None
    where every gathered key would not be valid (invalid keys, a short last block), the memory is shared by rows, or
    it is held elsewhere and `gather` cannot read it there: the caller then takes `attend`. `bounds` as in
    select_blocks; `gather(memory, chosen, block_size)`, where given, copies the chosen blocks (b, kv_heads, keep)
    to q's device (the kernels' path: fast/block_attention.gather_blocks, which also reads a float memory in
    page-locked CPU memory, memory.mapped_to), else PyTorch's indexing does."""
    block_size = choice.block_size
    if memory.share != 1 or not memory.all_valid() or memory.length % block_size:
        return None
    if memory.device != q.device and (gather is None or memory.quantized or not memory.mapped_to(q.device)):
        return None
    _, chosen, _ = choose(q[:, :, None], memory, choice, bounds=bounds)
    tokens = _block_tokens(chosen, block_size)
    if gather is None:
        keys, values = (_take(t, tokens) for t in memory.padded())
    else:
        keys, values = gather(memory, chosen[:, :, 0], block_size)
    scales = memory.scales()
    scales = None if scales is None else tuple(_take(t, tokens) for t in scales)
    memory.read_bytes += keys.nbytes + values.nbytes + (0 if scales is None else sum(t.nbytes for t in scales))
    return (keys, values), scales


def reads_blocks(memory: MemoryCache | None, blocks: int, block_size: int) -> bool:
    """Whether block retrieval reads less than the whole memory (else dense attention is the same and cheaper)."""
    return memory is not None and memory.length > blocks * block_size


def retrieves(memory: MemoryCache | None, plan: ExecutionPlan) -> bool:
    """Whether `plan` reads this memory by blocks: its mem_retrieval is "blocks" and they are less than the memory."""
    return plan.mem_retrieval == "blocks" and reads_blocks(memory, plan.mem_blocks, plan.mem_block_size)
