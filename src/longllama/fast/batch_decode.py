"""Decoding independent sequences together: one step computes the next token of every row of a batch whose rows
have their own memories (different documents, lengths) and their own local caches.

It is decode.py's static step with two differences, so that each row computes exactly what it would alone:
- Local slots: all rows write slot `slot` at a step, but row i's own tokens are slots lo_i .. slot (lo, one per
  row, on the device). A token in slot j is rotated for position j; scores depend only on position differences, so
  where a row starts in the buffer does not matter. The buffers hold `window + spare` slots: a row whose local cache
  holds a full window moves it into its memory at the step where it would alone (memory layers; the others drop it)
  and starts again at the current slot; when the last slot is reached, the rows are laid out again from slot 0 (at
  most once every `spare` steps).
- Memory: each row keeps its own MemoryCache (batch 1: nothing is copied when a row joins, a document memory shared
  by several requests is read in place by each, a row's append copies on write as MemoryCache.fork describes). The
  kernel path reads all rows' memories in one launch, each row into its own softmax (decode_attention.attend's
  `row_memories` and `row_table`; under block retrieval a row's memory there is its chosen blocks, gathered, a
  launch each); the general path attends row by row in the memory layers.
Rows join (`add`) and leave (`remove`) between steps; the rows are laid out again once before the next step however
many joined (a row's local cache waits apart until then), and on GPUs the step's CUDA graph is captured again (as
after any change of a memory's length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longllama import retrieval
from longllama.attention import attend as exact_attend
from longllama.cache import LongLlamaCache
from longllama.errors import InputError
from longllama.fast import decode_attention
from longllama.fast.decode import StaticDecoder
from longllama.fast.fused import ops_for
from longllama.memory import MemoryCache
from longllama.model import read_memory
from longllama.ops import rotate
from longllama.plan import ExecutionPlan


@dataclass
class _Row:
    memories: list[MemoryCache | None]  # per layer (memory layers only)
    count: int  # tokens in its local cache
    first_position: int  # absolute position of its oldest local token
    # Its local keys and values per layer while they are not in the buffers (joined, or being laid out anew)
    local: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    owner: object = None  # whoever added it (BatchGenerator: the row's stream)
    retired: int | None = None  # the step at which it was retired (still computed, its results unread)


class BatchDecoder(StaticDecoder):
    """The decoding state of several independent sequences; `add(cache)` a row after its prompt was read,
    `step(tokens)` returns the next logits (rows, vocab) in fp32, `remove(row)` drops a row.

    Laying the rows out anew (a row joined, or left through `remove`) means new buffers and, on a GPU, a new CUDA
    graph (tens of milliseconds for the 3B shape). `retire(row)` lets a row leave without that: it stays in the
    buffers, still computed and never read, until the next layout (a row joining, the buffers' end) or until it
    has been retired for `compact_after` steps (about what one capture costs in retired rows' work)."""

    def __init__(self, model, *, plan: ExecutionPlan, graphs: bool, spare: int | None = None, compact_after: int = 128):
        window = model.config.context_window
        self.spare = max(1, window // 4 if spare is None else spare)
        self.size = window + self.spare
        self.compact_after = compact_after
        self._setup(model, plan, graphs, self.size)
        self.rows: list[_Row] = []
        self.length = 0  # the slot the next step writes (host copy of `slot`)
        self.stale = False  # rows joined since the last layout
        self.steps = 0  # steps taken (retired rows' age)
        self.layouts = 0  # layouts so far: row indices hold from one to the next
        # rows_table's tables of the memory layers (key: the rows' memories), made before a capture, kept while its
        # graph lives: the graph reads them at every replay
        self._row_tables: dict[tuple, torch.Tensor | None] = {}
        self._layout()

    @property
    def batch(self) -> int:
        return len(self.rows)

    # -- rows ----------------------------------------------------------------------------------------------------
    def add(self, cache: LongLlamaCache, owner: object = None) -> int:
        """A row continuing `cache` (one sequence after its prompt: a local cache of consecutive positions, a memory
        per memory layer or none); returns its index. The cache's memories are used in place, copied on write."""
        state0 = cache.layers[0]
        if state0.keys is None or state0.keys.shape[0] != 1:
            raise InputError("BatchDecoder.add takes the cache of one sequence after its prompt was read")
        if not StaticDecoder.usable(cache, None):
            raise InputError("BatchDecoder.add: the local cache's positions are not consecutive; read the prompt again")
        layers = self.model.model.layers
        memories = []
        for layer, state in zip(layers, cache.layers):
            memory = state.memory
            if layer.self_attn.is_memory_layer:
                if memory is None:
                    memory = layer.self_attn.new_memory(1, self.device, self.plan)
                elif memory.rows != 1:
                    raise InputError("BatchDecoder.add takes one sequence; its memory holds several rows")
                else:
                    memory = memory.fork()
                    memory.materialise()
            memories.append(memory)
        row = _Row(memories, state0.local_length, int(state0.positions[0, 0]), owner=owner)
        row.local = [(s.keys[0], s.values[0]) for s in cache.layers]
        self.rows.append(row)
        self.stale = True
        return len(self.rows) - 1

    def remove(self, indices: list[int]) -> None:
        """Drop the rows `indices` and the retired ones now (the others keep their order)."""
        for i in indices:
            self.rows[i].retired = self.steps
        self._collect()
        self._layout()

    def retire(self, indices: list[int]) -> None:
        """Let the rows `indices` leave at the next layout (see the class docstring); their results are not read."""
        for i in indices:
            if self.rows[i].retired is None:
                self.rows[i].retired = self.steps

    def _laid_out(self) -> None:
        """Lay the rows out again if some joined since the last layout."""
        if self.stale:
            self._collect()
            self._layout()

    def prepare(self) -> None:
        """What the next step needs first: joined rows laid out; retired rows dropped where they would cost more
        than a layout (one would flush its window into memory, or has been retired `compact_after` steps) or at
        the buffers' end; full local windows of the others flushed into memory. The row indices of the next step
        hold once this ran (step calls it too)."""
        retired = [row for row in self.rows if row.retired is not None]
        if self.stale or any(
            row.count == self.window or self.steps - row.retired >= self.compact_after for row in retired
        ):
            self._collect()
            self._layout()
        full = [i for i, row in enumerate(self.rows) if row.count == self.window]
        for i in full:  # as alone: a full local cache goes to memory before the next token is written
            row = self.rows[i]
            for buffers, memory in zip(self.buffers, row.memories):
                if memory is not None:
                    raw, _, values = self._views(buffers)
                    memory.append(
                        raw[i : i + 1, :, self.length - self.window : self.length],
                        values[i : i + 1, :, self.length - self.window : self.length],
                        None,
                    )
            row.first_position += row.count
            row.count = 0
        if full:
            self.lo[full] = self.length
            self.graph = None  # memory lengths changed
        if self.length == self.size:
            self._collect()
            self._layout()

    def to_cache(self, index: int) -> LongLlamaCache:
        """Row `index`'s state as a LongLlamaCache of one sequence (local keys un-rotated)."""
        self._laid_out()
        row, cache = self.rows[index], LongLlamaCache(len(self.buffers))
        lo = self.length - row.count
        positions = row.first_position + torch.arange(row.count, device=self.device)[None]
        for state, buffers, memory in zip(cache.layers, self.buffers, row.memories):
            raw, _, values = self._views(buffers)
            state.set_local(
                raw[index : index + 1, :, lo : self.length].clone(),
                values[index : index + 1, :, lo : self.length].clone(),
                positions,
            )
            state.memory = memory
        return cache

    def _collect(self) -> None:
        """Keep each row's local keys and values apart from the buffers (before they are laid out again) and drop
        the retired rows; rows that joined since the last layout (after the others, their keys apart already) are
        left as they are."""
        for i, row in enumerate(self.rows):
            if row.local or row.retired is not None:
                continue
            lo = self.length - row.count
            row.local = [
                (raw[i, :, lo : self.length], values[i, :, lo : self.length])
                for raw, _, values in map(self._views, self.buffers)
            ]
        self.rows = [row for row in self.rows if row.retired is None]

    def _layout(self) -> None:
        """Fresh buffers with every row's local cache ending at the same slot (the longest cache's length)."""
        self.stale = False
        self.layouts += 1
        b = len(self.rows)
        self.length = max((row.count for row in self.rows), default=0)
        rows_lo = torch.tensor([self.length - row.count for row in self.rows], dtype=torch.long, device=self.device)
        self.buffers = []
        for idx, layer in enumerate(self.model.model.layers):
            shape = (b, layer.self_attn.num_kv_heads, self.size, self.width)
            buffers = tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(3))
            raw, rot, values = self._views(buffers)
            for i, row in enumerate(self.rows):
                keys, vals = row.local[idx] if row.local else (None, None)
                if row.count:
                    raw[i, :, self.length - row.count : self.length] = keys
                    values[i, :, self.length - row.count : self.length] = vals
            if self._positional(layer):  # slot j of row i holds position j - lo_i
                rot.copy_(rotate(raw, *self._tables(rows_lo)))
            else:
                rot.copy_(raw)
            self.buffers.append(buffers)
        for row in self.rows:
            row.local = []
        self.memories = [
            [row.memories[idx] for row in self.rows] if layer.self_attn.is_memory_layer else None
            for idx, layer in enumerate(self.model.model.layers)
        ]
        self.lo = rows_lo
        self.slot = torch.tensor([self.length], dtype=torch.long, device=self.device)
        self.token = torch.zeros(b, dtype=torch.long, device=self.device)
        self.graph = None
        self.checked = False

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (rows,); returns the logits (rows, vocab) of each row's next position."""
        self.prepare()
        if not self.rows:
            raise InputError("BatchDecoder.step: no rows; add one first")
        logits = self._advance(tokens)
        for row in self.rows:
            row.count += 1
        self.steps += 1
        return logits

    def _tables(self, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (rows, 1, slots, D) of each row's slots (slot j: position j - lo; before lo: unused)."""
        positions = (self.slots[None] - lo[:, None]).clamp_min(0)
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def _rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (rows, 1, 1, D) of the position each row's new token takes: slot - lo."""
        positions = self.slot - self.lo
        return self.cos[positions][:, None, None], self.sin[positions][:, None, None]

    def _memory_length(self) -> int:
        """The longest row memory (the timings' label of a graph capture)."""
        return max([0] + [m.length for row in self.rows for m in row.memories if m is not None])

    def _lo(self) -> torch.Tensor:
        return self.lo

    def _visible(self) -> torch.Tensor:
        """(rows, 1, 1, slots) bool: each row's own slots, up to and including the current one."""
        return ((self.slots <= self.slot) & (self.slots >= self.lo[:, None]))[:, None, None]

    def _attend_kernels(self, q, buffers, memories) -> torch.Tensor:
        _, rot, values = buffers
        if memories is None:
            return decode_attention.attend(q, rot, values, self.slot, lo=self.lo, **self._attention_options())
        rows = [self._kernel_memory(q[i : i + 1], m) for i, m in enumerate(memories)]
        # invalid entries, 8-bit memories, kNN memory, blocks the kernel cannot take: rows by the general functions
        if self.config.mem_top_k is not None or any(r is False or (r is not None and r[1] is not None) for r in rows):
            return self._attend(q[:, :, None], *self._views(buffers)[1:], self._visible(), memories, None)[:, :, 0]
        row_memories = [None if r is None else r[0] for r in rows]
        table = self._rows_table(row_memories)
        return decode_attention.attend(
            q,
            rot,
            values,
            self.slot,
            lo=self.lo,
            row_memories=row_memories,
            row_table=table,
            **self._attention_options(),
        )

    def _rows_table(self, row_memories: list) -> torch.Tensor | None:
        """decode_attention.rows_table for these memories: kept from the warm-up before a capture for the graph;
        None while capturing memories it has not seen (gathered blocks: each row's memory is then a launch of its
        own), which cannot copy a table to the GPU."""
        key = tuple(
            None if m is None else (m[0].data_ptr(), m[1].data_ptr(), m[0].stride(1), m[1].stride(1), m[0].shape[2])
            for m in row_memories
        )
        if key in self._row_tables:
            return self._row_tables[key]
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        table = decode_attention.rows_table(row_memories, self.device)
        if self.graphs:
            self._row_tables[key] = table
        return table

    def _capture_now(self) -> None:
        self._row_tables = {}  # the previous graph's tables go with it
        super()._capture_now()

    def _attend(self, q, rot, values, visible, memories, ops) -> torch.Tensor:
        if memories is None:
            return (ops or ops_for(self.plan)).few_query_attention(q, rot, values, visible, None, None, None, None)
        outs = []
        plan = self.plan
        for i, memory in enumerate(memories):  # each row against its own memory
            if retrieval.retrieves(memory, plan):
                outs.append(
                    retrieval.attend_planned(
                        q[i : i + 1],
                        rot[i : i + 1],
                        values[i : i + 1],
                        visible=visible[i : i + 1],
                        memory=memory,
                        plan=plan,
                    )
                )
                continue
            mem = read_memory(memory, q.device) if memory.length else (None,) * 5
            mem_k, mem_v, _, valid, scales = mem
            outs.append(
                exact_attend(
                    q[i : i + 1],
                    rot[i : i + 1],
                    values[i : i + 1],
                    visible=visible[i : i + 1],
                    mem_k=mem_k,
                    mem_v=mem_v,
                    mem_valid=valid,
                    mem_top_k=self.config.mem_top_k,
                    mem_scales=scales,
                )[0]
            )
        return torch.cat(outs, dim=0)

    def can_undo(self) -> bool:
        return False
