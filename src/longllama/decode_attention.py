"""A decoding step's attention as Triton kernels: one query per head against the local cache and the memory.

Reading the keys and values is the whole cost of this step (after 256k tokens the three memory layers of the 3B
model hold ~11 GB), so the keys are cut into chunks, one program per (row, head, chunk) streams its chunk once and
keeps a running softmax (max, sum, weighted values in fp32), and a second kernel merges the chunks' partial results
exactly ("split-K" / flash decoding). The local cache and the memory are two sets of chunks of the same softmax:
local slots past the current one are masked before reading (not read at all), and the memory is read as stored,
zero-padded head dimension included (aligned rows load as whole vectors; the zeros add nothing). Before it,
`rope_store` takes a step's fused q/k/v projection, rotates q and k and writes the new key (raw and rotated) and
value into the static local buffers, in one kernel instead of five.

Compared with attention.few_query_attention: scores and probabilities stay in fp32 (the unfused path rounds them
to the activation dtype before the products), so results agree within the activation dtype's rounding. Only dense
memories (no kNN top-k, every key valid) come here; decode.py keeps the general path for the rest.
"""

from __future__ import annotations

import functools
import math

import torch

from longllama import kernels

_LOG2E = 1.4426950408889634
_TARGET_PROGRAMS = 2048  # chunks x rows x heads aimed at: ~15 programs per SM of an H100 (profile_step.py)
_MIN_CHUNK, _MAX_CHUNK = 128, 8192
_DEFAULTS = {"BLOCK_N": 32}  # the interpreter's configuration (no autotuning there)
_MERGE_BLOCK = 64
# partials' configurations (BLOCK_N, num_warps): at least 8 elements of a 128-wide tile per thread
_CHOICES = [(n, w) for n in (16, 32, 64, 128) for w in (2, 4, 8, 16) if n * 128 // (32 * w) >= 8]
# Chosen on an H100 (bench_inference.py run "j", 2026-11-26) for the 3B model: local slots (chunks of 128 keys, rows
# 104 wide) and memories of 32k and 256k keys (chunks of 512 and 4096, rows 112 wide); see kernels.autotune.
_MEASURED = {("NVIDIA H100 80GB HBM3", "torch.bfloat16", chunk, 100, width): ({"BLOCK_N": n}, w)
             for chunk, width, n, w in [(128, 104, 16, 8), (512, 112, 32, 2), (4096, 112, 32, 2)]}


@functools.lru_cache(maxsize=1)
def _kernels():
    triton, tl = kernels.triton()
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in _CHOICES]

    @kernels.autotune(configs, key=["chunk", "D", "D_READ"], measured=_MEASURED)
    @triton.jit
    def partials(q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, n_ptr, n_fixed, split0, splits, H, group,
                 s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, scale_log2, chunk, D, D_READ,
                 FROM_PTR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        # Each of the BLOCK_N rows of the tile keeps its own running softmax over the keys it sees (keys r,
        # r + BLOCK_N, ...), so the loop has no reduction across rows; the rows are merged once at the end.
        # D_READ >= D columns of keys and values are read (a zero-padded memory read whole, for aligned vector
        # loads); q is zero past D, and output columns past D are never stored.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // group
        if FROM_PTR:  # the local cache: slots 0..slot are in use
            n = tl.load(n_ptr) + 1
        else:
            n = n_fixed
        start = split * chunk
        end = tl.minimum(start + chunk, n)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * s_qb + h * s_qh + d, mask=d < D, other=0.0).to(tl.float32) * scale_log2
        k_base = k_ptr + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
        v_base = v_ptr + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
        m_r = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
        l_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):  # unused local slots: no iteration; rows past `end`: masked
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < end
            r64 = rows.to(tl.int64)
            mask = rmask[:, None] & (d < D_READ)[None, :]
            k = tl.load(k_base + r64[:, None] * s_kn + d[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + r64[:, None] * s_vn + d[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.where(rmask, tl.sum(k * q[None, :], axis=1), -float("inf"))  # log2-scaled scores
            m_new = tl.maximum(m_r, s)
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # no key yet in this row: weights stay 0
            alpha = tl.exp2(m_r - m_ref)
            p = tl.exp2(s - m_ref)
            acc = acc * alpha[:, None] + p[:, None] * v
            l_r = l_r * alpha + p
            m_r = m_new
        m_i = tl.max(m_r, axis=0)
        w = tl.exp2(m_r - tl.where(m_i == -float("inf"), 0.0, m_i))
        out = bh * splits + split0 + split
        tl.store(acc_ptr + out * BLOCK_D + d, tl.sum(acc * w[:, None], axis=0))
        tl.store(m_ptr + out, m_i)
        tl.store(l_ptr + out, tl.sum(l_r * w, axis=0))

    @triton.jit
    def merge(acc_ptr, m_ptr, l_ptr, o_ptr, splits, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        m_all = -float("inf")
        l_all = 0.0
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for s0 in range(0, splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < splits
            m = tl.load(m_ptr + bh * splits + s, mask=smask, other=-float("inf"))
            m_new = tl.maximum(m_all, tl.max(m, axis=0))
            # Chunks that saw no key have m = -inf and weight 0; the first block always holds a non-empty one (the
            # local chunk with the current slot), so m_new is finite from the first block on.
            w = tl.where(smask & (m > -float("inf")), tl.exp2(m - m_new), 0.0)
            alpha = tl.exp2(m_all - m_new)
            part = tl.load(acc_ptr + (bh * splits + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None],
                           other=0.0)
            acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
            l_all = l_all * alpha + tl.sum(w * tl.load(l_ptr + bh * splits + s, mask=smask, other=0.0), axis=0)
            m_all = m_new
        tl.store(o_ptr + bh * D + d, (acc / l_all).to(o_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def rope_store(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, raw_ptr, rot_ptr, val_ptr, H, HKV,
                   s_b, s_h, s_n, D: tl.constexpr, ROTATE: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        slot = tl.load(slot_ptr)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        half = D // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + slot * D + d, mask=dmask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + slot * D + d, mask=dmask, other=0.0).to(tl.float32) * sign
        row = qkv_ptr + b * (H + 2 * HKV) * D
        if j < H:  # a query head: rotated into the contiguous (b, H, D) query
            x = tl.load(row + j * D + d, mask=dmask, other=0.0).to(tl.float32)
            if ROTATE:
                x = x * c + tl.load(row + j * D + partner, mask=dmask, other=0.0).to(tl.float32) * sn
            tl.store(q_ptr + (b * H + j) * D + d, x.to(q_ptr.dtype.element_ty), mask=dmask)
        else:  # a key/value head: raw key, rotated key and value into slot `slot` of the local buffers
            hk = j - H
            k = tl.load(row + (H + hk) * D + d, mask=dmask, other=0.0)
            v = tl.load(row + (H + HKV + hk) * D + d, mask=dmask, other=0.0)
            dst = b * s_b + hk * s_h + slot * s_n + d
            tl.store(raw_ptr + dst, k, mask=dmask)
            tl.store(val_ptr + dst, v, mask=dmask)
            k = k.to(tl.float32)
            if ROTATE:
                k = k * c + tl.load(row + (H + hk) * D + partner, mask=dmask, other=0.0).to(tl.float32) * sn
            tl.store(rot_ptr + dst, k.to(rot_ptr.dtype.element_ty), mask=dmask)

    return triton, partials, merge, rope_store


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels serve a step whose activations are x (CUDA, or the interpreter; bf16/fp16/fp32)."""
    return kernels.usable(x) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _chunk(n: int, rows: int) -> int:
    """Keys per program: about _TARGET_PROGRAMS programs over `rows` (batch x heads) rows, a power of two."""
    want = max(1, -(-n * rows // _TARGET_PROGRAMS))
    return min(_MAX_CHUNK, max(_MIN_CHUNK, 1 << (want - 1).bit_length()))


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor, raw: torch.Tensor,
               rot: torch.Tensor, values: torch.Tensor, heads: int, rotate: bool) -> torch.Tensor:
    """qkv (b, 1, (heads + 2 kv_heads) d) of one step; cos, sin (window, d) tables; slot (1,) long. Writes the key
    into raw (as is) and rot (rotated when `rotate`), the value into values at `slot`: contiguous buffers
    (b, kv_heads, window, width >= d) whose columns past d are left alone. Returns q (b, heads, d), rotated when
    `rotate`."""
    b, kv_heads = raw.shape[:2]
    d = cos.shape[-1]
    if not (raw.is_contiguous() and rot.is_contiguous() and values.is_contiguous()):
        raise ValueError("rope_store: the local buffers must be contiguous")
    qkv = qkv.reshape(b, (heads + 2 * kv_heads) * d).contiguous()
    q = torch.empty(b, heads, d, dtype=qkv.dtype, device=qkv.device)
    rope = _kernels()[3]
    rope[(b, heads + kv_heads)](qkv, cos.contiguous(), sin.contiguous(), slot, q, raw, rot, values, heads, kv_heads,
                                raw.stride(0), raw.stride(1), raw.stride(2), D=d, ROTATE=rotate,
                                BLOCK_D=triton_pow2(d))
    return q


def triton_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
           memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (b, h, d); keys, values (b, h_kv, window, d') of which slots 0..slot are in use; memory (keys, values)
    (b, h_kv, M, d'') as stored, or None; d', d'' >= d, the columns past d zero (those past the next multiple of 16
    are not read). Returns the attention output
    (b, h, d) in q's dtype: one softmax over the used local slots and the whole memory, with scale 1/sqrt(d)."""
    _, partials, merge, _ = _kernels()
    b, h, d = q.shape
    kv_heads, window = keys.shape[1], keys.shape[2]
    if h % kv_heads:
        raise ValueError(f"decode attention: {h} query heads do not share {kv_heads} key/value heads evenly")
    rows = b * h
    parts = [(keys, values, window, True)]
    if memory is not None and memory[0].shape[2]:
        parts.append((memory[0], memory[1], memory[0].shape[2], False))
    chunks = [_chunk(n, rows) for _, _, n, _ in parts]
    counts = [-(-n // c) for (_, _, n, _), c in zip(parts, chunks)]
    splits = sum(counts)
    block_d = triton_pow2(max(d, *(k.shape[-1] for k, _, _, _ in parts)))
    acc = torch.empty(rows, splits, block_d, dtype=torch.float32, device=q.device)
    m = torch.empty(rows, splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty(rows, splits, dtype=torch.float32, device=q.device)
    scale_log2 = _LOG2E / math.sqrt(d)
    # Columns read per row: the stored rows up to the next multiple of 16 past d (aligned vector loads); zero padding
    # beyond that (a memory stored 128 wide for head_dim 100) is never read.
    read = -(-d // 16) * 16
    split0 = 0
    for (k, v, n, local), chunk, count in zip(parts, chunks, counts):
        kernels.launch(partials, lambda meta, count=count: (rows, count),
                       (q, k, v, acc, m, lsum, slot, n, split0, splits, h, h // kv_heads,
                        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), scale_log2, chunk, d, min(k.shape[-1], read)),
                       _DEFAULTS, FROM_PTR=local, BLOCK_D=block_d)
        split0 += count
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    merge[(rows,)](acc, m, lsum, out, splits, d, BLOCK_S=_MERGE_BLOCK, BLOCK_D=block_d)
    return out
