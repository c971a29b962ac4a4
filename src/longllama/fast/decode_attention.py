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

from longllama.fast import kernels
from longllama.plan import ExecutionPlan

_LOG2E = 1.4426950408889634
_MAX_CHUNK = 8192
# the plan's defaults (ExecutionPlan.decode_min_chunk, decode_programs) for callers without a plan
MIN_CHUNK, PROGRAMS = ExecutionPlan.decode_min_chunk, ExecutionPlan.decode_programs
_DEFAULTS = {"BLOCK_N": 32}  # the interpreter's configuration (no autotuning there)
_MERGE_BLOCK = 64


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernels (decode_kernels.py), imported on first use: Triton is only needed where they run."""
    from longllama.fast import decode_kernels as k

    return k.partials, k.merge, k.rope_store, k.rows_partials


def kernel_objects():
    """The partials kernel with its configuration choices (kernels.Kernel) as one row's launches and as the one
    launch over a batch's rows, for `longllama tune`."""
    return _kernels()[0], _kernels()[3]


def applies(x: torch.Tensor, *, cpu: bool = False) -> bool:
    """Whether the kernels serve a step whose activations are x (CUDA, or CPU under the interpreter with `cpu`;
    bf16/fp16/fp32)."""
    return kernels.usable_float(x, cpu=cpu)


def chunk_for(n: int, rows: int, *, programs: int = PROGRAMS, min_chunk: int = MIN_CHUNK) -> int:
    """Keys per program over n keys: about `programs` programs over `rows` (batch x heads) rows, a power of two of
    at least `min_chunk`."""
    want = max(1, -(-n * rows // programs))
    return min(_MAX_CHUNK, max(min_chunk, 1 << (want - 1).bit_length()))


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot: torch.Tensor,
    raw: torch.Tensor,
    rot: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    rotate: bool,
    lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv (b, 1, (heads + 2 kv_heads) d) of one step; cos, sin (window, d) tables; slot (1,) long. Writes the key
    into raw (as is) and rot (rotated when `rotate`), the value into values at `slot`: contiguous buffers
    (b, kv_heads, window, width >= d) whose columns past d are left alone. Returns q (b, heads, d), rotated when
    `rotate`, for position `slot`, or with `lo` (b,) for position slot - lo[row] (batch_decode.py)."""
    b, kv_heads = raw.shape[:2]
    d = cos.shape[-1]
    if not (raw.is_contiguous() and rot.is_contiguous() and values.is_contiguous()):
        raise ValueError("rope_store: the local buffers must be contiguous")
    qkv = qkv.reshape(b, (heads + 2 * kv_heads) * d).contiguous()
    q = torch.empty(b, heads, d, dtype=qkv.dtype, device=qkv.device)
    rope = _kernels()[2]
    kernels.launch_fixed(
        "rope_store",
        rope,
        (b, heads + kv_heads),
        (
            qkv,
            cos.contiguous(),
            sin.contiguous(),
            slot,
            slot if lo is None else lo,
            q,
            raw,
            rot,
            values,
            heads,
            kv_heads,
            raw.stride(0),
            raw.stride(1),
            raw.stride(2),
        ),
        D=d,
        ROTATE=rotate,
        HAS_LO=lo is not None,
        BLOCK_D=kernels.pow2(d),
    )
    return q


def rows_table(
    row_memories: list[tuple[torch.Tensor, torch.Tensor] | None], device: torch.device
) -> torch.Tensor | None:
    """The table by which attend's one launch reads every row's own memory (keys, values (1, h_kv, M_i, d'') or
    None): per row the offsets of its keys and values from the first memory's and their head strides, in units of 8
    elements, and M_i, as a (rows, 5) long tensor on `device`; None where one launch cannot read them (different
    dtypes, widths or row strides, or offsets and strides that are not multiples of 8 elements: the kernel loads
    aligned vectors).
    Built on the host: a caller that replays a CUDA graph makes it before capturing and keeps it while the graph
    lives."""
    used = [m for m in row_memories if m is not None and m[0].shape[2]]
    if not used:
        return None
    k0, v0 = used[0]
    entries = []
    for mem in row_memories:
        if mem is None or not mem[0].shape[2]:
            entries.append((0, 0, 0, 0, 0))
            continue
        k, v = mem
        if any(
            t.dtype != k0.dtype or t.shape[0] != 1 or t.shape[-1] != k0.shape[-1] or t.stride(-1) != 1 for t in (k, v)
        ) or (k.stride(2), v.stride(2)) != (k0.stride(2), v0.stride(2)):
            return None
        size = k.element_size()
        offsets = ((k.data_ptr() - k0.data_ptr()) // size, (v.data_ptr() - v0.data_ptr()) // size)
        entry = (*offsets, k.stride(1), v.stride(1), k.shape[2])
        if (k.data_ptr() - k0.data_ptr()) % size or (v.data_ptr() - v0.data_ptr()) % size:
            return None
        if any(x % 8 for x in entry[:4]):
            return None
        entries.append((*(x // 8 for x in entry[:4]), entry[4]))
    return torch.tensor(entries, dtype=torch.long, device=device)


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    lo: torch.Tensor | None = None,
    row_memories: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    row_table: torch.Tensor | None = None,
    autotune: bool = False,
    min_chunk: int = MIN_CHUNK,
    programs: int = PROGRAMS,
) -> torch.Tensor:
    """q (b, h, d); keys, values (b, h_kv, window, d') of which slots 0..slot are in use; memory (keys, values)
    (b, h_kv, M, d'') as stored, or None; d', d'' >= d, the columns past d zero (those past the next multiple of 16
    are not read); `scales` the (key, value) scales (b, h_kv, M) of an int8 memory, applied in the kernel's
    registers. Returns the attention output
    (b, h, d) in q's dtype: one softmax over the used local slots and the whole memory, with scale 1/sqrt(d).

    A batch of independent sequences (batch_decode.py) passes `lo` (b,) long, each row's first local slot (slots
    lo..slot are its own), and `row_memories`, one memory per row ((1, h_kv, M_i, d'') or None) instead of `memory`,
    with `row_table` = rows_table(row_memories) where it can be made (not None): then one launch reads every row's
    memory; without a table each row's memory is a launch of its own (into that row's share of the partial results).
    `autotune`: the partials kernel's configuration by Triton's autotuner (the plan's field), else chosen from the
    tables or the rule (kernels.Kernel). `min_chunk`, `programs`: the split (the plan's decode_min_chunk and
    decode_programs; chunk_for)."""
    partials, merge, _, rows_partials = _kernels()
    b, h, d = q.shape
    kv_heads, window = keys.shape[1], keys.shape[2]
    if h % kv_heads:
        raise ValueError(f"decode attention: {h} query heads do not share {kv_heads} key/value heads evenly")
    rows = b * h
    parts = [(keys, values, window, True)]
    if memory is not None and memory[0].shape[2]:
        parts.append((memory[0], memory[1], memory[0].shape[2], False))
    # The local cache in chunks of min_chunk slots whatever the rows: chunks outside a row's own slots cost a program
    # that exits at once, and on an H100 8 rows' local caches read in 64-slot chunks took 35 us against 52 us in
    # the 128-slot chunks that chunk_for gave them (benchmarks/HISTORY.md, "Eight rows a step").
    split = {"programs": programs, "min_chunk": min_chunk}
    chunks = [min_chunk if local else chunk_for(n, rows, **split) for _, _, n, local in parts]
    counts = [-(-n // c) for (_, _, n, _), c in zip(parts, chunks)]
    per_row = [m for m in (row_memories or []) if m is not None and m[0].shape[2]]
    longest = max((m[0].shape[2] for m in per_row), default=1)
    one = row_table is not None and bool(per_row)
    # One launch over all rows: chunks sized for b * h rows of programs. Launches of their own have h rows each:
    # chunks sized for that launch, not for the batch (8 rows' 16k memories got 512 programs a launch instead of the
    # 4096 aimed at).
    row_chunk = chunk_for(longest, rows if one else h, **split)
    row_count = -(-longest // row_chunk) if per_row else 0
    splits = sum(counts) + row_count
    widths = [k.shape[-1] for k, _, _, _ in parts] + [m[0].shape[-1] for m in per_row]
    block_d = kernels.pow2(max(d, *widths))
    # Launches of their own leave the split entries of a row with fewer memory chunks than the longest unwritten:
    # they start empty (m = -inf, no weight). A program of the one launch writes its entry even where it reads none.
    fill = row_count and not one
    make = torch.zeros if fill else torch.empty
    acc = make(rows, splits, block_d, dtype=torch.float32, device=q.device)
    m = torch.full((rows, splits), -float("inf"), dtype=torch.float32, device=q.device) if fill else None
    m = torch.empty(rows, splits, dtype=torch.float32, device=q.device) if m is None else m
    lsum = make(rows, splits, dtype=torch.float32, device=q.device)
    scale_log2 = _LOG2E / math.sqrt(d)
    # Columns read per row: the stored rows up to the next multiple of 16 past d (aligned vector loads); zero padding
    # beyond that (a memory stored 128 wide for head_dim 100) is never read.
    read = -(-d // 16) * 16

    def launch(q, k, v, n, local, chunk, count, split0, acc, m, lsum, pair=None, table=None):
        scaled = pair is not None
        ks, vs = pair if scaled else (m, m)  # unread where not SCALED
        kernels.launch(
            partials if table is None else rows_partials,
            lambda meta: (q.shape[0] * h, count),
            (
                q,
                k,
                v,
                acc,
                m,
                lsum,
                slot,
                slot if lo is None else lo,
                n,
                split0,
                splits,
                h,
                h // kv_heads,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                v.stride(0),
                v.stride(1),
                scale_log2,
                chunk,
                d,
                ks,
                vs,
                ks.stride(0) if scaled else 0,
                ks.stride(1) if scaled else 0,
                m if table is None else table,  # unread without a table
            ),
            _DEFAULTS,
            autotune=autotune,
            S_KN=k.stride(2),
            S_VN=v.stride(2),
            D_READ=min(k.shape[-1], read),
            FROM_PTR=local,
            HAS_LO=local and lo is not None,
            BLOCK_D=block_d,
            SCALED=scaled,
            ROWS=table is not None,
        )

    split0 = 0
    for (k, v, n, local), chunk, count in zip(parts, chunks, counts):
        launch(q, k, v, n, local, chunk, count, split0, acc, m, lsum, None if local else scales)
        split0 += count
    if one:
        first = per_row[0]
        launch(q, first[0], first[1], 0, False, row_chunk, row_count, split0, acc, m, lsum, table=row_table)
    for row, mem in enumerate([] if one else row_memories or []):
        if mem is None or not mem[0].shape[2]:
            continue
        n = mem[0].shape[2]
        own = slice(row * h, (row + 1) * h)  # this row's (head, split) entries: a view, written in place
        launch(
            q[row : row + 1],
            mem[0],
            mem[1],
            n,
            False,
            row_chunk,
            -(-n // row_chunk),
            split0,
            acc[own],
            m[own],
            lsum[own],
        )
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    kernels.launch_fixed(
        "decode_attention_merge", merge, (rows,), (acc, m, lsum, out, splits, d), BLOCK_S=_MERGE_BLOCK, BLOCK_D=block_d
    )
    return out
