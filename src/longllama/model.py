"""The LongLLaMA network for one window: RMSNorm, RoPE, MLP, attention over local cache and memory, decoder layers.

A window of q new tokens goes through every layer. Each layer's attention (docs/inference.md#attention) joins the
layer's local cache,
moves the whole old cache to memory when the window would overflow it, rotates queries and keys with positions
relative to the oldest local token, and, in memory layers, attends in the same softmax to the memory, whose keys are
stored un-rotated. Splitting long inputs into windows is `windows.py`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longllama import attention, retrieval, sharding
from longllama.attention import FEW_QUERIES
from longllama.cache import LayerState, LongLlamaCache
from longllama.config import LongLlamaConfig
from longllama.errors import InputError
from longllama.fast import attention as fast_attention
from longllama.fast import block_attention
from longllama.fast.fused import ops_for
from longllama.memory import MemoryCache
from longllama.ops import EAGER, Ops, heads
from longllama.plan import ExecutionPlan


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, ops: Ops = EAGER) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.variance_epsilon)


class RotaryTable:
    """cos/sin of positions 0..n-1 (fp32, rotate-half layout), grown on demand and kept per device."""

    def __init__(self, head_dim: int, theta: float, min_length: int):
        # Built lazily on the CPU: models are often constructed under a meta-device context.
        self.head_dim, self.theta = head_dim, theta
        self.min_length = min_length
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < length:
            n = max(self.min_length, 1 << max(length - 1, 1).bit_length())
            d = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
            t = torch.arange(n, dtype=torch.float32, device="cpu")
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            table = (emb.cos().to(device), emb.sin().to(device))
            self._tables[device] = table
        return table

    def gather(
        self, positions: torch.Tensor, dtype: torch.dtype, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (b, 1, n, d) in `dtype` for positions (b, n) (non-negative ints). `length`: a known bound above
        every position (saves reading the largest one back from the device); without one, a traced graph computes
        the rows it needs instead of reading the largest position back."""
        if length is None and torch.compiler.is_compiling():
            return self._computed(positions, dtype)
        cos, sin = self.get(int(positions.max()) + 1 if length is None else length, positions.device)
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)  # (B, 1, N, D)

    def _computed(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d))
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class Window:
    """What every layer of one window shares (docs/inference.md#window-masks): masks, the plan and the RoPE of the local
    span."""

    visible: torch.Tensor | None  # (b|1, 1, n, P+n) bool: keys each query may see; None: all
    pad_valid: torch.Tensor | None  # (b, P+n) bool: False on padding columns; None: no padding
    is_causal: bool  # visible is the plain causal mask of a window with no local cache and no padding
    cos: torch.Tensor  # (b, 1, span, d): RoPE of the local span after any overflow, relative to its oldest token
    sin: torch.Tensor
    plan: ExecutionPlan  # how to run it (attention implementation, kernels, widths)
    # Training (FoT): memory layers take their memory from other batch entries instead of the cache. An object with
    # `memory(keys, values) -> (mem_k, mem_v, mem_valid)` given this layer's un-rotated keys and values (b, h_kv,
    # n, d); see cross_batch.py.
    cross_batch: object | None = None
    ops: Ops = EAGER  # elementwise functions, compiled or not (fast.fused.ops_for)
    # The batch rows are consecutive windows of one sequence, read into memory (run_windows' window groups): memory
    # layers give window j the memory before it, plus its own causal keys (fast path, no cache, no padding).
    grouped: bool = False


class MLP(nn.Module):
    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops = EAGER, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)), plus `residual` when given (inside the product where ops.linear can)."""
        if ops is EAGER:  # through the modules (hooks and wrappers of training see their calls)
            y = self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
            return y if residual is None else residual + y
        h = ops.linear_swiglu(x, self.gate_proj.weight, self.up_proj.weight)
        return ops.linear(h, self.down_proj.weight, residual=residual)  # fast.gemv.linear: the non-eager ops


class Attention(nn.Module):
    """Self-attention over the local cache plus, in memory layers, the memory (docs/inference.md#attention)."""

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_memory_layer = layer_idx in config.mem_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    @property
    def rotates(self) -> bool:
        """Whether q and the local keys are rotated (RoPE): always, except in memory layers without mem_positionals."""
        return self.config.mem_positionals or not self.is_memory_layer

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def new_memory(self, batch: int, device: torch.device, plan: ExecutionPlan) -> MemoryCache:
        """An empty memory of this layer for a model running on `device`: stored as _memory_placement says, with
        block retrieval's summaries kept on `device` as it grows."""
        memory = MemoryCache(batch, self.num_kv_heads, self.head_dim, **self._memory_placement(device, plan))
        return self._keep_memory(memory, device, plan)

    def memory_from(
        self, tensors: dict[str, torch.Tensor], *, source: str, device: torch.device, plan: ExecutionPlan
    ) -> MemoryCache:
        """A memory of saved tensors (MemoryCache.tensors; `source` names them in errors), stored and summarised as
        new_memory's are."""
        memory = MemoryCache.from_tensors(tensors, source=source, **self._memory_placement(device, plan))
        return self._keep_memory(memory, device, plan)

    def _memory_placement(self, device: torch.device, plan: ExecutionPlan) -> dict:
        """How a memory is stored for a model running on `device`: the config's memory dtype, where memory_device
        says (page-locked with mem_offload), rows padded for the device's kernels."""
        return dict(
            dtype=self.config.memory_dtype,
            device=memory_device(self.config, device),
            storage_dim=plan.memory_storage_dim(self.head_dim),
            pin_memory=bool(self.config.mem_offload),
        )

    def _keep_memory(self, memory: MemoryCache, device: torch.device, plan: ExecutionPlan) -> MemoryCache:
        if plan.mem_retrieval == "blocks":  # summaries where attention runs, also for a memory held in CPU memory
            memory.track_blocks(plan.mem_block_size, device)
        return memory

    def _append_memory(self, state: LayerState, k, v, valid, plan: ExecutionPlan) -> None:
        if state.memory is None:
            state.memory = self.new_memory(k.shape[0], k.device, plan)
        if plan.memory_shard is not None and not plan.memory_shard.takes(state.memory):
            return  # another process of the group stores this part of the memory
        state.memory.append(k, v, valid)

    def write_memory(self, x: torch.Tensor, window: Window, state: LayerState) -> None:
        """Only what a memory window leaves in this memory layer: its keys and values appended to the memory (stored
        un-rotated), for a window whose attention output nobody reads (forward_window's `depth`)."""
        if not self.is_memory_layer:
            raise RuntimeError(f"layer {self.layer_idx} is not a memory layer: it has no memory to write")
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        if window.grouped:
            k, v = _joined(k), _joined(v)
        self._append_memory(state, k, v, None if window.grouped else window.pad_valid, window.plan)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        window: Window,
        state: LayerState,
        use_cache: bool,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (b, q, hidden); positions (b, q) of the new tokens; `window` holds masks and RoPE of the window."""
        n = x.shape[1]
        if self._ingests(x, window, state, output_attentions):
            return self._ingest(x, positions, window, state, use_cache), None
        if window.grouped:
            raise RuntimeError("a window group reached the general attention path (windows._groupable let it through)")
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        mem_layer = self.is_memory_layer
        fresh_to_memory = mem_layer and state.local_length == 0 and not use_cache
        visible, pad_valid = window.visible, window.pad_valid

        if state.local_length:
            old = state.local_length
            if old + n > self.config.context_window:
                # Overflow: the whole old cache leaves; memory layers keep it as memory, the others lose it.
                if mem_layer and use_cache:
                    self._append_memory(state, state.keys, state.values, _columns(pad_valid, 0, old), window.plan)
                visible = None if visible is None else visible[..., old:]
                pad_valid = None if pad_valid is None else pad_valid[:, old:]
            else:
                k = torch.cat([state.keys, k], dim=2)
                v = torch.cat([state.values, v], dim=2)
                positions = torch.cat([state.positions, positions], dim=1)
        if use_cache:
            state.set_local(k, v, positions)

        q_rot, k_rot = q, k
        if self.rotates:
            q_rot = window.ops.rotate(q, window.cos[:, :, -n:], window.sin[:, :, -n:])
            k_rot = window.ops.rotate(k, window.cos, window.sin)

        memory = state.memory if mem_layer else None
        cross = None
        plan = window.plan
        if mem_layer and window.cross_batch is not None:
            memory, fresh_to_memory = None, False
            # Fused kernels need no mask: the window is causal and each earlier entry is seen whole or not at all.
            if (
                plan.attention == "fast"
                and window.is_causal
                and not output_attentions
                and fast_attention.joint_attention_supported(q_rot, k_rot, v)
            ):
                out = fast_attention.joint_attention(q_rot, k_rot, v, window.cross_batch.parts(k, v))
                return self._output(out), None
            cross = window.cross_batch.memory(k, v)
        out, probs = self.attend(
            q_rot,
            k_rot,
            v,
            visible=visible,
            memory=memory,
            plan=plan,
            is_causal=window.is_causal,
            pad=window.ops.pad_to,
            output_attentions=output_attentions,
            cross=cross,
        )
        if fresh_to_memory:
            # After attention, so a window never sees its own keys twice.
            end = k.shape[2]
            self._append_memory(state, k[:, :, -n:], v[:, :, -n:], _columns(pad_valid, end - n, end), plan)
        return self._output(out), probs

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        visible: torch.Tensor | None,
        memory: MemoryCache | None,
        plan: ExecutionPlan,
        is_causal: bool = False,
        pad=None,
        output_attentions: bool = False,
        cross: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the queries q (b, h, n, d) over the local keys k and values v (b, h_kv, P+n, d), rotated as
        this layer rotates them, and this layer's `memory` (None: none), in one softmax; `visible` (b|1, 1, n, P+n)
        bool or None (all). The plan picks how: a sharded memory, block retrieval, the fast kernels or the general
        functions. `cross`: training's (keys, values, valid) of the other batch entries (cross_batch.py) instead of
        a memory. Returns (b, h, n, d) and the probabilities when `output_attentions`."""
        mem_layer = self.is_memory_layer
        mem_k, mem_v, mem_valid = cross if cross is not None else (None, None, None)
        padded = None
        # Block retrieval (retrieval.py) where it reads less than the whole memory: the memory is read in place.
        retrieve = plan.memory_shard is None and retrieval.retrieves(memory, plan)
        # Memory split over processes (sharding.py): every process joins each memory layer's merge, memory or not.
        shard = plan.memory_shard if mem_layer and cross is None else None
        if (retrieve or shard is not None) and output_attentions:
            raise InputError(
                "output_attentions with mem_retrieval='blocks' or a sharded memory: no process holds one probability "
                "matrix over the whole memory; use a dense, unsharded memory to see attention probabilities"
            )
        share = 1  # query rows per stored memory row (beams sharing their prompt's memory, memory.py)
        scales = None  # an int8 memory's (key, value) scales
        if memory is not None and memory.length and not retrieve and shard is None:
            mem_k, mem_v, padded, mem_valid, scales = read_memory(memory, q.device)
            share = memory.share
        top_k = self.config.mem_top_k if memory is not None else None  # never in cross-batch training
        if shard is not None:
            sharding.check_readable(self.config)
            return sharding.attend(q, k, v, visible=visible, memory=memory, shard=shard, plan=plan), None
        if retrieve and block_attention.applies(q, memory, plan):
            out = block_attention.attend(
                q, k, v, visible=visible, is_causal=is_causal, memory=memory, plan=plan, pad=pad
            )  # fmt: skip
            return out, None
        if retrieve:
            return retrieval.attend_planned(q, k, v, visible=visible, memory=memory, plan=plan), None
        if plan.attention == "fast" and not output_attentions:
            out = fast_attention.attend(
                q,
                k,
                v,
                plan=plan,
                visible=visible,
                mem_k=mem_k,
                mem_v=mem_v,
                mem_valid=mem_valid,
                is_causal=is_causal,
                padded_mem=padded,
                mem_top_k=top_k,
                pad=pad,
                mem_share=share,
                mem_scales=scales,
            )
            return out, None
        return attention.attend(
            q,
            k,
            v,
            visible=visible,
            mem_k=mem_k,
            mem_v=mem_v,
            mem_valid=mem_valid,
            impl="sdpa" if plan.attention == "sdpa" else "eager",
            grouping=self.config.mem_attention_grouping if mem_layer else None,
            mem_top_k=top_k,
            return_probs=output_attentions,
            mem_share=share,
            mem_scales=scales,
        )

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output (b, h, n, d), heads joined."""
        return self.o_proj(heads(out, self.head_dim))

    def _ingests(self, x: torch.Tensor, window: Window, state: LayerState, output_attentions: bool) -> bool:
        """Whether the window takes the ingest path (_ingest): fast attention, inference, a causal window of more than
        a few tokens with no local cache and no padding, no cross-batch or kNN memory, every memory entry valid."""
        if not (
            window.plan.attention == "fast"
            and window.is_causal
            and state.local_length == 0
            and not output_attentions
            and window.cross_batch is None
            and x.shape[1] > FEW_QUERIES
        ):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.q_proj.weight.requires_grad):
            return False
        memory = state.memory
        plan = window.plan
        return not self.is_memory_layer or (
            self.config.mem_top_k is None
            and (memory is None or (memory.all_valid() and memory.share == 1))
            and not retrieval.retrieves(memory, plan)
            and plan.memory_shard is None
        )

    def _ingest(
        self, x: torch.Tensor, positions: torch.Tensor, window: Window, state: LayerState, use_cache: bool
    ) -> torch.Tensor:
        """Attention of a window with no local cache (see _ingests), the same maths as the general path: q, k and v
        rotated and padded for the kernels in one pass (ops.rope_pad), token-major (q's heads side by side, as the
        kernels and o_proj read them); in memory layers padded to the memory's stored width, so the queries serve
        local and memory attention. With `window.grouped` the rows are consecutive windows of one sequence: all of
        them join the memory first, and row j sees the memory before it."""
        b, n, _ = x.shape
        d, mem_layer = self.head_dim, self.is_memory_layer
        q = self.q_proj(x).view(b, n, self.num_heads, d)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d)
        k_heads, v_heads = k.transpose(1, 2), v.transpose(1, 2)  # (b, h_kv, n, d): what caches and memory take
        if use_cache:
            state.set_local(k_heads, v_heads, positions)
        used = None
        if mem_layer and window.grouped:
            before = 0 if state.memory is None else state.memory.length
            self._append_memory(state, _joined(k_heads), _joined(v_heads), None, window.plan)
            used = [before + j * n for j in range(b)]
        padded = scales = None
        if mem_layer and state.memory is not None and state.memory.length:
            _, _, padded, _, scales = read_memory(state.memory, x.device)
        if not mem_layer:
            width = window.plan.local_storage_dim(d)
        elif padded is not None and padded[0].shape[-1] % 8 == 0:
            width = padded[0].shape[-1]
        else:
            width = window.plan.memory_storage_dim(d)
        rotate_qk = self.rotates
        cos, sin = window.cos.transpose(1, 2), window.sin.transpose(1, 2)  # (b|1, n, 1, d)
        qp, kp, vp = window.ops.rope_pad(q, k, v, cos, sin, width, rotate_qk)
        out = fast_attention.window_attention(
            qp.transpose(1, 2),
            kp.transpose(1, 2),
            vp.transpose(1, 2),
            d,
            plan=window.plan,
            padded_mem=padded,
            used=used,
            ops=window.ops,
            mem_scales=scales,
        )
        if mem_layer and not window.grouped and not use_cache:  # after attention: never its own keys twice
            self._append_memory(state, k_heads, v_heads, None, window.plan)
        return self.o_proj(out)


def memory_device(config: LongLlamaConfig, device: torch.device | str) -> torch.device:
    """Where a model running on `device` keeps its memories: CPU memory with the config's mem_offload, else `device`."""
    return torch.device("cpu") if config.mem_offload else torch.device(device)


def read_memory(memory: MemoryCache, device: torch.device):
    """Keys, values, padded (keys, values) and valid flags (None: all valid) of a memory as stored, on `device` (an
    offloaded memory is copied from pinned CPU memory); then the (key, value) scales of an int8 memory, else None."""
    pk, pv = memory.padded()
    valid = None if memory.all_valid() else memory.valid
    scales = memory.scales()
    if memory.device != device:  # one copy of the stored (padded) tensors; the views below share it
        pk, pv = pk.to(device, non_blocking=True), pv.to(device, non_blocking=True)
        valid = None if valid is None else valid.to(device, non_blocking=True)
        scales = None if scales is None else tuple(t.to(device, non_blocking=True) for t in scales)
    d = memory.head_dim
    return pk[..., :d], pv[..., :d], (pk, pv), valid, scales


def _joined(t: torch.Tensor) -> torch.Tensor:
    """(g, h_kv, n, d) keys or values of a window group -> (1, h_kv, g * n, d), the windows in order (as one
    sequence's memory)."""
    g, h, n, d = t.shape
    return t.transpose(0, 1).reshape(1, h, g * n, d)


def _columns(pad_valid: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if pad_valid is None else pad_valid[:, start:end]


class DecoderLayer(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        ops = attn_kwargs["window"].ops
        a, probs = self.self_attn(self.input_layernorm(x, ops), **attn_kwargs)
        x, normed = ops.add_rms_norm(
            x, a, self.post_attention_layernorm.weight, self.post_attention_layernorm.variance_epsilon
        )
        return self.mlp(normed, ops, residual=x), probs

    def write_memory(self, x: torch.Tensor, window: Window, state: LayerState) -> None:
        """The memory write of a window that stops at this (memory) layer: no attention, no MLP."""
        self.self_attn.write_memory(self.input_layernorm(x, window.ops), window, state)


def window_visibility(
    batch: int, n: int, past: int, pad_valid: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """(b|1, 1, n, past+n) bool: which keys each query of the window may see (docs/inference.md#window-masks), or
    None for all."""
    visible = None
    if n > 1:
        cols = torch.arange(past + n, device=device)
        rows = torch.arange(n, device=device)
        visible = (cols[None, :] <= rows[:, None] + past)[None, None]  # (1, 1, N, P+N)
    if pad_valid is not None and (torch.compiler.is_compiling() or not bool(pad_valid.all())):
        pad = pad_valid[:, None, None, :]
        visible = pad if visible is None else visible & pad
    return visible


def make_window(
    cache: LongLlamaCache,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    window_size: int,
    rope: RotaryTable,
    dtype: torch.dtype,
    plan: ExecutionPlan,
    cross_batch=None,
    rope_length: int | None = None,
    grouped: bool = False,
) -> Window:
    """Masks, the plan, its elementwise functions and RoPE tables of one window of new tokens, shared by all
    layers."""
    b, n = positions.shape
    past = cache.local_length
    pad_valid = None if mask is None else mask.to(torch.bool)
    visible = window_visibility(b, n, past, pad_valid, positions.device)
    if pad_valid is not None and not torch.compiler.is_compiling() and bool(pad_valid.all()):
        pad_valid = None  # all visible: the unmasked paths (a traced graph keeps the mask rather than read it)
    span = positions
    if past and past + n <= window_size:
        span = torch.cat([cache.layers[0].positions, positions], dim=1)
    # Relative RoPE: the oldest local token sits at position 0, so memory keys (stored un-rotated) act as if there.
    rel = span - span.min(dim=-1, keepdim=True).values
    cos, sin = rope.gather(rel, dtype, rope_length)
    return Window(
        visible=visible,
        pad_valid=pad_valid,
        is_causal=past == 0 and n > 1 and pad_valid is None,
        cos=cos,
        sin=sin,
        plan=plan,
        cross_batch=cross_batch,
        ops=ops_for(plan),
        grouped=grouped,
    )


def forward_window(
    layers: nn.ModuleList,
    norm: RMSNorm,
    rope: RotaryTable,
    h: torch.Tensor,
    *,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    cache: LongLlamaCache,
    use_cache: bool,
    plan: ExecutionPlan,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    cross_batch=None,
    rope_length: int | None = None,
    grouped: bool = False,
    depth: int | None = None,
) -> tuple[torch.Tensor | None, list, list]:
    """Run one window (docs/inference.md#window-masks) through all layers and the final norm, updating `cache` in place.

    h (b, q, hidden) embeddings; positions (b, q); mask (b, P+q) 2-D attention mask over local cache + window, or
    None; `rope_length` a known bound above every relative position of the window (see RotaryTable.gather);
    `grouped`: the batch rows are consecutive memory windows of one sequence (Window.grouped).
    `depth`: run only the first `depth` layers, for a window whose output nobody reads (windows._depth): the last of
    them is a memory layer and only writes its memory (its attention and MLP would feed layers that do not run); the
    hidden states returned are then None.
    Returns the normed hidden states, the per-layer inputs (if asked) and the attention probabilities (if asked).
    """
    config = layers[0].self_attn.config
    window = make_window(
        cache,
        positions,
        mask,
        window_size=config.context_window,
        rope=rope,
        dtype=h.dtype,
        plan=plan,
        cross_batch=cross_batch,
        rope_length=rope_length,
        grouped=grouped,
    )
    hidden, attentions = [], []
    stops = depth is not None and depth < len(layers)
    for layer, state in zip(layers, cache.layers[: depth - 1 if stops else None]):  # zip ends with the shorter
        if output_hidden_states:
            hidden.append(h)
        h, probs = layer(
            h, positions=positions, window=window, state=state, use_cache=use_cache, output_attentions=output_attentions
        )
        attentions.append(probs)
    if stops:
        layers[depth - 1].write_memory(h, window, cache.layers[depth - 1])
        return None, hidden, attentions
    h = norm(h, window.ops)
    if output_hidden_states:
        hidden.append(h)
    return h, hidden, attentions
