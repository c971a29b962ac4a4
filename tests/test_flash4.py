"""The FlashAttention 4 memory path (flash4.py) around its kernel: layouts, per-row memory prefixes of a window group,
the merge with local attention, and the fallback after a failure. The kernel needs a Hopper GPU; here a stand-in with
the package's calling convention (batch, sequence, heads, dim tensors; seqused_k; log-sum-exp (batch, heads, queries))
computes the same function in fp32, and benchmarks/gpu_check.py / bench_inference.py --check test the real kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_steps, sharp_tiny

from longllama.fast import attention, flash4
from longllama.ops import merge_memory_parts
from longllama.plan import ExecutionPlan


class FakeVarlen:
    """flash_attn.cute.flash_attn_varlen_func for non-causal attention, in fp32; records what it was given."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, q, k, v, *, seqused_k=None, softmax_scale, causal, return_lse):
        assert not causal and return_lse
        assert q.dim() == k.dim() == v.dim() == 4 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        self.calls.append(dict(q=q, k=k, seqused=None if seqused_k is None else seqused_k.tolist()))
        if self.fail:
            raise RuntimeError("no kernel for this shape")
        b, n, h, d = q.shape
        rep = h // k.shape[2]
        outs, lses = [], []
        for i in range(b):
            m = k.shape[1] if seqused_k is None else int(seqused_k[i])
            kk = k[i, :m].float().repeat_interleave(rep, 1).transpose(0, 1)  # (h, m, d)
            vv = v[i, :m].float().repeat_interleave(rep, 1).transpose(0, 1)
            s = q[i].float().transpose(0, 1) @ kk.transpose(-1, -2) * softmax_scale  # (h, n, m)
            lses.append(torch.logsumexp(s, -1))
            outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
        return torch.stack(outs).to(q.dtype), torch.stack(lses)


def _serves_any_tensor(monkeypatch):
    """FlashAttention 4 serves CPU tensors too (the stand-in kernel runs anywhere), until a plan records its failure."""
    monkeypatch.setattr(flash4, "usable", lambda q, plan: flash4.FAILED not in plan.failures)


@pytest.fixture
def fake(monkeypatch):
    fn = FakeVarlen()
    monkeypatch.setattr(flash4, "_varlen_func", lambda: fn)
    _serves_any_tensor(monkeypatch)
    return fn


def _without_flash4(plan: ExecutionPlan) -> ExecutionPlan:
    """The same plan with memory attention on cuDNN's path: one window at a time, in pieces (the CPU kernel here)."""
    return plan.replace(memory_kernel="cudnn")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_memory_attention_is_one_call_over_the_stored_memory(fake, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 30, 8)
    k, v = torch.randn(2, kv_heads, 500, 8), torch.randn(2, kv_heads, 500, 8)
    plan = ExecutionPlan()
    out, lse = attention.memory_attention(q, k, v, scale=0.3, plan=plan)
    ref_out, ref_lse = attention.memory_attention(q, k, v, scale=0.3, plan=plan, kernel="flash")
    assert len(fake.calls) == 1
    assert fake.calls[0]["k"].data_ptr() == k.data_ptr()  # a view of the memory: no copy, no head expansion
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("prefixes", [[0, 16, 32, 48], [40, 56, 72], [0]])
def test_grouped_windows_see_their_own_memory_prefix_in_one_call(fake, prefixes):
    plan = ExecutionPlan(split_groups=False)
    torch.manual_seed(0)
    g, n = len(prefixes), 16
    q, k, v = torch.randn(g, 4, n, 8), torch.randn(g, 2, n, 8), torch.randn(g, 2, n, 8)
    total = prefixes[-1] + n
    memory = (torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8))
    got = attention.window_attention(q, k, v, 8, plan=plan, padded_mem=memory, used=prefixes)
    fake_calls = len(fake.calls)
    # the same group without FlashAttention 4: one window at a time (cuDNN's path)
    want = attention.window_attention(q, k, v, 8, plan=_without_flash4(plan), padded_mem=memory, used=prefixes)
    assert len(fake.calls) == fake_calls
    assert (got - want).abs().max() < 1e-5
    if any(prefixes):
        assert fake_calls == 1
        call = fake.calls[0]
        assert call["seqused"] == [m for m in prefixes if m]
        assert call["k"].stride(0) == 0 and call["k"].data_ptr() == memory[0].data_ptr()  # shared, not copied
    else:
        assert fake_calls == 0


class FakeForward:
    """The package's private forward entry point (flash4._forward): records its tile arguments, then the same maths
    as FakeVarlen."""

    def __init__(self, fake: FakeVarlen):
        self.fake, self.seen = fake, []

    def __call__(self, q, k, v, **kwargs):
        self.seen.append({name: kwargs.pop(name) for name in ("tile_mn", "mma_pv_is_rs", "intra_wg_overlap")})
        return (*self.fake(q, k, v, **kwargs), None, None, None)


# Width 8 with a listed tile of 12 query rows (windows of 16 rows leave rows computed in vain).
TILES_8 = {8: (12, 16, False, True)}


@pytest.fixture
def tiled(fake, monkeypatch):
    """The package's forward entry point (which takes a plan's tile) as a stand-in; plans from _tiled list TILES_8."""
    forward = FakeForward(fake)
    monkeypatch.setattr(flash4, "_forward", lambda: forward)
    return forward


def _tiled(**changes) -> ExecutionPlan:
    """A fresh plan (its own failure record) with the tiles of TILES_8."""
    return ExecutionPlan().replace(fa4_tiles=TILES_8, **changes)


@pytest.mark.parametrize("prefixes", [[0, 16, 32, 48], [40, 56, 72], [0, 24], [16, 16, 40]])
def test_a_split_group_is_all_rows_over_the_common_prefix_then_the_rest(fake, tiled, prefixes):
    torch.manual_seed(0)
    g, n, heads = len(prefixes), 16, 4
    q, k, v = torch.randn(g, heads, n, 8), torch.randn(g, 2, n, 8), torch.randn(g, 2, n, 8)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as the ingest path lays q out
    total = prefixes[-1] + n
    memory = (torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8))
    plan = _tiled()
    got = attention.window_attention(q, k, v, 8, plan=plan, padded_mem=memory, used=prefixes)
    calls = list(fake.calls)
    want = attention.window_attention(q, k, v, 8, plan=_without_flash4(plan), padded_mem=memory, used=prefixes)
    assert (got - want).abs().max() < 1e-5
    rows = [m for m in prefixes if m]
    if len(rows) < 2 or min(rows) < rows[0] or rows[1:].count(rows[0]):  # not split: the one call of the prefixes
        assert [c["seqused"] for c in calls] == [rows]
        return
    first = g - len(rows)
    assert len(calls) == 2 and calls[0]["seqused"] is None and calls[1]["seqused"] == [m - rows[0] for m in rows[1:]]
    assert calls[0]["q"].shape == (1, len(rows) * n, heads, 8)  # every row's queries as one sequence
    assert calls[0]["q"].data_ptr() == q[first].data_ptr()  # a view of the token-major queries, not a copy
    assert calls[0]["k"].shape[1] == rows[0] and calls[0]["k"].data_ptr() == memory[0].data_ptr()
    assert calls[1]["k"].data_ptr() == memory[0][:, :, rows[0]].data_ptr()  # the rest read in place
    assert tiled.seen == [dict(tile_mn=(12, 16), mma_pv_is_rs=False, intra_wg_overlap=True)] * 2


@pytest.mark.parametrize("pieces", [2, 3])
def test_the_common_prefix_goes_in_key_parts_as_batch_rows_of_one_call(fake, tiled, pieces):
    plan = _tiled(key_parts=pieces)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    memory = (torch.randn(1, 2, 90, 8), torch.randn(1, 2, 90, 8))
    prefixes = [50, 66, 82]
    got = attention.window_attention(q, k, v, 8, plan=plan, padded_mem=memory, used=prefixes)
    calls = list(fake.calls)
    want = attention.window_attention(q, k, v, 8, plan=_without_flash4(plan), padded_mem=memory, used=prefixes)
    assert (got - want).abs().max() < 1e-5
    length = {2: 32, 3: 24}[pieces]  # ceil(50 / pieces) up to a multiple of 8
    assert len(calls) == 2 and calls[0]["seqused"] == [length] * (pieces - 1) + [50 - (pieces - 1) * length]
    assert calls[0]["q"].shape[0] == pieces and calls[0]["q"].stride(0) == 0  # the same queries, not copied
    assert calls[0]["k"].stride(0) == length * memory[0].stride(2)  # part j starts at key j * length
    assert calls[0]["k"].data_ptr() == memory[0].data_ptr()
    assert calls[1]["seqused"] == [16, 32]
    parts = flash4.group_attention(q, *memory, scale=0.3, used=prefixes, plan=plan)
    assert len(parts) == 2 and parts[0][0].shape == (3, 4, 16, 8)  # the key parts folded into one, then the rest


def _parts(p, h, n, w, dtype=torch.float32):
    """P partial attentions as memory_attention returns them: out (P, h, n, w) token-major, lse (P, h, n)."""
    out = torch.randn(p, n, h, w).to(dtype).transpose(1, 2)
    lse = torch.randn(p, h, n) * 4
    lse[0, 0, :3] = -float("inf")  # rows a part gives no keys
    lse[:, 1, n // 2] = -float("inf")  # a row no part gives keys: weight 0, no NaN
    return out, lse


def test_fold_is_the_merge_of_the_parts():
    torch.manual_seed(0)
    out, lse = _parts(3, 4, 37, 12)
    got, got_lse = flash4.fold(out, lse)
    rows = [(o[None], x[None]) for o, x in zip(out, lse)]
    want, want_lse = merge_memory_parts(rows, 12)
    assert got.shape == (1, 4, 37, 12) and got.transpose(1, 2).is_contiguous()  # laid out as one part's output
    finite = torch.isfinite(want_lse)
    assert not finite[0, 1, 18] and got_lse[0, 1, 18] == -float("inf") and torch.equal(got[0, 1, 18], torch.zeros(12))
    assert (got - want.nan_to_num())[finite].abs().max() < 1e-5
    assert (got_lse - want_lse)[finite].abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,n,w", [(3, 70, 20), (1, 32, 8), (2, 5, 112)])
def test_fold_kernel_equals_its_torch_definition(monkeypatch, dtype, p, n, w):
    from longllama.fast import kernels

    pytest.importorskip("triton")
    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    torch.manual_seed(p * n)
    out, lse = _parts(p, 4, n, w, dtype)
    launched = []
    real = flash4._fold_kernel

    def kernel():
        launched.append(1)
        return real()

    monkeypatch.setattr(flash4, "_fold_kernel", kernel)
    want, want_lse = flash4.fold(out, lse)
    assert not launched  # CPU tensors without cpu=True: the torch definition
    got, got_lse = flash4.fold(out, lse, cpu=True)  # the kernel, in Triton's interpreter
    assert launched
    assert got.dtype == dtype and got.stride() == want.stride()
    # Both sum in fp32 and round once to `dtype`: the fp32 bound, plus one step where the two sums straddle a
    # rounding boundary of bf16 (neighbours).
    fp32_bound = 1e-5 * want.double().abs() + 1e-6
    assert_within_steps(got, want, dtype=dtype, steps=0 if dtype == torch.float32 else 1, atol=fp32_bound)
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (got_lse - want_lse)[finite].abs().max() < 1e-5


def test_key_parts_need_room_in_the_memory_and_keys_for_the_last_part(fake, tiled):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    memory = (torch.randn(1, 2, 21, 8), torch.randn(1, 2, 21, 8))
    parts = flash4.group_attention(
        q, *memory, scale=0.3, used=[5, 21], plan=_tiled(key_parts=4)
    )  # 4 parts of 8 keys: no room, one part
    assert [c["seqused"] for c in fake.calls] == [None, [16]] and len(parts) == 2


def test_a_failing_split_warns_once_and_groups_go_as_one_call(fake, tiled, monkeypatch):
    plan = _tiled(key_parts=2)
    forward = tiled

    def refuse_shared_queries(q, k, v, **kwargs):  # a kernel that rejects queries shared by batch rows (stride 0)
        if q.stride(0) == 0:
            raise RuntimeError("zero batch stride")
        return forward(q, k, v, **kwargs)

    monkeypatch.setattr(flash4, "_forward", lambda: refuse_shared_queries)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    memory = (torch.randn(1, 2, 90, 8), torch.randn(1, 2, 90, 8))
    with pytest.warns(RuntimeWarning, match="split window groups failed .*zero batch stride.*one call per group"):
        got = attention.window_attention(q, k, v, 8, plan=plan, padded_mem=memory, used=[50, 66, 82])
    assert flash4.SPLIT_FAILED in plan.failures and not flash4.splits_group(8, 16, plan)
    attention.window_attention(
        q, k, v, 8, plan=plan.replace(window_group_tokens=4096), padded_mem=memory, used=[50, 66, 82]
    )  # a plan replaced from it keeps the record
    assert [c["seqused"] for c in fake.calls] == [[50, 66, 82]] * 2  # FlashAttention 4 still serves, one call
    assert flash4.FAILED not in plan.failures
    assert flash4.splits_group(8, 16, _tiled(key_parts=2))  # the record is the plan's, not the process's
    want = attention.window_attention(q, k, v, 8, plan=_without_flash4(plan), padded_mem=memory, used=[50, 66, 82])
    assert (got - want).abs().max() < 1e-5


def test_groups_split_only_where_the_tile_leaves_rows_in_vain():
    plan = ExecutionPlan()
    assert plan.tile(112) == (192, 144, False, True)  # the measured tile of the default plan
    assert flash4.splits_group(112, 2048, plan) and not flash4.splits_group(112, 1920, plan)  # 1920 = 10 x 192
    assert not flash4.splits_group(128, 4096, plan)  # the package's tile (Code 7B): not measured better split
    assert not flash4.splits_group(112, 2048, plan.replace(split_groups=False))
    assert flash4.splits_group(128, 4096, plan.replace(fa4_tiles={128: (192, 128, False, True)}))


def test_long_common_prefixes_go_in_parts():
    plan = ExecutionPlan()
    assert flash4.key_parts(65536, plan) == 1 and flash4.key_parts(flash4.PARTS_FROM, plan) == flash4.PARTS > 1
    assert flash4.key_parts(100, plan.replace(key_parts=2)) == 2


@pytest.mark.parametrize("split", [False, True])
def test_whole_model_with_flash4_equals_one_window_at_a_time(fake, monkeypatch, split):
    torch.manual_seed(0)
    model = sharp_tiny(num_key_value_heads=2)
    model.config.attn_impl = "fast"
    ids = torch.randint(3, 320, (1, 64 * 7 + 20))
    model.set_plan(window_group_tokens=256)
    width = model.plan.memory_storage_dim(model.config.head_dim)
    if split:  # a tile of 48 rows for the memory's width (windows of 64 rows), the common prefix in 2 parts
        model.set_plan(fa4_tiles={width: (48, 16, False, True)}, key_parts=2)
        monkeypatch.setattr(flash4, "_forward", lambda: FakeForward(fake))
    with torch.no_grad():
        got = model(ids, use_cache=True).logits
    assert fake.calls and any(c["seqused"] for c in fake.calls)  # grouped windows took the one-call path
    assert any(c["seqused"] is not None and c["q"].stride(0) == 0 for c in fake.calls) == split  # key parts
    calls = len(fake.calls)
    model.set_plan(memory_kernel="cudnn", window_group_tokens=1)  # one window at a time, no FlashAttention 4
    with torch.no_grad():
        want = model(ids, use_cache=True).logits
    assert len(fake.calls) == calls
    assert (got - want).abs().max() < 1e-5


def test_a_listed_head_dimension_takes_its_tile_shape(fake, monkeypatch):
    plan = ExecutionPlan(fa4_tiles=((16, (192, 144, False, True)),))
    seen = []

    def forward(q, k, v, **kwargs):  # the package's private entry point: its extra arguments, then the same maths
        seen.append({name: kwargs.pop(name) for name in ("tile_mn", "mma_pv_is_rs", "intra_wg_overlap")})
        return (*fake(q, k, v, **kwargs), None, None, None)

    monkeypatch.setattr(flash4, "_forward", lambda: forward)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    for width in (8, 16):
        q = torch.randn(3, 4, 20, width)
        out, lse = attention.memory_attention(
            q, k[..., :width], v[..., :width], scale=0.3, plan=plan, used=[100, 200, 300]
        )
        want = attention.memory_attention(
            q, k[..., :width], v[..., :width], scale=0.3, plan=plan, used=[100, 200, 300], kernel="flash"
        )
        assert (out - want[0]).abs().max() < 1e-5 and (lse - want[1]).abs().max() < 1e-5
    assert seen == [dict(tile_mn=(192, 144), mma_pv_is_rs=False, intra_wg_overlap=True)]  # only the listed width
    assert len(fake.calls) == 2


def test_a_failure_warns_once_and_falls_back_under_that_plan(monkeypatch):
    fn = FakeVarlen(fail=True)
    monkeypatch.setattr(flash4, "_varlen_func", lambda: fn)
    _serves_any_tensor(monkeypatch)
    plan = ExecutionPlan()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 4, 100, 8), torch.randn(1, 4, 100, 8)
    with pytest.warns(RuntimeWarning, match="FlashAttention 4 failed .*no kernel for this shape.*cuDNN"):
        out, lse = attention.memory_attention(q, k, v, scale=0.3, plan=plan)
    assert flash4.FAILED in plan.failures and attention.resolve_memory_kernel(q, plan) == "flash"
    ref, ref_lse = attention.memory_attention(q, k, v, scale=0.3, plan=plan, kernel="flash")
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    attention.memory_attention(q, k, v, scale=0.3, plan=plan)
    attention.memory_attention(q, k, v, scale=0.3, plan=plan.replace(key_parts=2))  # replaced: the same record
    assert len(fn.calls) == 1  # not tried again


def test_flash4_serves_only_hopper_half_precision():
    plan = ExecutionPlan()
    assert not flash4.usable(torch.zeros(1, 2, 3, 8), plan)  # a CPU tensor
    assert not flash4.usable(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16), plan)
    q = torch.zeros(1, 2, 3, 8)
    assert attention.resolve_memory_kernel(q, plan.replace(memory_kernel="fa4")) == "flash"  # asked, not served
    assert attention.resolve_memory_kernel(q, plan.replace(memory_kernel="auto")) == "flash"
    assert attention.resolve_memory_kernel(q, plan.replace(memory_kernel="cudnn")) == "cudnn"
