"""LongLlamaCache: the state a LongLLaMA carries between calls: per layer a local cache and, in memory layers, a memory.

Per layer:
    local keys/values  (batch, kv_heads, P, head_dim)  un-rotated keys, activation dtype, P <= the context window
    local positions    (batch, P)                      int64 absolute positions (only differences matter)
    memory             MemoryCache or None             memory layers only

`to_legacy()` / `from_legacy()` convert to and from the reference's tuple format (6 tensors per layer,
docs/inference.md#cache-format).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longllama.errors import InputError
from longllama.memory import MemoryCache


class CacheAlias:
    """Outputs carry the cache as `cache` (transformers >= 5.24's name) and `past_key_values` (the older one, which
    this project's documents use), both as attribute and as key. Listed before ModelOutput among the bases: from 5.24
    ModelOutput answers the old name itself, with a deprecation warning that does not concern our outputs."""

    cache: LongLlamaCache | None

    @property
    def past_key_values(self) -> LongLlamaCache | None:
        return self.cache

    def __getitem__(self, key):
        return super().__getitem__(self._replace_old_cache_name(key) if isinstance(key, str) else key)

    def __contains__(self, key) -> bool:
        return super().__contains__(self._replace_old_cache_name(key) if isinstance(key, str) else key)

    def get(self, key, default=None):
        return super().get(self._replace_old_cache_name(key) if isinstance(key, str) else key, default)

    def _replace_old_cache_name(self, key: str) -> str:
        return "cache" if key in ("past_key_values", "cache_params") else key


@dataclass
class LayerState:
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    memory: MemoryCache | None = field(default=None, repr=False)

    @property
    def local_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def set_local(self, keys: torch.Tensor | None, values: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        self.keys, self.values, self.positions = keys, values, positions


class LongLlamaCache:
    """Local caches and memories of all layers of one LongLLaMA."""

    def __init__(self, num_layers: int):
        self.layers = [LayerState() for _ in range(num_layers)]

    # -- lengths -----------------------------------------------------------------------------------------------
    @property
    def local_length(self) -> int:
        """Tokens in the local cache (the same in every layer)."""
        return self.layers[0].local_length

    @property
    def memory_length(self) -> int:
        """Tokens in memory (the same in every memory layer; 0 when there is none)."""
        return max([0] + [s.memory.length for s in self.layers if s.memory is not None])  # (a list: torch.compile)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].local_length

    def next_positions(self) -> torch.Tensor | None:
        """(batch,) the position after the last cached one, or None when there is no local cache."""
        state = self.layers[0]
        if state.local_length == 0:
            return None
        return state.positions.max(dim=-1).values + 1

    def memory_bytes(self) -> int:
        return sum(s.memory.nbytes() for s in self.layers if s.memory is not None)

    def fork(self) -> LongLlamaCache:
        """A cache with the same contents that can be extended without changing this one (O(layers))."""
        twin = LongLlamaCache(len(self.layers))
        for mine, theirs in zip(self.layers, twin.layers):
            theirs.set_local(mine.keys, mine.values, mine.positions)
            theirs.memory = None if mine.memory is None else mine.memory.fork()
        return twin

    # -- batch operations ----------------------------------------------------------------------------------------
    def index_select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows, in every layer."""
        for s in self.layers:
            if s.keys is not None:
                s.set_local(s.keys[rows], s.values[rows], s.positions[rows])
            if s.memory is not None:
                s.memory.index_select(rows.to(s.memory.device))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.index_select(beam_idx)

    def expand_rows(self, times: int) -> None:
        """Each batch row becomes `times` consecutive rows (the beams, or the returned sequences, of one prompt):
        local caches are repeated (at most one window each), memories are shared, not copied (MemoryCache.expand)."""
        if times == 1:
            return
        for s in self.layers:
            if s.keys is not None:
                s.set_local(*(t.repeat_interleave(times, dim=0) for t in (s.keys, s.values, s.positions)))
            if s.memory is not None:
                s.memory.expand(times)

    # -- the reference's tuple format ----------------------------------------------------------------------------
    def to_legacy(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The reference's past_key_values: per layer (local_K, local_V, local_pos [b,1,P,1], mem_K, mem_V,
        mem_mask [b,1,M,1] additive in `dtype`: 0 visible, finfo.min padding); missing parts are (b,0,0,0)."""
        batch = self._batch_size()
        out = []
        for s in self.layers:
            ref = s.keys if s.keys is not None else None
            dev = device if device is not None else (ref.device if ref is not None else None)
            empty = torch.empty(batch, 0, 0, 0, device=dev)
            if s.keys is not None:
                local = (s.keys, s.values, s.positions[:, None, :, None])
            else:
                local = (empty, empty, empty)
            if s.memory is not None:
                keys, values, valid = s.memory.logical()
                mask = torch.zeros(valid.shape, dtype=dtype, device=s.memory.device)
                mask.masked_fill_(~valid, torch.finfo(dtype).min)
                mem = (keys, values, mask[:, None, :, None])
            else:
                mem = (empty, empty, empty)
            out.append(local + mem)
        return tuple(out)

    @classmethod
    def from_legacy(cls, past, *, mem_layers: list[int], mem_dtype: torch.dtype) -> LongLlamaCache:
        """Build a cache from the reference's tuple format (see `to_legacy`)."""
        cache = cls(len(past))
        for idx, entry in enumerate(past):
            if len(entry) != 6:
                raise InputError(
                    f"past_key_values[{idx}] has {len(entry)} tensors, expected 6 (local K, V, positions, memory K, "
                    "V, mask): pass the past returned by this model"
                )
            k, v, pos, mk, mv, mmask = entry
            state = cache.layers[idx]
            if k.shape[-2] != 0:
                state.set_local(k, v, pos.reshape(pos.shape[0], -1).long())
            if mk.shape[-2] != 0:
                if idx not in mem_layers:
                    raise InputError(f"past_key_values[{idx}] holds memory, but layer {idx} is not a memory layer")
                valid = mmask.reshape(mmask.shape[0], -1) > torch.finfo(mmask.dtype).min / 2
                mem = MemoryCache(mk.shape[0], mk.shape[1], mk.shape[3], dtype=mem_dtype, device=mk.device)
                mem.append(mk, mv, valid)
                state.memory = mem
        return cache

    def _batch_size(self) -> int:
        for s in self.layers:
            if s.keys is not None:
                return s.keys.shape[0]
            if s.memory is not None:
                return s.memory.rows
        return 0

    def __repr__(self) -> str:
        return (
            f"LongLlamaCache(layers={len(self.layers)}, local_length={self.local_length}, "
            f"memory_length={self.memory_length})"
        )
