"""The Triton kernels of decode_attention.py (imported only where they run: this module imports Triton)."""

import triton
import triton.language as tl

from longllama.fast import kernels, tables
from longllama.fast.tables import DECODE_ATTENTION, DECODE_ATTENTION_CHOICES, DECODE_ATTENTION_ROWS

_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in DECODE_ATTENTION_CHOICES]
# the measured table's configurations with other num_stages than the default
_CONFIGS += [
    triton.Config(meta, num_warps=warps, num_stages=stages[0])
    for meta, warps, *stages in [*DECODE_ATTENTION.values(), *DECODE_ATTENTION_ROWS.values()]
    if stages and stages[0] != 3
]


@triton.jit
def partials_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    n_ptr,
    lo_ptr,
    n_fixed,
    split0,
    splits,
    H,
    group,
    s_qb,
    s_qh,
    s_kb,
    s_kh,
    s_vb,
    s_vh,
    scale_log2,
    chunk,
    D,
    ks_ptr,
    vs_ptr,
    s_sb,
    s_sh,
    rows_ptr,
    S_KN: tl.constexpr,
    S_VN: tl.constexpr,
    D_READ: tl.constexpr,
    FROM_PTR: tl.constexpr,
    HAS_LO: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALED: tl.constexpr = False,
    ROWS: tl.constexpr = False,
):
    # SCALED: int8 keys/values (an 8-bit memory) with one fp32 scale per row at ks_ptr/vs_ptr (strides s_sb, s_sh,
    # 1): the key scale multiplies the row's score, the value scale its weight, in registers (no dequantized copy).
    # Each of the BLOCK_N rows of the tile keeps its own running softmax over the keys it sees (keys r,
    # r + BLOCK_N, ...), so the loop has no reduction across rows; the rows are merged once at the end.
    # D_READ >= D columns of keys and values are read (a zero-padded memory read whole, for aligned vector
    # loads); q is zero past D, and output columns past D are never stored. The row strides S_KN, S_VN and D_READ
    # are compile-time constants: rows 104 wide are then known to start 16-byte aligned and to end on a whole
    # vector, so they load as 16-byte vectors (as run-time values not divisible by 16 they loaded element by
    # element).
    # ROWS: every row of the batch reads its own memory (batch_decode.py) in this one launch: rows_ptr holds per row
    # (key offset, value offset, key head stride, value head stride) from k_ptr and v_ptr in units of 8 elements,
    # and its length.
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // group
    if FROM_PTR:  # the local cache: slots 0..slot are in use
        n = tl.load(n_ptr) + 1
    elif ROWS:
        n = tl.load(rows_ptr + b * 5 + 4)
    else:
        n = n_fixed
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    if HAS_LO:  # rows of a batch of independent sequences: slots before the row's first one are not its own
        start = tl.maximum(start, tl.load(lo_ptr + b))
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + d, mask=d < D, other=0.0).to(tl.float32) * scale_log2
    if ROWS:  # offsets and strides in units of 8 elements: the compiler then knows the rows' vectors are aligned
        row = rows_ptr + b * 5
        k_base = k_ptr + (tl.load(row) + hk.to(tl.int64) * tl.load(row + 2)) * 8
        v_base = v_ptr + (tl.load(row + 1) + hk.to(tl.int64) * tl.load(row + 3)) * 8
    else:
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
        k = tl.load(k_base + r64[:, None] * S_KN + d[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + r64[:, None] * S_VN + d[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)  # log2-scaled scores
        if SCALED:
            s_row = b.to(tl.int64) * s_sb + hk.to(tl.int64) * s_sh + r64
            s = s * tl.load(ks_ptr + s_row, mask=rmask, other=0.0)
            v = v * tl.load(vs_ptr + s_row, mask=rmask, other=0.0)[:, None]
        s = tl.where(rmask, s, -float("inf"))
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


partials = kernels.Kernel(
    "decode_attention",
    partials_kernel,
    _CONFIGS,
    ["chunk", "D", "D_READ"],
    DECODE_ATTENTION,
    tables.decode_attention_rule,
)
# The same kernel where one launch reads every row's own memory (ROWS): its own table and rule, as its best
# configurations differ from those of one row's launch.
rows_partials = kernels.Kernel(
    "decode_attention_rows",
    partials_kernel,
    _CONFIGS,
    ["chunk", "D", "D_READ"],
    DECODE_ATTENTION_ROWS,
    tables.decode_attention_rows_rule,
)


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
        # Chunks that saw no key have m = -inf and weight 0; so does a whole block of them (m_ref keeps exp2 finite).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        w = tl.where(smask & (m > -float("inf")), tl.exp2(m - m_ref), 0.0)
        alpha = tl.exp2(m_all - m_ref)
        part = tl.load(acc_ptr + (bh * splits + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        l_all = l_all * alpha + tl.sum(w * tl.load(l_ptr + bh * splits + s, mask=smask, other=0.0), axis=0)
        m_all = m_new
    tl.store(o_ptr + bh * D + d, (acc / l_all).to(o_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def rope_store(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    lo_ptr,
    q_ptr,
    raw_ptr,
    rot_ptr,
    val_ptr,
    H,
    HKV,
    s_b,
    s_h,
    s_n,
    D: tl.constexpr,
    ROTATE: tl.constexpr,
    HAS_LO: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    slot = tl.load(slot_ptr)
    pos = slot  # the position the step rotates for: the slot, or the slot within the row's own (batch_decode.py)
    if HAS_LO:
        pos = slot - tl.load(lo_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    c = tl.load(cos_ptr + pos * D + d, mask=dmask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + pos * D + d, mask=dmask, other=0.0).to(tl.float32) * sign
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
