"""The Triton kernel of block_attention.py (imported only where it runs: this module imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def block_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    chosen_ptr,
    out_ptr,
    lse_ptr,
    H,
    KV_H,
    T,
    M,
    GROUPS,
    group,
    scale,
    s_qb,
    s_qh,
    s_qt,
    s_kb,
    s_kh,
    s_km,
    s_valid,
    D: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program: `group` consecutive queries of one (row, head) against the KEEP blocks its key/value head chose for
    # that query group (chosen: (b, kv_heads, groups, KEEP) block indices), one online softmax over them, the keys
    # read in place from the stored memory (b, kv_heads, M, width; values alike). Keys past M or not valid count as
    # hidden. Writes the normalised output (fp32) and the log-sum-exp of the scores for the merge with the local part.
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: a memory layer past 2^31 elements (3B at 1M tokens)
    h = (bh % H).to(tl.int64)
    kvh = h // (H // KV_H)
    r = tl.arange(0, BLOCK_Q)
    rows = g * group + r
    live = (r < group) & (rows < T)
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qt + cols[None, :],
        mask=live[:, None] & (cols[None, :] < D),
        other=0.0,
    )
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    base = k_ptr + b * s_kb + kvh * s_kh
    vbase = v_ptr + b * s_kb + kvh * s_kh
    chosen = chosen_ptr + ((b * KV_H + kvh) * GROUPS + g) * KEEP
    for j in range(KEEP):
        block = tl.load(chosen + j)
        offsets = tl.arange(0, BLOCK_K)
        keys = block.to(tl.int64) * BLOCK_SIZE + offsets
        seen = (offsets < BLOCK_SIZE) & (keys < M)
        if HAS_VALID:
            seen = seen & (tl.load(valid_ptr + b * s_valid + keys, mask=seen, other=0) != 0)
        kmask = seen[:, None] & (cols[None, :] < D)
        k = tl.load(base + keys[:, None] * s_km + cols[None, :], mask=kmask, other=0.0).to(q.dtype)
        v = tl.load(vbase + keys[:, None] * s_km + cols[None, :], mask=kmask, other=0.0).to(q.dtype)
        if UPCAST:  # Triton's interpreter: exact fp32 products (its tl.dot misreads bf16 operands)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(seen[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: nothing to rescale
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0  # a query whose blocks hold no valid key: no memory part (lse -inf, output 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_rows = (b * H + h) * T + rows
    tl.store(out_ptr + o_rows[:, None] * D + cols[None, :], out, mask=live[:, None] & (cols[None, :] < D))
    tl.store(lse_ptr + o_rows, lse, mask=live)


@triton.jit
def block_bounds_kernel(
    q_ptr,
    real_ptr,
    kmax_ptr,
    kmin_ptr,
    any_ptr,
    best_ptr,
    KV_H,
    GROUPS,
    ROWS,
    NB,
    s_qb,
    s_qh,
    s_qg,
    s_qr,
    s_sb,
    s_sh,
    s_sn,
    s_ab,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # For one query group of one (row, key/value head) and BLOCK_B memory blocks: the largest bound over the group's
    # query rows of q . k for any key of the block, relu(q) . kmax + min(q, 0) . kmin (retrieval.select_blocks),
    # -inf for padding rows and for blocks without a valid key. The rows x blocks bounds stay in registers: only
    # their maximum per block is written (best: (b, kv_heads, groups, NB) fp32).
    g = tl.program_id(0)
    bh = tl.program_id(1)
    pb = tl.program_id(2)
    b = (bh // KV_H).to(tl.int64)
    kvh = (bh % KV_H).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    blocks = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    q = tl.load(
        q_ptr + b * s_qb + kvh * s_qh + g * s_qg + rows[:, None] * s_qr + cols[None, :],
        mask=(rows[:, None] < ROWS) & (cols[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    smask = (blocks[:, None] < NB) & (cols[None, :] < D)
    offsets = b * s_sb + kvh * s_sh + blocks[:, None] * s_sn + cols[None, :]
    kmax = tl.load(kmax_ptr + offsets, mask=smask, other=0.0)
    kmin = tl.load(kmin_ptr + offsets, mask=smask, other=0.0)
    bound = tl.dot(tl.maximum(q, 0.0), tl.trans(kmax)) + tl.dot(tl.minimum(q, 0.0), tl.trans(kmin))
    real = tl.load(real_ptr + g * ROWS + rows, mask=rows < ROWS, other=0) != 0
    bound = tl.where(real[:, None], bound, float("-inf"))
    best = tl.max(bound, axis=0)
    valid = tl.load(any_ptr + b * s_ab + blocks, mask=blocks < NB, other=0) != 0
    best = tl.where(valid, best, float("-inf"))
    tl.store(best_ptr + ((b * KV_H + kvh) * GROUPS + g) * NB + blocks, best, mask=blocks < NB)


@triton.jit
def step_bounds_kernel(
    q_ptr,
    real_ptr,
    kmax_ptr,
    kmin_ptr,
    any_ptr,
    best_ptr,
    KV_H,
    NB,
    s_qb,
    s_qh,
    s_qr,
    s_sb,
    s_sh,
    s_sn,
    s_ab,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # block_bounds_kernel for a single query group of at most a few rows (a decoding step: one position, the query
    # heads of one key/value head): no tensor-core product to pad to 16 rows, each summary read once in fp32 and the
    # bound of each row, sum_d max(q_d kmax_d, q_d kmin_d), formed in registers. A step reads every summary of the
    # memory, so this is a pass over them at the memory's bandwidth.
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = (bh // KV_H).to(tl.int64)
    kvh = (bh % KV_H).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    blocks = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    smask = (blocks[:, None] < NB) & (cols[None, :] < D)
    offsets = b * s_sb + kvh * s_sh + blocks[:, None] * s_sn + cols[None, :]
    kmax = tl.load(kmax_ptr + offsets, mask=smask, other=0.0)
    kmin = tl.load(kmin_ptr + offsets, mask=smask, other=0.0)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    for r in tl.static_range(ROWS):
        q = tl.load(q_ptr + b * s_qb + kvh * s_qh + r * s_qr + cols, mask=cols < D, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * kmax, q[None, :] * kmin), axis=1)
        real = tl.load(real_ptr + r) != 0
        best = tl.maximum(best, tl.where(real, bound, float("-inf")))
    valid = tl.load(any_ptr + b * s_ab + blocks, mask=blocks < NB, other=0) != 0
    best = tl.where(valid, best, float("-inf"))
    tl.store(best_ptr + (b * KV_H + kvh) * NB + blocks, best, mask=blocks < NB)


@triton.jit
def gather_blocks_kernel(
    k_ptr,
    v_ptr,
    chosen_ptr,
    k_out,
    v_out,
    KV_H,
    KEEP,
    rows_b,
    rows_h,
    BLOCK_SIZE: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program: one chosen block of one (row, key/value head), its BLOCK_SIZE stored rows of keys and of values
    # copied whole (WIDTH columns, the padding included) to the block's place in the gathered memory (b, kv_heads,
    # KEEP * BLOCK_SIZE, WIDTH). chosen: (b, kv_heads, KEEP) block indices, every block whole inside the memory. The
    # stored memory's rows are WIDTH apart (rows_b, rows_h: its strides in rows): with WIDTH a compile-time constant
    # Triton knows every row starts 16-byte aligned and copies 16-byte vectors (a stride passed as a plain argument
    # not divisible by 16, 104 for head_dim 100, made it copy element by element: about 0.5 ms a step's 64 blocks of
    # the 3B shape, against 0.05 ms).
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = (bh // KV_H).to(tl.int64)
    kvh = (bh % KV_H).to(tl.int64)
    block = tl.load(chosen_ptr + bh * KEEP + j).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows[:, None] < BLOCK_SIZE) & (cols[None, :] < WIDTH)
    src = (b * rows_b + kvh * rows_h + block * BLOCK_SIZE + rows)[:, None] * WIDTH + cols[None, :]
    dst = (bh.to(tl.int64) * KEEP * BLOCK_SIZE + j * BLOCK_SIZE + rows)[:, None] * WIDTH + cols[None, :]
    tl.store(k_out + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(v_out + dst, tl.load(v_ptr + src, mask=mask), mask=mask)
