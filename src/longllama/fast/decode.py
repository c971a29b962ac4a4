"""Decoding one token at a time from static buffers, replayed as a CUDA graph: the same maths as the generic path.

Within one local-cache epoch (from one flush to the next) the oldest local token stays at relative position 0, so a
token stored in slot i always has relative position i: its key is rotated once when stored instead of at every step.
Each layer keeps fixed (batch, kv_heads, window, head_dim) buffers of rotated keys, raw (un-rotated) keys and values
(rows zero-padded to a multiple of 8 for the kernels);
a step writes one slot and attends over all slots with the unused ones masked, plus the memory. All shapes are fixed
between flushes, so on a GPU one step (every layer, norm and lm_head) is captured once as a CUDA graph and replayed,
which removes the per-kernel launch cost that dominates decoding. When the window is full, the next step first
moves the raw keys and values into memory (memory layers) or drops them (others), as the general path does
(docs/inference.md#attention), and the graph is
captured again for the new memory length.

With the fast attention path on a GPU (Triton; the plan's decode_kernels), a layer's step is: one matrix-vector kernel
for q, k and v
together, one kernel that rotates q and k and stores the new key and value (rope_store), the attention over local
slots and memory split into chunks plus a merge (decode_attention.py), the output projection with the residual
added, the gate/up pass and the down projection with the residual added; each RMSNorm is computed inside the product
that follows it: seven kernels instead of about twenty (profile_step.py). Elsewhere, and for
memories the kernels do not take (kNN top-k, invalid keys), the same step runs through the general functions.
Under block retrieval (retrieval.py) a memory layer's step chooses its blocks from the summaries and gathers them
(static shapes: the graph replays the choice); the kernel reads the gathered blocks as its memory.

Only batches without padding are decoded this way (every row then shares one slot index); `generate` falls back to
the generic path otherwise.
"""

from __future__ import annotations

import logging
import weakref

import torch

from longllama import retrieval, timings
from longllama.attention import kernel_head_dim
from longllama.cache import LongLlamaCache
from longllama.fast import block_attention, decode_attention, gemv, kernels
from longllama.fast.fused import ops_for
from longllama.model import read_memory
from longllama.ops import EAGER, rotate
from longllama.plan import ExecutionPlan

logger = logging.getLogger(__name__)


_AHEAD_DONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> decoder classes that had a dry pass


def _norm(module) -> tuple[torch.Tensor, float]:
    """An RMSNorm module as the (weight, eps) the products' `norm` takes."""
    return module.weight, module.variance_epsilon


class StaticDecoder:
    """Holds the decoding state of one generation; `step(tokens)` returns the next logits (b, vocab) in fp32."""

    def __init__(self, model, cache: LongLlamaCache, *, plan: ExecutionPlan, graphs: bool):
        self._setup(model, plan, graphs, model.config.context_window)
        state0 = cache.layers[0]
        b = state0.keys.shape[0]
        device, dtype = self.device, self.dtype
        self.length = state0.local_length  # slots in use (host copy of `slot`)
        self.first_position = state0.positions[:, 0].clone()  # absolute position of slot 0, per row
        self.slot = torch.tensor([self.length], dtype=torch.long, device=device)
        self.token = torch.zeros(b, dtype=torch.long, device=device)
        self.buffers = [
            self._layer_buffers(layer, state, b, device, dtype)
            for layer, state in zip(model.model.layers, cache.layers)
        ]
        self.memories = [
            self._memory(layer, state, b, device) for layer, state in zip(model.model.layers, cache.layers)
        ]

    def _setup(self, model, plan: ExecutionPlan, graphs: bool, slots: int) -> None:
        """What every static decoder sets alike: the model, the plan's choices for a step, and the rotation tables
        of `slots` local slots."""
        config = model.config
        self.model, self.config, self.plan = model, config, plan
        self.window = config.context_window
        self.graphs = graphs
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        cos, sin = model.model.rope.get(slots, self.device)
        self.cos, self.sin = cos[:slots].to(self.dtype), sin[:slots].to(self.dtype)
        self.slots = torch.arange(slots, device=self.device)
        # The Triton step (see the module docstring): the fast attention path where the kernels run.
        self.kernels = (
            plan.attention == "fast"
            and plan.decode_kernels
            and decode_attention.applies(model.lm_head.weight, cpu=plan.interpret_kernels)
        )
        self.gemv_options = dict(max_rows=plan.gemv_max_rows, cpu=plan.interpret_kernels, autotune=plan.autotune)
        self.checked = False  # a first step has run (with the kernels, or after falling back from them)
        self.head_dim = config.head_dim
        # Rows of the local buffers: zero-padded to a multiple of 8 elements for the kernels (16-byte aligned rows
        # load as whole vectors: head_dim 100 ran at ~1 TB/s unpadded); `_views` are the head_dim wide parts.
        self.width = kernel_head_dim(self.head_dim) if self.kernels else self.head_dim
        self.graph = self.out = None
        self.captures, self.capture_seconds = 0, 0.0  # CUDA graphs captured and their seconds (server stats)

    @staticmethod
    def usable(cache: LongLlamaCache, mask: torch.Tensor | None) -> bool:
        """No padding, and local positions consecutive in every row (then slot index = relative position)."""
        if mask is not None and not bool(mask.all()):
            return False
        positions = cache.layers[0].positions
        if positions is None:
            return False
        steps = positions - positions[:, :1]
        return bool((steps == torch.arange(positions.shape[1], device=positions.device)).all())

    def _positional(self, layer) -> bool:
        return layer.self_attn.rotates

    def _layer_buffers(self, layer, state, b, device, dtype):
        """Raw keys, rotated keys and values (b, kv_heads, window, width), zero past head_dim."""
        shape = (b, layer.self_attn.num_kv_heads, self.window, self.width)
        buffers = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(3))
        raw, rot, values = self._views(buffers)
        n = self.length
        raw[:, :, :n] = state.keys
        values[:, :, :n] = state.values
        keys = state.keys
        if self._positional(layer):
            keys = rotate(keys, self.cos[None, None, :n], self.sin[None, None, :n])
        rot[:, :, :n] = keys
        return buffers

    def _views(self, buffers):
        return tuple(t[..., : self.head_dim] for t in buffers)

    def _memory(self, layer, state, b, device):
        attn = layer.self_attn
        if not attn.is_memory_layer:
            return None
        if state.memory is None:
            state.memory = attn.new_memory(b, device, self.plan)
        return state.memory

    # -- one step ------------------------------------------------------------------------------------------------
    def _compute(self) -> torch.Tensor:
        model = self.model.model
        h = model.embed_tokens(self.token)[:, None]  # (B, 1, H)
        if self.kernels:
            for layer, buffers, memory in zip(model.layers, self.buffers, self.memories):
                h = self._layer_kernels(layer, h, buffers, memory)
            self.slot.add_(1)
            # The final norm inside lm_head's product.
            return gemv.linear(h[:, 0], self.model.lm_head.weight, norm=_norm(model.norm), **self.gemv_options).float()
        cos, sin = self._rotation()
        visible = self._visible()
        ops = ops_for(self.plan)
        for layer, buffers, memory in zip(model.layers, self.buffers, self.memories):
            a = self._attention(
                layer, layer.input_layernorm(h, ops), *self._views(buffers), memory, cos, sin, visible, ops
            )
            post = layer.post_attention_layernorm
            h, normed = ops.add_rms_norm(h, a, post.weight, post.variance_epsilon)
            h = layer.mlp(normed, ops, residual=h)
        self.slot.add_(1)
        h = model.norm(h, ops)
        return ops.linear(h[:, 0], self.model.lm_head.weight).float()

    def _rotation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, 1, 1, D) of the position this step's query and key take: the slot's."""
        return self.cos.index_select(0, self.slot)[None, None], self.sin.index_select(0, self.slot)[None, None]

    def _visible(self) -> torch.Tensor:
        """(1, 1, 1, W) bool: the local slots in use, up to and including the current one."""
        return (self.slots <= self.slot)[None, None, None]

    def _attention(self, layer, x, raw, rot, values, memory, cos, sin, visible, ops):
        attn = layer.self_attn
        b = x.shape[0]
        q = attn._split(ops.linear(x, attn.q_proj.weight), attn.num_heads)
        k = attn._split(ops.linear(x, attn.k_proj.weight), attn.num_kv_heads)
        v = attn._split(ops.linear(x, attn.v_proj.weight), attn.num_kv_heads)
        raw.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        if self._positional(layer):
            q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
        rot.index_copy_(2, self.slot, k)
        out = self._attend(q, rot, values, visible, memory, ops)
        return ops.linear(out.transpose(1, 2).reshape(b, 1, attn.num_heads * attn.head_dim), attn.o_proj.weight)

    def _attend(self, q, rot, values, visible, memory, ops) -> torch.Tensor:
        """A step's attention (b, h, 1, d) through the general functions."""
        plan = self.plan
        if retrieval.retrieves(memory, plan):
            return retrieval.attend_planned(q, rot, values, visible=visible, memory=memory, plan=plan)
        mem_k = mem_v = padded = scales = None
        if memory is not None and memory.length:
            mem_k, mem_v, padded, _, scales = read_memory(memory, q.device)
        return ops.few_query_attention(
            q, rot, values, visible, mem_k, mem_v, padded, self.config.mem_top_k, mem_scales=scales
        )

    def _layer_kernels(self, layer, h, buffers, memory):
        """One decoder layer in seven kernels: each RMSNorm inside the product after it, each residual add inside
        the product before it (the same roundings as the general step)."""
        attn, mlp = layer.self_attn, layer.mlp
        b = h.shape[0]
        raw, rot, values = buffers
        qkv = gemv.linear_stacked(
            h,
            (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
            norm=_norm(layer.input_layernorm),
            **self.gemv_options,
        )
        q = decode_attention.rope_store(
            qkv, self.cos, self.sin, self.slot, raw, rot, values, attn.num_heads, self._positional(layer), self._lo()
        )  # (B, H, D)
        out = self._attend_kernels(q, buffers, memory)
        h = gemv.linear(
            out.reshape(b, 1, attn.num_heads * attn.head_dim), attn.o_proj.weight, residual=h, **self.gemv_options
        )
        act = gemv.linear_swiglu(
            h, mlp.gate_proj.weight, mlp.up_proj.weight, norm=_norm(layer.post_attention_layernorm), **self.gemv_options
        )
        return gemv.linear(act, mlp.down_proj.weight, residual=h, **self.gemv_options)

    def _lo(self) -> torch.Tensor | None:
        """Each row's first slot, where rows start apart (batch_decode.py); None: every row starts at slot 0."""
        return None

    def _kernel_memory(self, q, memory):
        """A memory as the decoding kernel reads it for the queries q (rows, h, d): (padded keys and values, int8
        scales or None), under block retrieval the chosen blocks gathered (retrieval.step_blocks); None for no
        memory; False where the kernel cannot read it (invalid entries, kNN memory, blocks it cannot take)."""
        if memory is None or not memory.length:
            return None
        plan = self.plan
        if retrieval.retrieves(memory, plan):
            # where the plan reads blocks with kernels, kernels also rank (one pass over the summaries) and copy them
            fast = plan.block_kernel
            in_place = fast and block_attention.reads_in_place(memory, q.device, plan)
            chosen = retrieval.step_blocks(
                q,
                memory,
                retrieval.BlockChoice.of(plan),
                bounds=block_attention.best_bounds if fast else None,
                gather=block_attention.gather_blocks if in_place else None,
            )
            return False if chosen is None else chosen
        _, _, padded, valid, scales = read_memory(memory, q.device)
        return False if valid is not None or self.config.mem_top_k is not None else (padded, scales)

    def _attend_kernels(self, q, buffers, memory) -> torch.Tensor:
        """A step's attention (b, h, d) with the kernels: local slots and the memory in one softmax."""
        _, rot, values = buffers
        read = self._kernel_memory(q, memory)
        if read is False:  # the general step, in exact maths
            _, rot, values = self._views(buffers)
            return self._attend(q[:, :, None], rot, values, self._visible(), memory, EAGER)[:, :, 0]
        padded, scales = read or (None, None)
        return decode_attention.attend(q, rot, values, self.slot, padded, scales, **self._attention_options())

    def _attention_options(self) -> dict:
        """decode_attention.attend's plan choices: configurations by the autotuner or not, the split into chunks."""
        plan = self.plan
        return {"autotune": plan.autotune, "min_chunk": plan.decode_min_chunk, "programs": plan.decode_programs}

    def _compile_ahead(self) -> None:
        """Before this kind of decoder's first step on this model in the process: a dry pass of the step
        (kernels.compile_ahead), so that the Triton kernels it launches compile side by side rather than one after
        another inside the first step. It leaves no trace: no kernel runs, the PyTorch operations only rewrite the
        current slot, and the slot counter is put back. A failure is left to the real step. (A later memory length
        may need one new kernel, the attention's for a larger chunk, which its first step compiles.)"""
        done = _AHEAD_DONE.setdefault(self.model, set())
        if type(self) in done or not kernels.ahead_applies(self.plan, self.device):
            return
        done.add(type(self))
        slot = self.slot.clone()
        try:
            kernels.dry_pass(self._compute, "decoding")  # a failure falls back in the real step (_checked_compute)
        finally:
            self.slot.copy_(slot)

    def _checked_compute(self) -> torch.Tensor:
        """_compute, falling back for good to the general step (one warning) if a Triton kernel fails to build or
        run here. A failed step leaves no trace: rope_store only rewrites the current slot, and the slot counter
        moves at the end."""
        if self.checked:
            return self._compute()
        self._compile_ahead()
        try:
            out = self._compute()
        except Exception as exc:
            if not self.kernels:
                raise
            logger.warning(
                "decoding: the Triton step failed (%s); using the general one",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            self.kernels = False
            out = self._compute()
        self.checked = True
        return out

    def _capture(self) -> None:
        with timings.timed("capture", f"decoding step, memory of {self._memory_length()} keys") as info:
            self._capture_now()
        self.captures += 1
        self.capture_seconds += info["seconds"]

    def _memory_length(self) -> int:
        return max([0] + [m.length for m in self.memories if m is not None])

    def _capture_now(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (allocator, cuBLAS handles, Triton tuning)
            self._checked_compute()
            self.slot.fill_(self.length)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._compute()
        self.slot.fill_(self.length)  # capture records the increment without running it

    def _flush(self) -> None:
        """The window is full: memory layers keep its raw keys and values, the other layers drop them."""
        for buffers, memory in zip(self.buffers, self.memories):
            raw, _, values = self._views(buffers)
            if memory is not None:
                memory.append(raw, values, None)
        self.first_position = self.first_position + self.length
        self.length = 0
        self.slot.fill_(0)
        self.graph = None  # the memory length changed: shapes (and maybe buffers) differ

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (b,); returns the logits (b, vocab) of the next position."""
        if self.length == self.window:
            self._flush()
        return self._advance(tokens)

    def _advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Write the tokens into the current slot and run the step (replaying its graph where there is one)."""
        self.token.copy_(tokens)
        if self.graphs:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.out.clone()
        else:
            logits = self._checked_compute()
        self.length += 1
        return logits

    def can_undo(self) -> bool:
        """Whether the next step could be taken back (undo): it will not flush the window into memory."""
        return self.length < self.window

    def undo(self) -> None:
        """Take back the last step (one that did not flush): its slot is free again, as if it never ran."""
        self.length -= 1
        self.slot.sub_(1)

    def to_cache(self) -> LongLlamaCache:
        """The state as a LongLlamaCache (local keys un-rotated, as the generic path stores them)."""
        cache = LongLlamaCache(len(self.buffers))
        n = self.length
        steps = torch.arange(n, device=self.first_position.device)
        positions = self.first_position[:, None] + steps[None]
        for state, buffers, memory in zip(cache.layers, self.buffers, self.memories):
            raw, _, values = self._views(buffers)
            state.set_local(raw[:, :, :n].clone(), values[:, :, :n].clone(), positions)
            state.memory = memory
        return cache
