"""Prefix reuse: a prompt whose leading whole windows were read before continues from the memory they left.

A fresh prompt of n tokens is read as memory windows of `context_window` tokens, then a final window of up to
`last_context_length` tokens kept local (windows.py). A memory window of a fresh read goes to memory and leaves no
local cache, so the cache after the first k windows depends on those k windows' tokens alone, and reading the rest
of the prompt on top of it gives exactly what reading the whole prompt does. This cache keeps that state after every
whole window it read, keyed by a hash chain over the windows' token ids; forks of one MemoryCache share its buffer, so
a state per window costs little beyond the longest one. Worker thread only."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from longllama.cache import LongLlamaCache


class PrefixCache:
    """States after whole windows of earlier prompts, at most `budget` bytes of memory buffers (LRU)."""

    def __init__(self, model, budget: int):
        self.model, self.budget = model, int(budget)
        self.window = int(model.config.context_window)
        self.last_context_length = int(model.config.last_context_length)
        self._states: OrderedDict[bytes, LongLlamaCache] = OrderedDict()

    def windows_of(self, n: int) -> int:
        """Whole memory windows a fresh n-token prompt is read in (those before its final window)."""
        return max(n - self.last_context_length, 0) // self.window

    def _chain(self, ids: Sequence[int], count: int) -> list[bytes]:
        keys, digest = [], b""
        for k in range(count):
            window = torch.tensor(ids[k * self.window : (k + 1) * self.window], dtype=torch.int64).numpy().tobytes()
            digest = hashlib.sha256(digest + window).digest()
            keys.append(digest)
        return keys

    def read(self, ids: Sequence[int]) -> tuple[LongLlamaCache | None, int, int]:
        """(cache after the prompt's whole memory windows, tokens it covers, tokens of them taken from earlier
        prompts): windows not seen before are read now and kept. (None, 0, 0) when the prompt has no whole window
        or the cache is off."""
        count = self.windows_of(len(ids)) if self.budget > 0 else 0
        if count == 0:
            return None, 0, 0
        keys = self._chain(ids, count)
        found = next((k for k in range(count, 0, -1) if keys[k - 1] in self._states), 0)
        if found:
            self._states.move_to_end(keys[found - 1])
            state = self._states[keys[found - 1]].fork()
        else:
            state = self.model.model.new_cache()
        device = self.model.lm_head.weight.device
        with torch.no_grad():
            for k in range(found, count):
                window = torch.tensor([ids[k * self.window : (k + 1) * self.window]], dtype=torch.long, device=device)
                # use_cache=False: the window goes to memory as it does in a fresh read, no local cache left
                self.model.model.run(window, cache=state, use_cache=False, last_context_length=self.window, keep_last=1)
                self._states[keys[k]] = state.fork()
                self._evict()
        return state, count * self.window, found * self.window

    def nbytes(self) -> int:
        buffers: dict[int, int] = {}
        for state in self._states.values():
            for layer in state.layers:
                if layer.memory is not None:
                    buffers[layer.memory._k.data_ptr()] = layer.memory.nbytes()
        return sum(buffers.values())

    def _evict(self) -> None:
        while len(self._states) > 1 and self.nbytes() > self.budget:
            self._states.popitem(last=False)
