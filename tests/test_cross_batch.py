"""Cross-batch memory (docs/training.md#cross-batch-memory, F18): the R_eff lists, the no-leak and R = 0 invariants on a
tiny model, gradients
through other entries, one memory layer against an explicit transcription of docs/training.md#cross-batch-memory steps
1-6, and the first pack
of a batch against inference memory on the same stream.
"""

from __future__ import annotations

import math

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.attention import attend
from longllama.config import preset
from longllama.errors import InputError
from longllama.fast.attention import joint_attention
from longllama.training.cross_batch import (
    EVAL_CROSS_BATCH_RANGE,
    CrossBatch,
    dataset_packing_of,
    effective_ranges,
    make_cross_batch,
    pack_sizes,
)

VOCAB = 320
L = 32


# -- R_eff lists -----------------------------------------------------------------------------------------------------
def r_eff(batch: int, r: int, k: int, stepping: bool = True) -> list[int]:
    return effective_ranges(batch, cross_batch_range=r, dataset_packing=k, stepping=stepping)


@pytest.mark.parametrize(
    "batch, r, k, expected",
    [
        (4, 2, 2, [0, 1, 0, 2]),  # setup_test
        (8, 6, 4, [0, 1, 2, 3, 0, 3, 6, 6]),  # README example
        (16, 3, 4, [0, 1, 2, 3] + [0, 2, 3, 3] * 3),  # the 3B recipe
        (16, 7, 4, [0, 1, 2, 3] + [0, 3, 6, 7] * 3),
    ],
)
def test_spec_r_eff_lists(batch, r, k, expected):
    assert r_eff(batch, r, k) == expected


def test_spec_r_eff_prefix_k4_r7():
    assert r_eff(16, 7, 4)[:8] == [0, 1, 2, 3, 0, 3, 6, 7]


@pytest.mark.parametrize("r, recipe", [(3, [(0, 0), (1, 1), (2, 1), (3, 0)]), (7, [(0, 0), (1, 2), (2, 4), (3, 4)])])
def test_positives_and_negatives_per_pack_index(r, recipe):
    # Beyond the first pack, the earlier entries of an entry's own pack are positives, the rest negatives.
    k = 4
    ranges = r_eff(4 * k, r, k)
    for b in range(k, 4 * k):
        positives = min(ranges[b], b % k)
        assert (positives, ranges[b] - positives) == recipe[b % k]


@pytest.mark.parametrize(
    "r, stepping, recipe",
    [(3, True, [0, 1, 2, 3]), (7, True, [0, 1, 2, 3]), (2, False, [0, 1, 2, 2]), (1, True, [0, 1, 1, 1])],
)
def test_without_negatives_only_the_own_pack_is_reached(r, stepping, recipe):
    # The ablation keeps each entry's positives (those of the reference's setting) and drops every other stream's chunk.
    k = 4
    spec = effective_ranges(4 * k, cross_batch_range=r, dataset_packing=k, stepping=stepping)
    ablation = effective_ranges(4 * k, cross_batch_range=r, dataset_packing=k, stepping=stepping, negatives=False)
    assert ablation == recipe * 4
    assert all(a == min(s, b % k) for b, (a, s) in enumerate(zip(ablation, spec, strict=True)))
    cb = CrossBatch(r, k, stepping, negatives=False)
    assert [s - 1 for s in cb.pack_sizes(4 * k)] == ablation
    assert make_cross_batch(cross_batch_range=r, data_pipeline="doc_aware_k4", stepping=stepping, negatives=False) == cb


@pytest.mark.parametrize(
    "batch, r, k, stepping, expected",
    [
        (4, 2, 1, True, [0, 1, 2, 2]),  # k = 1: stepping has no effect
        (4, 2, 2, False, [0, 1, 2, 2]),
        (8, 6, 4, False, [0, 1, 2, 3, 4, 5, 6, 6]),
        (4, 0, 2, True, [0, 0, 0, 0]),
        (3, 5, 1, True, [0, 1, 2]),  # R larger than the batch
        (6, 6, 4, True, [0, 1, 2, 3, 0, 3]),  # pack_sizes itself accepts a partial pack
    ],
)
def test_r_eff_without_stepping_and_edge_cases(batch, r, k, stepping, expected):
    assert r_eff(batch, r, k, stepping) == expected
    assert pack_sizes(batch, cross_batch_range=r, dataset_packing=k, stepping=stepping) == [x + 1 for x in expected]


# -- settings and errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(cross_batch_range=-1), "cross_batch_range=-1"),
        (dict(cross_batch_range=1, dataset_packing=0), "dataset_packing=0"),
        (dict(cross_batch_range=1.5), "cross_batch_range=1.5"),
    ],
)
def test_bad_settings_are_one_line_input_errors(kwargs, words):
    with pytest.raises(InputError, match=words) as info:
        CrossBatch(**kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError):
        pack_sizes(4, **kwargs)


def test_batch_must_hold_whole_packs():
    keys = torch.zeros(6, 1, 2, 4)
    with pytest.raises(InputError, match="not divisible by dataset_packing=4") as info:
        CrossBatch(2, 4).memory(keys, keys)
    assert "\n" not in str(info.value)
    CrossBatch(2, 3).memory(keys, keys)  # 6 = 2 packs of 3
    CrossBatch(2, 4, stepping=False).check_batch(8)


def test_make_cross_batch_from_config_values():
    assert make_cross_batch(cross_batch_range=2, data_pipeline="doc_aware_k2") == CrossBatch(2, 2, True)
    assert make_cross_batch() == CrossBatch(1, 1, True)
    evaluation = make_cross_batch(
        cross_batch_range=EVAL_CROSS_BATCH_RANGE, data_pipeline="doc_aware_k1", stepping=False
    )
    assert evaluation == CrossBatch(0, 1, False)
    assert [dataset_packing_of(name) for name in ("linear", "doc_aware", "doc_aware_k4")] == [1, 1, 4]
    with pytest.raises(InputError, match="doc_aware_kx"):
        dataset_packing_of("doc_aware_kx")


# -- the memory tensors -----------------------------------------------------------------------------------------------
def test_memory_layout_and_validity():
    b, h, n, d = 4, 2, 3, 5
    keys = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, h, n, d).contiguous()
    values = -keys
    cb = CrossBatch(2, 2)  # setup_test: pack sizes [1, 2, 1, 3]
    mem_k, mem_v, valid = cb.memory(keys, values)
    assert mem_k.shape == mem_v.shape == (b, h, 2 * n, d) and valid.shape == (b, 2 * n)
    # Context c occupies columns (c-1)*L .. c*L-1 and holds entry b-c (clamped at 0, never wrapped).
    source = mem_k[:, 0, ::n, 0]  # (B, R)
    assert source.tolist() == [[0, 0], [0, 0], [1, 0], [2, 1]]
    assert torch.equal(mem_v, -mem_k)
    assert valid[:, ::n].tolist() == [[False, False], [True, False], [False, False], [True, True]]
    assert torch.equal(valid, valid[:, ::n].repeat_interleave(n, dim=1))


def test_range_zero_gives_empty_memory():
    keys = torch.randn(4, 2, 3, 5)
    mem_k, mem_v, valid = CrossBatch(0, 2).memory(keys, keys)
    assert mem_k.shape == mem_v.shape == (4, 2, 0, 5) and valid.shape == (4, 0) and valid.dtype == torch.bool


# -- one memory layer against docs/training.md#cross-batch-memory steps 1-6
# ---------------------------------------------------------------------
def rope_half(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def spec_cross_batch_layer(q, k, v, *, r: int, k_pack: int, stepping: bool) -> torch.Tensor:
    """docs/training.md#cross-batch-memory steps 2-6 with explicit loops: selector b-c with wrap-around, additive 0/-1e6
    biases, one fp32
    softmax over n_att*L keys. q (B, H, L, D), k, v (B, H_kv, L, D); returns (B, H, L, D)."""
    bsz, h, n, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))  # query head i uses kv head i // group
    pos = torch.arange(n)
    q_loc, k_loc, k_first = rope_half(q, pos) / math.sqrt(d), rope_half(k, pos), k
    n_att = 1 + r
    out = torch.empty_like(q)
    for b in range(bsz):
        if k_pack == 1 or not stepping:
            size = n_att
        else:
            size = min((b % k_pack) * math.ceil(n_att / max(k_pack - 1, 1)) + 1, n_att)
        size = min(size, b + 1)
        keys, vals, biases = [], [], []
        for c in range(n_att):
            src = (b - c) % bsz  # JAX gather wraps negative indices
            keys.append(k_loc[b] if c == 0 else k_first[src])
            vals.append(v[src])
            bias = torch.full((n, n), 0.0 if c < size else -1e6)
            if c == 0:
                bias = bias + torch.full((n, n), -1e6).triu(1)
            biases.append(bias)
        scores = torch.einsum("hqd,hkd->hqk", q_loc[b].float(), torch.cat(keys, 1).float()) + torch.cat(biases, 1)
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hqk,hkd->hqd", probs, torch.cat(vals, 1).float())
    return out


@pytest.mark.parametrize("r, k_pack, stepping", [(2, 2, True), (6, 4, True), (3, 1, False), (0, 2, True)])
def test_memory_layer_matches_spec_steps(r, k_pack, stepping):
    gen = torch.Generator().manual_seed(r * 10 + k_pack)
    bsz, h, h_kv, n, d = 8, 4, 2, 5, 8  # grouped-query: the memory holds only the kv heads
    q = 2.0 * torch.randn(bsz, h, n, d, generator=gen)
    k, v = (2.0 * torch.randn(bsz, h_kv, n, d, generator=gen) for _ in range(2))
    pos = torch.arange(n)
    mem_k, mem_v, mem_valid = CrossBatch(r, k_pack, stepping).memory(k, v)
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    got, _ = attend(
        rope_half(q, pos), rope_half(k, pos), v, visible=visible, mem_k=mem_k, mem_v=mem_v, mem_valid=mem_valid
    )
    expected = spec_cross_batch_layer(q, k, v, r=r, k_pack=k_pack, stepping=stepping)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r, k_pack, stepping", [(2, 2, True), (6, 4, True), (3, 1, False), (0, 2, True)])
def test_joint_attention_matches_spec_steps_with_gradients(r, k_pack, stepping):
    # The fused path of training (no mask: each earlier entry whole or not at all), forward and backward, against
    # the documented steps (docs/training.md#cross-batch-memory) and against the masked exact path.
    gen = torch.Generator().manual_seed(r * 10 + k_pack + 1)
    bsz, h, h_kv, n, d = 8, 4, 2, 5, 8
    q = 2.0 * torch.randn(bsz, h, n, d, generator=gen)
    k, v = (2.0 * torch.randn(bsz, h_kv, n, d, generator=gen) for _ in range(2))
    pos = torch.arange(n)
    cb = CrossBatch(r, k_pack, stepping)
    grads = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ql, kl, vl = rope_half(leaves[0], pos), rope_half(leaves[1], pos), leaves[2]
        if fused:
            got = joint_attention(ql, kl, vl, cb.parts(leaves[1], vl))
            torch.testing.assert_close(
                got, spec_cross_batch_layer(q, k, v, r=r, k_pack=k_pack, stepping=stepping), atol=1e-5, rtol=1e-5
            )
        else:
            mem_k, mem_v, mem_valid = cb.memory(leaves[1], vl)
            visible = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            got, _ = attend(ql, kl, vl, visible=visible, mem_k=mem_k, mem_v=mem_v, mem_valid=mem_valid)
        weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
        grads.append(torch.autograd.grad((got * weights).sum(), leaves))
    for fused, exact in zip(*grads):
        torch.testing.assert_close(fused, exact, atol=1e-4, rtol=1e-4)


# -- the model: F18 no-leak, R = 0, gradients ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "fast"])
def model(request) -> LongLlamaForCausalLM:
    """The tiny model on the exact path and on the fused one (cross-batch memory by joint_attention)."""
    torch.manual_seed(0)
    net = LongLlamaForCausalLM(
        preset("tiny", max_position_embeddings=L, last_context_length=L, attn_impl=request.param)
    ).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in net.parameters():  # std 0.15: sharp attention, so a leaked key shows in the logits
            param.copy_(0.15 * torch.randn(param.shape, generator=gen))
    return net


def batch_ids(bsz: int, seed: int, *, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (bsz, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cross_logits(model, ids, cb) -> torch.Tensor:
    return model(ids, cross_batch=cb).logits


@torch.no_grad()
def plain_logits(model, ids) -> torch.Tensor:
    """The inference path on a fresh input: memory layers attend to their causal window (and any earlier windows)."""
    return model(ids, use_cache=False, last_context_length=L).logits


def dependencies(sizes: list[int], memory_layers: int) -> list[set[int]]:
    """Entries each entry's output depends on: every memory layer adds the direct sources' own dependencies, so
    reach is transitive over up to `memory_layers` hops, each of 0 < i-j < pack_size(i)."""
    deps = [{i} for i in range(len(sizes))]
    for _ in range(memory_layers):
        deps = [deps[i].union(*(deps[i - c] for c in range(1, sizes[i]))) for i in range(len(sizes))]
    return deps


def test_dependencies_helper():
    assert dependencies([1, 2, 3, 4, 4], 1) == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {1, 2, 3, 4}]
    assert dependencies([1, 2, 3, 4, 4], 2)[4] == {0, 1, 2, 3, 4}
    assert dependencies([1, 2, 1, 2], 2) == [{0}, {0, 1}, {2}, {2, 3}]


@pytest.mark.parametrize(
    "cb", [CrossBatch(6, 4), CrossBatch(2, 2), CrossBatch(3, 1, stepping=False)], ids=["k4R6", "k2R2", "k1R3"]
)
def test_f18_entry_depends_exactly_on_its_reach(model, cb):
    """Perturbing entry j changes entry i iff j is within i's reach (never i < j, never across a pack start);
    every other entry stays bitwise unchanged."""
    bsz = 8
    ids = batch_ids(bsz, 0)
    base = cross_logits(model, ids, cb)
    sizes = cb.pack_sizes(bsz)
    deps = dependencies(sizes, len(model.config.mem_layers))
    # Invariant 18 (docs/invariants.md) follows: no entry depends on a later one, and pack_size 1 means depending on no
    # other.
    assert all(max(deps[i]) == i and (sizes[i] > 1 or deps[i] == {i}) for i in range(bsz))
    for j in range(bsz):
        other = ids.clone()
        other[j] = batch_ids(1, 100 + j)[0]
        logits = cross_logits(model, other, cb)
        for i in range(bsz):
            if j in deps[i]:
                assert (logits[i] - base[i]).abs().max() > 1e-3, f"entry {i} ignores entry {j} in its reach"
            else:  # the same batch shapes, entry i's rows unchanged: only a leak could change a bit
                assert torch.equal(logits[i], base[i]), f"entry {j} leaks into entry {i} (reach {deps[i]})"


def test_f18_pack_size_one_entries_equal_plain_model(model):
    ids = batch_ids(8, 1)
    plain = plain_logits(model, ids)
    cb = CrossBatch(6, 4)
    logits = cross_logits(model, ids, cb)
    for b, size in enumerate(cb.pack_sizes(8)):
        if size == 1:
            torch.testing.assert_close(logits[b], plain[b], atol=1e-6, rtol=0)
        else:
            assert (logits[b] - plain[b]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "cb", [CrossBatch(0, 4), make_cross_batch(cross_batch_range=0, data_pipeline="doc_aware_k1", stepping=False)]
)
def test_range_zero_equals_plain_model(model, cb):
    ids = batch_ids(8, 2)
    plain = plain_logits(model, ids)
    torch.testing.assert_close(cross_logits(model, ids, cb), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cb", [CrossBatch(6, 4), CrossBatch(3, 1, stepping=False)], ids=["k4R6", "k1R3"])
def test_first_pack_equals_inference_memory_of_the_stream(model, cb):
    """Entry b < k sees all of entries 0..b-1, each of which saw its own predecessors: exactly what inference with
    memory computes for the stream entry 0 | ... | entry b read in windows of L (memory keys un-rotated, RoPE
    0..L-1 in the local window). An independent check of the model hook, through the inference memory path."""
    ids = batch_ids(8, 6)
    logits = cross_logits(model, ids, cb)
    for b in range(4):
        assert cb.pack_sizes(8)[b] == b + 1
        stream = ids[: b + 1].reshape(1, -1)  # (1, (b+1)*L)
        expected = plain_logits(model, stream)[0, -L:]
        # Memory columns come in another order (b-1, b-2, ... vs 0, 1, ...): equal up to fp32 summation order.
        torch.testing.assert_close(logits[b], expected, atol=1e-5, rtol=0)
    assert (logits[1] - plain_logits(model, ids[1:2])[0]).abs().max() > 1e-3  # the memory matters


def embedding_grad_of_entry_loss(model, ids, cb, entry: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    labels = torch.full_like(ids, -100)
    labels[entry] = ids[entry]
    model(ids, labels=labels, cross_batch=cb).loss.backward()
    return model.get_input_embeddings().weight.grad


def test_gradient_flows_into_earlier_entries_only_within_reach(model):
    # Entry 4 (in-pack index 0) reaches nothing; entry 5 reaches 4 (pack size 4 under k=4, R=6). Give entries 4 and
    # 6 tokens of their own so the embedding rows tell which entries the loss of entry 5 depends on.
    ids = batch_ids(8, 3, high=200)
    ids[4] = batch_ids(1, 4, low=200, high=260)[0]
    ids[6] = batch_ids(1, 5, low=260, high=VOCAB)[0]
    only_4 = ids[4].unique()
    only_6 = ids[6].unique()
    grad = embedding_grad_of_entry_loss(model, ids, CrossBatch(6, 4), entry=5)
    assert grad[only_4].abs().sum(dim=-1).min() > 0, "no gradient through entry 4's keys/values"
    assert torch.count_nonzero(grad[only_6]) == 0, "a later entry reached the loss of entry 5"
    grad = embedding_grad_of_entry_loss(model, ids, CrossBatch(0, 4), entry=5)
    assert torch.count_nonzero(grad[only_4]) == 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("overrides", [{}, {"mem_positionals": False}, {"num_key_value_heads": 2}])
def test_fused_cross_batch_training_step_equals_exact_path(overrides):
    # Loss and every parameter's gradient of one FoT step: "fast" (joint_attention) against "eager" (masked).
    cb = CrossBatch(3, 4)
    ids = batch_ids(8, 11)
    grads, losses = [], []
    for impl in ("eager", "fast"):
        torch.manual_seed(0)
        net = LongLlamaForCausalLM(
            preset("tiny", max_position_embeddings=L, last_context_length=L, attn_impl=impl, **overrides)
        )
        loss = net(ids, labels=ids, cross_batch=cb).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for fused, exact in zip(*grads):
        torch.testing.assert_close(fused, exact, atol=1e-6, rtol=1e-4)
