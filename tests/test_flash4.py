"""The FlashAttention 4 memory path (flash4.py) around its kernel: layouts, per-row memory prefixes of a window group,
the merge with local attention, and the fallback after a failure. The kernel needs a Hopper GPU; here a stand-in with
the package's calling convention (batch, sequence, heads, dim tensors; seqused_k; log-sum-exp (batch, heads, queries))
computes the same function in fp32, and benchmarks/gpu_check.py / bench_inference.py --check test the real kernel."""

from __future__ import annotations

import pytest
import torch

from longllama import attention, flash4, windows

from conftest import sharp_tiny


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


@pytest.fixture
def fake(monkeypatch):
    fn = FakeVarlen()
    monkeypatch.setattr(flash4, "_varlen_func", lambda: fn)
    monkeypatch.setattr(flash4, "usable", lambda q: not flash4._broken)
    monkeypatch.setattr(flash4, "_broken", [])
    return fn


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_memory_attention_is_one_call_over_the_stored_memory(fake, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 30, 8)
    k, v = torch.randn(2, kv_heads, 500, 8), torch.randn(2, kv_heads, 500, 8)
    out, lse = attention.memory_attention(q, k, v, scale=0.3)
    ref_out, ref_lse = attention.memory_attention(q, k, v, scale=0.3, kernel="flash")
    assert len(fake.calls) == 1
    assert fake.calls[0]["k"].data_ptr() == k.data_ptr()  # a view of the memory: no copy, no head expansion
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("prefixes", [[0, 16, 32, 48], [40, 56, 72], [0]])
def test_grouped_windows_see_their_own_memory_prefix_in_one_call(fake, monkeypatch, prefixes):
    monkeypatch.setattr(flash4, "SPLIT_GROUPS", False)
    torch.manual_seed(0)
    g, n = len(prefixes), 16
    q, k, v = torch.randn(g, 4, n, 8), torch.randn(g, 2, n, 8), torch.randn(g, 2, n, 8)
    total = prefixes[-1] + n
    memory = (torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8))
    got = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
    fake_calls = len(fake.calls)
    flash4._broken.append("off")  # the same group without FlashAttention 4: one window at a time (cuDNN's path)
    want = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
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


@pytest.fixture
def tiled(fake, monkeypatch):
    """Width 8 with a listed tile of 12 query rows (windows of 16 rows leave rows computed in vain)."""
    forward = FakeForward(fake)
    monkeypatch.setattr(flash4, "_forward", lambda: forward)
    monkeypatch.setattr(flash4, "TILES", {8: (12, 16, False, True)})
    return forward


@pytest.mark.parametrize("prefixes", [[0, 16, 32, 48], [40, 56, 72], [0, 24], [16, 16, 40]])
def test_a_split_group_is_all_rows_over_the_common_prefix_then_the_rest(fake, tiled, prefixes):
    torch.manual_seed(0)
    g, n, heads = len(prefixes), 16, 4
    q, k, v = torch.randn(g, heads, n, 8), torch.randn(g, 2, n, 8), torch.randn(g, 2, n, 8)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # token-major, as the ingest path lays q out
    total = prefixes[-1] + n
    memory = (torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8))
    got = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
    calls = list(fake.calls)
    flash4._broken.append("off")
    want = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
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
def test_the_common_prefix_goes_in_key_parts_as_batch_rows_of_one_call(fake, tiled, monkeypatch, pieces):
    monkeypatch.setattr(flash4, "KEY_PARTS", pieces)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    memory = (torch.randn(1, 2, 90, 8), torch.randn(1, 2, 90, 8))
    prefixes = [50, 66, 82]
    got = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
    calls = list(fake.calls)
    flash4._broken.append("off")
    want = attention.window_attention(q, k, v, 8, padded_mem=memory, used=prefixes)
    assert (got - want).abs().max() < 1e-5
    length = {2: 32, 3: 24}[pieces]  # ceil(50 / pieces) up to a multiple of 8
    assert len(calls) == 2 and calls[0]["seqused"] == [length] * (pieces - 1) + [50 - (pieces - 1) * length]
    assert calls[0]["q"].shape[0] == pieces and calls[0]["q"].stride(0) == 0  # the same queries, not copied
    assert calls[0]["k"].stride(0) == length * memory[0].stride(2)  # part j starts at key j * length
    assert calls[0]["k"].data_ptr() == memory[0].data_ptr()
    assert calls[1]["seqused"] == [16, 32]
    flash4._broken.clear()
    parts = flash4.group_attention(q, *memory, scale=0.3, used=prefixes)
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
    want, want_lse = attention.merge_memory_parts(rows, 12)
    assert got.shape == (1, 4, 37, 12) and got.transpose(1, 2).is_contiguous()  # laid out as one part's output
    finite = torch.isfinite(want_lse)
    assert not finite[0, 1, 18] and got_lse[0, 1, 18] == -float("inf") and torch.equal(got[0, 1, 18], torch.zeros(12))
    assert (got - want.nan_to_num())[finite].abs().max() < 1e-5
    assert (got_lse - want_lse)[finite].abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,n,w", [(3, 70, 20), (1, 32, 8), (2, 5, 112)])
def test_fold_kernel_equals_its_torch_definition(monkeypatch, dtype, p, n, w):
    from longllama import kernels

    pytest.importorskip("triton")
    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    torch.manual_seed(p * n)
    out, lse = _parts(p, 4, n, w, dtype)
    want, want_lse = flash4.fold(out, lse)
    monkeypatch.setattr(kernels, "CPU", True)
    got, got_lse = flash4.fold(out, lse)
    assert got.dtype == dtype and got.stride() == want.stride()
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: both round the fp32 sum, maybe to neighbours
    assert ((got.float() - want.float()).abs() <= rtol * want.float().abs() + 1e-6).all()
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (got_lse - want_lse)[finite].abs().max() < 1e-5


def test_key_parts_need_room_in_the_memory_and_keys_for_the_last_part(fake, tiled, monkeypatch):
    monkeypatch.setattr(flash4, "KEY_PARTS", 4)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    memory = (torch.randn(1, 2, 21, 8), torch.randn(1, 2, 21, 8))
    parts = flash4.group_attention(q, *memory, scale=0.3, used=[5, 21])  # 4 parts of 8 keys: no room, one part
    assert [c["seqused"] for c in fake.calls] == [None, [16]] and len(parts) == 2


def test_a_failing_split_warns_once_and_groups_go_as_one_call(fake, tiled, monkeypatch):
    monkeypatch.setattr(flash4, "KEY_PARTS", 2)
    monkeypatch.setattr(flash4, "_split_broken", [])
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
        got = attention.window_attention(q, k, v, 8, padded_mem=memory, used=[50, 66, 82])
    attention.window_attention(q, k, v, 8, padded_mem=memory, used=[50, 66, 82])
    assert [c["seqused"] for c in fake.calls] == [[50, 66, 82]] * 2  # FlashAttention 4 still serves, one call
    assert not flash4._broken
    flash4._broken.append("off")
    want = attention.window_attention(q, k, v, 8, padded_mem=memory, used=[50, 66, 82])
    assert (got - want).abs().max() < 1e-5


def test_groups_split_only_where_the_tile_leaves_rows_in_vain(monkeypatch):
    monkeypatch.setattr(flash4, "TILES", {112: (192, 144, False, True)})
    assert flash4.splits_group(112, 2048) and not flash4.splits_group(112, 1920)  # 1920 = 10 x 192
    assert not flash4.splits_group(128, 4096)  # the package's tile (Code 7B): not measured better split
    monkeypatch.setattr(flash4, "SPLIT_GROUPS", False)
    assert not flash4.splits_group(112, 2048)


def test_long_common_prefixes_go_in_parts(monkeypatch):
    assert flash4.key_parts(65536) == 1 and flash4.key_parts(flash4.PARTS_FROM) == flash4.PARTS > 1
    monkeypatch.setattr(flash4, "KEY_PARTS", 2)
    assert flash4.key_parts(100) == 2


@pytest.mark.parametrize("split", [False, True])
def test_whole_model_with_flash4_equals_one_window_at_a_time(fake, monkeypatch, split):
    torch.manual_seed(0)
    model = sharp_tiny(num_key_value_heads=2)
    model.config.attn_impl = "fast"
    ids = torch.randint(3, 320, (1, 64 * 7 + 20))
    monkeypatch.setattr(windows, "WINDOW_GROUP_TOKENS", 256)
    width = attention.memory_storage_dim(model.config.head_dim, ids.device)
    if split:  # a tile of 48 rows for the memory's width (windows of 64 rows), the common prefix in 2 parts
        monkeypatch.setattr(flash4, "TILES", {width: (48, 16, False, True)})
        monkeypatch.setattr(flash4, "_forward", lambda: FakeForward(fake))
        monkeypatch.setattr(flash4, "KEY_PARTS", 2)
    with torch.no_grad():
        got = model(ids, use_cache=True).logits
    assert fake.calls and any(c["seqused"] for c in fake.calls)  # grouped windows took the one-call path
    assert any(c["seqused"] is not None and c["q"].stride(0) == 0 for c in fake.calls) == split  # key parts
    flash4._broken.append("off")
    monkeypatch.setattr(windows, "WINDOW_GROUP_TOKENS", 0)
    with torch.no_grad():
        want = model(ids, use_cache=True).logits
    assert (got - want).abs().max() < 1e-5


def test_a_listed_head_dimension_takes_its_tile_shape(fake, monkeypatch):
    seen = []

    def forward(q, k, v, **kwargs):  # the package's private entry point: its extra arguments, then the same maths
        seen.append({name: kwargs.pop(name) for name in ("tile_mn", "mma_pv_is_rs", "intra_wg_overlap")})
        return (*fake(q, k, v, **kwargs), None, None, None)

    monkeypatch.setattr(flash4, "_forward", lambda: forward)
    monkeypatch.setattr(flash4, "TILES", {16: (192, 144, False, True)})
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    for width in (8, 16):
        q = torch.randn(3, 4, 20, width)
        out, lse = attention.memory_attention(q, k[..., :width], v[..., :width], scale=0.3, used=[100, 200, 300])
        want = attention.memory_attention(q, k[..., :width], v[..., :width], scale=0.3, used=[100, 200, 300],
                                          kernel="flash")
        assert (out - want[0]).abs().max() < 1e-5 and (lse - want[1]).abs().max() < 1e-5
    assert seen == [dict(tile_mn=(192, 144), mma_pv_is_rs=False, intra_wg_overlap=True)]  # only the listed width
    assert len(fake.calls) == 2


def test_a_failure_warns_once_and_falls_back_for_the_process(monkeypatch):
    fn = FakeVarlen(fail=True)
    monkeypatch.setattr(flash4, "_varlen_func", lambda: fn)
    monkeypatch.setattr(flash4, "usable", lambda q: not flash4._broken)
    monkeypatch.setattr(flash4, "_broken", [])
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 4, 100, 8), torch.randn(1, 4, 100, 8)
    with pytest.warns(RuntimeWarning, match="FlashAttention 4 failed .*no kernel for this shape.*cuDNN"):
        out, lse = attention.memory_attention(q, k, v, scale=0.3)
    ref, ref_lse = attention.memory_attention(q, k, v, scale=0.3, kernel="flash")
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    attention.memory_attention(q, k, v, scale=0.3)
    assert len(fn.calls) == 1  # not tried again


def test_flash4_serves_only_hopper_half_precision(monkeypatch):
    monkeypatch.setattr(flash4, "_broken", [])
    assert not flash4.usable(torch.zeros(1, 2, 3, 8))  # a CPU tensor
    assert attention.resolve_memory_kernel(torch.zeros(1, 2, 3, 8), "fa4") == "flash"  # asked for, not served
    assert attention.resolve_memory_kernel(torch.zeros(1, 2, 3, 8), "cudnn") == "cudnn"
