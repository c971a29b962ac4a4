"""The memory of one memory layer: (key, value, valid) triples of all earlier windows, grown in amortised O(1).

Storage only: the keys are stored exactly as given (un-rotated k_proj outputs, see docs/inference.md#attention);
positions and attention
are the model's concern.

Shapes:
    keys, values  (batch, kv_heads, length, head_dim)   in the memory dtype (bf16 by default, as the reference)
    valid         (batch, length)                       bool, False where the token was padding

The reference concatenated the whole memory into a new tensor for every window (quadratic copying). Here appends
write into a buffer whose capacity doubles when full, so n appended tokens cost O(n) copies in total; a caller who
knows the final length can `reserve` it and pay no copy at all.

8-bit memory (dtype torch.int8, the config's mem_dtype "int8"): keys and values are stored as int8 with one fp32
scale per (row, head, token), symmetric (scale = the token's largest magnitude / 127, so a value is off by at most
half of 1/127 of its token's largest one); `scales()` gives them. Nothing dequantizes the whole memory: attention
folds the key scales into the scores and the value scales into the probabilities, chunk by chunk
(attention.py), and the decoding kernel loads int8 and scales in registers (fast/decode_kernels.py). `keys` and
`values` (exports) are dequantized copies. docs/quantization.md says why int8 rather than fp8.

`fork()` gives a second MemoryCache over the same buffer (O(1)); whichever fork appends first past the shared end
keeps writing in place, the other copies before its own append (copy on write), so a memory loaded once can be
continued several times (e.g. different questions about one document).

Shared rows (`share` > 1, docs/inference.md#beam-search): each stored row serves `share` consecutive logical rows
(the beams or returned sequences of one prompt), so a prompt's memory is never copied per beam. Attention folds the
logical rows of one stored row into its query dimension (attention.fold_rows). Reordering logical rows within their
prompt (`index_select`, as beam search does) touches no memory; an append of per-row entries (a beam's local cache
overflowing into memory) first materialises one stored row per logical row: a copy of the whole memory, `share`
times its size, paid once (later appends write in place).

Block summaries (retrieval memory, retrieval.py): with `track_blocks(block_size)`, every append also summarises the
blocks of `block_size` keys it completes: per (row, head, block) the per-dimension max and min of the block's valid
keys (fp32, dequantized for int8), from which q.k of any key of the block is bounded above. Complete blocks never
change, so their summaries are computed once; the last, incomplete block is summarised when read. Summaries may
live on another device than the keys (`summaries(..., device=)`: on the GPU for a memory offloaded to CPU memory).
Forks copy them with the keys (copy on write); operations that change rows drop them (computed again when read).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longllama.errors import CheckpointError, InputError

_MIN_CAPACITY = 256
_QMAX = 127  # symmetric int8: -127..127 (no -128, so negation is exact)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d) as int8 (..., d) and fp32 scales (...): symmetric, one scale per row (its largest magnitude / 127;
    an all-zero row gets scale 0 and zeros)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / _QMAX
    q = torch.where(scale[..., None] > 0, xf / scale.clamp_min(1e-30)[..., None], 0.0)
    return q.round_().clamp_(-_QMAX, _QMAX).to(torch.int8), scale


def reduce_superblocks(
    kmax: torch.Tensor, kmin: torch.Tensor, any_valid: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summaries of superblocks of `size` consecutive blocks (the last one possibly shorter) from block summaries
    (batch, kv_heads, blocks, head_dim) x2 and (batch, blocks): the max of their maxima, the min of their minima,
    whether any holds a valid key. A block without a valid key has zero summaries (_reduce_blocks), so a
    superblock's bound stays an upper bound of its keys' scores."""
    b, hkv, n_blocks, d = kmax.shape
    count = -(-n_blocks // size)
    pad = count * size - n_blocks
    if pad:
        kmax, kmin = F.pad(kmax, (0, 0, 0, pad)), F.pad(kmin, (0, 0, 0, pad))
        any_valid = F.pad(any_valid, (0, pad), value=False)
    smax = kmax.reshape(b, hkv, count, size, d).amax(dim=3)
    smin = kmin.reshape(b, hkv, count, size, d).amin(dim=3)
    return smax, smin, any_valid.reshape(b, count, size).any(dim=-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_rows undone: q (..., d) int8 times scale (...), in `dtype`."""
    return (q.float() * scale[..., None].float()).to(dtype)


class MemoryCache:
    """Growable (keys, values, valid) storage of one memory layer.

    `storage_dim` >= head_dim stores keys/values zero-padded in the last dimension, so that fast attention kernels
    that want a multiple of 8 (head_dim 100 -> 104, say) read the memory in place instead of copying it per window.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        capacity: int = 0,
        storage_dim: int | None = None,
        pin_memory: bool = False,
    ):
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.share = 1  # logical rows per stored row (see the module docstring)
        self.storage_dim = head_dim if storage_dim is None else max(storage_dim, head_dim)
        self.dtype = dtype
        self.pin_memory = pin_memory  # page-locked CPU buffers: copies to the GPU run at full PCIe speed
        self.length = 0
        self.has_invalid = False  # any entry with valid=False (tracked so attention needs no device sync)
        self._ks = self._vs = None  # int8 memory: fp32 scales (batch, kv_heads, capacity)
        self._k, self._v, self._valid = self._allocate(capacity, torch.device(device) if device else None)
        self._written = [0]  # entries written into this buffer by any fork; shared between forks
        self.copies = 0  # how many times the buffer was re-allocated (tests check growth is amortised)
        self._drop_summaries()
        self._block_size: int | None = None  # blocks summarised at append (track_blocks), None: only when read
        self._summary_device: torch.device | None = None  # where tracked summaries live (None: with the keys)
        self.appends = 0  # append events offered to a sharded memory (each process keeps its turns, sharding.py)
        self.read_bytes = 0  # bytes of keys and values gathered by block retrieval (retrieval.py), for tests

    def _allocate(self, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        make = torch.zeros if self.storage_dim > self.head_dim else torch.empty  # padding columns must be 0
        shape = (self.batch, self.kv_heads, capacity, self.storage_dim)
        pin = self.pin_memory and torch.cuda.is_available()
        k = make(shape, dtype=self.dtype, device=device, pin_memory=pin)
        v = make(shape, dtype=self.dtype, device=device, pin_memory=pin)
        if self.quantized:
            self._ks, self._vs = (
                torch.zeros(shape[:3], dtype=torch.float32, device=device, pin_memory=pin) for _ in range(2)
            )
        return k, v, torch.empty(self.batch, capacity, dtype=torch.bool, device=device, pin_memory=pin)

    @property
    def quantized(self) -> bool:
        """Whether keys and values are stored as int8 with per-token scales (see the module docstring)."""
        return self.dtype == torch.int8

    # -- views of the live part --------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        """The keys (batch, kv_heads, length, head_dim): a view, or for int8 memory a dequantized fp32 copy."""
        k = self._k[:, :, : self.length, : self.head_dim]
        return dequantize_rows(k, self._ks[:, :, : self.length]) if self.quantized else k

    @property
    def values(self) -> torch.Tensor:
        """The values, as `keys`."""
        v = self._v[:, :, : self.length, : self.head_dim]
        return dequantize_rows(v, self._vs[:, :, : self.length]) if self.quantized else v

    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The key and value scales (batch, kv_heads, length) of int8 memory, None for other dtypes."""
        if not self.quantized:
            return None
        return self._ks[:, :, : self.length], self._vs[:, :, : self.length]

    def logical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and valid flags with one row per logical row (a copy where rows are shared: exports)."""
        k, v, valid = self.keys, self.values, self.valid
        if self.share > 1:
            k, v, valid = (t.repeat_interleave(self.share, dim=0) for t in (k, v, valid))
        return k, v, valid

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values with the zero padding up to `storage_dim` (for kernels)."""
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, : self.length]

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def pinned(self) -> bool:
        """Whether the buffers are in page-locked CPU memory in fact (pin_memory asks for it; a machine without CUDA
        cannot give it, and a selection of rows or a move makes new, ordinary buffers)."""
        return self._k.device.type == "cpu" and torch.cuda.is_available() and self._k.is_pinned()

    def mapped_to(self, device: torch.device) -> bool:
        """Whether kernels running on `device` can read the buffers where they are stored: they live there, or in
        page-locked CPU memory, which CUDA devices address directly and read over the bus (unified addressing)."""
        return self.device == device or (self.pinned and device.type == "cuda")

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    @property
    def rows(self) -> int:
        """Logical batch rows: stored rows times `share`."""
        return self.batch * self.share

    def all_valid(self) -> bool:
        return not self.has_invalid

    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not just the live part)."""
        held = [self._k, self._v, self._valid] + ([self._ks, self._vs] if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in held)

    # -- growth ------------------------------------------------------------------------------------------------
    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` entries in total without further re-allocation."""
        if capacity <= self.capacity and self._owns_end():
            return
        capacity = max(capacity, self.length)
        old_scales = self.scales()
        k, v, valid = self._allocate(capacity, self.device)
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        valid[:, : self.length] = self.valid
        if old_scales is not None:
            self._ks[:, :, : self.length], self._vs[:, :, : self.length] = old_scales
        if self.pinned:  # kernels may still read the old page-locked buffers in place; freed, they could be reused
            torch.cuda.synchronize()
        self._k, self._v, self._valid = k, v, valid
        self._written = [self.length]
        self.copies += 1
        if self._smax is not None:  # copy on write: a fork may still write its own blocks into the old summaries
            self._smax, self._smin, self._sany = (t.clone() for t in (self._smax, self._smin, self._sany))

    def _owns_end(self) -> bool:
        return self._written[0] == self.length

    def fork(self) -> MemoryCache:
        """A MemoryCache with the same entries sharing this buffer; appends to either never change the other."""
        twin = object.__new__(MemoryCache)
        twin.__dict__.update(self.__dict__)
        twin.copies = 0
        return twin

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append keys/values (batch, kv_heads, n, head_dim) and their valid flags (batch, n; None: all valid)."""
        n = keys.shape[2]
        if self.share > 1 and keys.shape[0] == self.rows:
            self.materialise()
        if keys.shape != (self.batch, self.kv_heads, n, self.head_dim) or values.shape != keys.shape:
            raise InputError(
                f"memory append got keys {tuple(keys.shape)} / values {tuple(values.shape)}, expected "
                f"({self.batch}, {self.kv_heads}, n, {self.head_dim}): pass tensors of this memory's batch and heads"
            )
        if valid is None:
            valid = torch.ones(self.batch, n, dtype=torch.bool, device=self.device)
        elif not self.has_invalid:  # a traced graph assumes padding rather than read the flags back
            self.has_invalid = torch.compiler.is_compiling() or not bool(valid.all())
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            if self.quantized:
                raise InputError(
                    "int8 memory is for inference: train with mem_dtype bfloat16 or float32 (gradients do not "
                    "flow through int8 storage)"
                )
            self._append_differentiable(keys, values, valid)
            return
        if self.length + n > self.capacity or not self._owns_end():
            self.reserve(max(self.length + n, 2 * self.capacity, _MIN_CAPACITY))
        end = self.length + n
        if self.quantized:
            (keys, self._ks[:, :, self.length : end]), (values, self._vs[:, :, self.length : end]) = (
                quantize_rows(keys),
                quantize_rows(values),
            )
        self._k[:, :, self.length : end, : self.head_dim] = keys
        self._v[:, :, self.length : end, : self.head_dim] = values
        self._valid[:, self.length : end] = valid
        self.length = end
        self._written[0] = end
        self._supers = None
        if self._block_size is not None:
            self._summarise(self._block_size)

    def _append_differentiable(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        # Training: writes into a shared buffer would break autograd; concatenate functionally instead.
        pad = (0, self.storage_dim - self.head_dim)
        k, v = self.padded()
        self._k = torch.cat([k, F.pad(keys.to(self.dtype), pad)], dim=2)
        self._v = torch.cat([v, F.pad(values.to(self.dtype), pad)], dim=2)
        self._valid = torch.cat([self.valid, valid.to(torch.bool)], dim=1)
        self.length += keys.shape[2]
        self._written = [self.length]
        self._drop_summaries()

    def clear(self) -> None:
        """Forget every entry and release the buffers (a fork may still be reading them)."""
        self.length = 0
        self._k, self._v, self._valid = self._allocate(0, self.device)
        self.has_invalid = False
        self._written = [0]
        self._drop_summaries()

    def expand(self, times: int) -> None:
        """Each logical row becomes `times` consecutive logical rows (beams of one prompt) with no copy: the stored
        rows are shared (`share`)."""
        if times < 1:
            raise InputError(f"expand(times={times}): pass a positive number of rows per row")
        self.share *= times

    def materialise(self) -> None:
        """One stored row per logical row (a copy of the memory, `share` times its size); no-op when not shared."""
        if self.share > 1:
            self._select(torch.arange(self.batch, device=self.device).repeat_interleave(self.share))
            self.share = 1

    def index_select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) logical batch rows `rows`, e.g. to reorder beams or drop finished sequences. With shared
        rows, a selection that keeps every logical row within its group (beam search's reordering) changes no stored
        row; any other selection materialises the selected rows."""
        if self.share > 1:
            groups = rows // self.share
            same = torch.arange(self.batch, device=rows.device).repeat_interleave(self.share)
            if groups.shape == same.shape and bool((groups == same).all()):
                return
            self.share = 1
            rows = groups
        self._select(rows)

    def _select(self, rows: torch.Tensor) -> None:
        k, v = self.padded()
        scales = self.scales()
        self._k, self._v, self._valid = k[rows], v[rows], self.valid[rows]
        if scales is not None:
            self._ks, self._vs = scales[0][rows], scales[1][rows]
        self.batch = self._k.shape[0]
        self.has_invalid = not bool(self._valid.all())
        self._written = [self.length]
        self._drop_summaries()

    def to(self, device: torch.device | str) -> MemoryCache:
        """Move the buffers (pinned CPU memory or another GPU, say); in place, returns self."""
        if torch.device(device) != self.device:
            k, v = self.padded()
            scales = self.scales()
            self._k, self._v, self._valid = k.to(device), v.to(device), self.valid.to(device)
            if scales is not None:
                self._ks, self._vs = scales[0].to(device), scales[1].to(device)
            self._written = [self.length]
        return self

    # -- block summaries (retrieval.py) ----------------------------------------------------------------------------
    def _drop_summaries(self) -> None:
        self._sbs: int | None = None  # block size of the stored summaries
        self._smax = self._smin = self._sany = None  # (batch, kv_heads, blocks, head_dim) fp32 x2; (batch, blocks)
        self._summarised = 0  # complete blocks summarised (this fork's; the buffers may hold more rows)
        self._supers = None  # (block_size, super_size, device), superblock summaries: kept until the next append

    def track_blocks(self, block_size: int, device: torch.device | str | None = None) -> None:
        """Summarise blocks of `block_size` keys as appends complete them, keeping the summaries on `device`
        (default: the memory's own; see the module docstring)."""
        self._block_size = block_size
        self._summary_device = None if device is None else torch.device(device)
        self._summarise(block_size, device)

    def _block_keys(self, start: int, end: int) -> torch.Tensor:
        """Stored keys [start, end) as fp32 (dequantized for int8 memory)."""
        k = self._k[:, :, start:end, : self.head_dim]
        if self.quantized:
            return dequantize_rows(k, self._ks[:, :, start:end])
        return k.float()

    def _reduce_blocks(self, start: int, end: int, block_size: int, device):
        """Max, min (batch, kv_heads, blocks, head_dim) and any-valid (batch, blocks) of the keys [start, end) in
        blocks of `block_size` (the last one may be shorter), on `device`."""
        keys = self._block_keys(start, end)
        valid = self._valid[:, start:end]
        n = end - start
        blocks = -(-n // block_size)
        pad = blocks * block_size - n
        if pad:
            keys = F.pad(keys, (0, 0, 0, pad))
            valid = F.pad(valid, (0, pad), value=False)
        b, h, d = self.batch, self.kv_heads, self.head_dim
        keys = keys.reshape(b, h, blocks, block_size, d)
        valid = valid.reshape(b, 1, blocks, block_size, 1)
        kmax = keys.masked_fill(~valid, float("-inf")).amax(dim=3)
        kmin = keys.masked_fill(~valid, float("inf")).amin(dim=3)
        anyv = valid[:, 0, :, :, 0].any(dim=-1)
        # A block with no valid key gets zeros (never chosen: any-valid is False), never an infinity in a product.
        kmax, kmin = kmax.masked_fill(~anyv[:, None, :, None], 0.0), kmin.masked_fill(~anyv[:, None, :, None], 0.0)
        return kmax.to(device), kmin.to(device), anyv.to(device)

    def _summarise(self, block_size: int, device=None) -> None:
        """Extend the stored summaries to every complete block (on `device`: default, where they are)."""
        if self._sbs != block_size:
            self._drop_summaries()
            self._sbs = block_size
        if device is None:
            device = self._smax.device if self._smax is not None else (self._summary_device or self.device)
        elif self._smax is not None and self._smax.device != torch.device(device):
            self._smax, self._smin, self._sany = (t.to(device) for t in (self._smax, self._smin, self._sany))
        complete = self.length // block_size
        done = self._summarised
        if complete <= done:
            return
        kmax, kmin, anyv = self._reduce_blocks(done * block_size, complete * block_size, block_size, device)
        if self._smax is None or self._smax.shape[2] < complete:  # doubling: O(1) amortised per block
            rows = max(complete, 2 * (0 if self._smax is None else self._smax.shape[2]), 64)
            shape = (self.batch, self.kv_heads, rows, self.head_dim)
            smax, smin = torch.empty(shape, device=device), torch.empty(shape, device=device)
            sany = torch.zeros(self.batch, rows, dtype=torch.bool, device=device)
            if self._smax is not None:
                smax[:, :, :done], smin[:, :, :done], sany[:, :done] = (
                    self._smax[:, :, :done],
                    self._smin[:, :, :done],
                    self._sany[:, :done],
                )
            self._smax, self._smin, self._sany = smax, smin, sany
        self._smax[:, :, done:complete], self._smin[:, :, done:complete] = kmax, kmin
        self._sany[:, done:complete] = anyv
        self._summarised = complete

    def summaries(
        self, block_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per block of `block_size` keys (the last one possibly shorter): the per-dimension max and min of its
        valid keys (batch, kv_heads, blocks, head_dim) fp32 and whether it holds any valid key (batch, blocks), on
        `device` (default: the memory's). Stored rows (shared rows are not repeated)."""
        device = torch.device(device) if device is not None else self.device
        self._summarise(block_size, device)
        complete = self._summarised
        kmax, kmin, anyv = self._smax[:, :, :complete], self._smin[:, :, :complete], self._sany[:, :complete]
        if self.length > complete * block_size:
            tail = self._reduce_blocks(complete * block_size, self.length, block_size, device)
            kmax, kmin = torch.cat([kmax, tail[0]], dim=2), torch.cat([kmin, tail[1]], dim=2)
            anyv = torch.cat([anyv, tail[2]], dim=1)
        return kmax, kmin, anyv

    def super_summaries(
        self, block_size: int, super_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """reduce_superblocks of `summaries(block_size, device)`, computed once per state of the memory: every query
        group, layer call and decoding step until the next append reads the same ones."""
        device = torch.device(device) if device is not None else self.device
        key = (block_size, super_size, device)
        if self._supers is None or self._supers[0] != key:
            self._supers = (key, reduce_superblocks(*self.summaries(block_size, device), super_size))
        return self._supers[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live part as named tensors, one row per logical row, as stored: keys/values/valid, and for int8
        memory the int8 keys/values with key_scales/value_scales (batch, heads, M) (what `save` writes and
        `from_tensors` reads; document memories use them too)."""
        if not self.quantized:
            return dict(zip(("keys", "values", "valid"), self.logical()))
        d, n = self.head_dim, self.length
        parts = [self._k[:, :, :n, :d], self._v[:, :, :n, :d], self.valid, *self.scales()]
        if self.share > 1:
            parts = [t.repeat_interleave(self.share, dim=0) for t in parts]
        return dict(zip(("keys", "values", "valid", "key_scales", "value_scales"), parts))

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        *,
        source: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        storage_dim: int | None = None,
        capacity: int = 0,
        pin_memory: bool = False,
    ) -> MemoryCache:
        """A memory of the named tensors of `tensors()`, in `dtype` (default: as stored; float keys are quantized
        for int8, int8 ones dequantized for a float dtype, int8 kept as stored); `source` names them in errors;
        `pin_memory`: its buffers page-locked, as an offloaded memory's (a CPU `device`)."""
        keys, values, valid = tensors.get("keys"), tensors.get("values"), tensors.get("valid")
        if keys is None or values is None or valid is None:
            raise CheckpointError(f"{source} lacks keys, values or valid flags: write it again with MemoryCache.save")
        if keys.dim() != 4 or values.shape != keys.shape or valid.shape != (keys.shape[0], keys.shape[2]):
            raise CheckpointError(
                f"{source} holds keys {tuple(keys.shape)}, values {tuple(values.shape)}, valid "
                f"{tuple(valid.shape)}: expected (batch, heads, M, head_dim) twice and (batch, M); write it again "
                "with MemoryCache.save"
            )
        scales = (tensors.get("key_scales"), tensors.get("value_scales"))
        if keys.dtype == torch.int8:
            if any(s is None or s.shape != keys.shape[:3] or s.dtype != torch.float32 for s in scales):
                raise CheckpointError(
                    f"{source} holds int8 keys without matching fp32 key_scales/value_scales (batch, heads, M): "
                    "write it again with MemoryCache.save"
                )
            if dtype is not None and dtype != torch.int8:
                keys, values = dequantize_rows(keys, scales[0], dtype), dequantize_rows(values, scales[1], dtype)
        device = keys.device if device is None else torch.device(device)
        b, h, n, d = keys.shape
        mem = cls(
            b, h, d, dtype=dtype or keys.dtype, device=device, storage_dim=storage_dim, capacity=max(capacity, n),
            pin_memory=pin_memory,
        )  # fmt: skip
        valid = valid.to(device=device, dtype=torch.bool)
        if mem.quantized and keys.dtype == torch.int8:  # stored as they were: no second rounding
            mem._k[:, :, :n, :d], mem._v[:, :, :n, :d] = keys.to(device), values.to(device)
            mem._ks[:, :, :n], mem._vs[:, :, :n] = (t.to(device) for t in scales)
            mem._valid[:, :n] = valid
            mem.length, mem._written = n, [n]
            mem.has_invalid = not bool(valid.all())
            return mem
        mem.append(keys.to(device), values.to(device), valid)
        return mem

    # -- files -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the live part to a safetensors file, atomically (a temporary file renamed into place); int8 memory
        as stored (a round trip changes nothing)."""
        path = Path(path)
        tensors = {name: t.contiguous().cpu() for name, t in self.tensors().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "longllama-memory-v1"})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: torch.device | str | None = None, storage_dim: int | None = None
    ) -> MemoryCache:
        """Read a memory written by `save`."""
        try:
            tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"cannot read memory file {path}: {first}; write it again with MemoryCache.save"
            ) from None
        return cls.from_tensors(tensors, source=f"memory file {path}", storage_dim=storage_dim)

    def __repr__(self) -> str:
        return (
            f"MemoryCache(batch={self.batch}, share={self.share}, kv_heads={self.kv_heads}, length={self.length}, "
            f"capacity={self.capacity}, head_dim={self.head_dim}, dtype={self.dtype})"
        )
