"""The sampling kernel (sampling.py) in Triton's interpreter: which tokens it keeps, against transformers' warpers,
the distribution it draws from, seeding, and when generate() uses it."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_tiny
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from longllama.fast import sampling

pytest.importorskip("triton")


pytestmark = pytest.mark.usefixtures("interpreter")  # every test runs the kernel in Triton's interpreter


def _warped(logits, temperature, top_k, top_p):
    scores = logits.float()
    for warper in (
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k=top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p=top_p)] if top_p < 1 else [])
    ):
        scores = warper(None, scores)
    return scores


@pytest.mark.parametrize("vocab", [300, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, None, 1.0),
        (0.8, None, 0.9),
        (1.5, 50, 0.9),
        (0.7, 20, 1.0),
        (1.0, 1, 1.0),
        (1.0, None, 0.0),
        (1.0, 400, 0.5),
    ],
)
def test_keeps_the_tokens_the_warpers_keep(vocab, dtype, temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = (torch.randn(5, vocab) * 3).to(dtype)
    if dtype == torch.bfloat16:  # distinct values (exact in bf16): with ties the warpers' set depends on sort order
        logits = torch.stack([torch.randperm(vocab) - vocab // 2 for _ in range(5)]).float().div(32).to(dtype)
        assert all(row.unique().numel() == vocab for row in logits)
    tokens, floors = sampling.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, floors=True)
    kept = logits.float() / temperature >= floors[:, None]
    want = torch.isfinite(_warped(logits, temperature, top_k, top_p))
    assert torch.equal(kept, want)
    assert kept.gather(1, tokens[:, None]).all()


def test_draws_from_the_kept_tokens_softmax():
    torch.manual_seed(0)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    rows = 400
    tokens = sampling.sample(base.expand(rows, -1), temperature=0.5, top_k=6, top_p=0.95)
    want = torch.softmax(_warped(base[None], 0.5, 6, 0.95), -1)[0]
    freq = torch.bincount(tokens, minlength=8).float() / rows
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() < 0.08, (freq, want)  # 4 sigma at 400 draws; uniform would miss by > 0.3


def test_seeded_by_torch():
    logits = torch.randn(3, 100)
    torch.manual_seed(5)
    a = sampling.sample(logits, temperature=1.3, top_p=0.95)
    torch.manual_seed(5)
    assert torch.equal(sampling.sample(logits, temperature=1.3, top_p=0.95), a)


def test_generate_samples_with_the_kernel_only_for_the_plain_warpers(monkeypatch):
    calls = []
    original = sampling.sample

    def spy(logits, **kwargs):
        calls.append(kwargs)
        return original(logits, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    model = sharp_tiny()
    ids = torch.randint(3, 300, (1, 20))
    assert sampling.applies(torch.zeros(1, 300), cpu=True) and not sampling.applies(torch.zeros(1, 300))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.7)
        assert calls == []  # CPU logits go to the kernel only where the plan says interpret_kernels
        model.set_plan(interpret_kernels=True)
        torch.manual_seed(0)
        first = model.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=30, top_p=0.9)
        assert calls == [dict(temperature=0.7, top_k=30, top_p=0.9)] * 4
        torch.manual_seed(0)
        assert torch.equal(
            model.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=30, top_p=0.9), first
        )
        calls.clear()
        model.generate(ids, max_new_tokens=3, do_sample=True, repetition_penalty=1.2)
        model.generate(
            ids, max_new_tokens=3, do_sample=True, top_p=0.9, output_scores=True, return_dict_in_generate=True
        )
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert calls == []


def _rows_settings(settings, vocab):
    """sample_rows' per-row tensors from (temperature, top_k, top_p) triples."""
    return (
        torch.tensor([t for t, _, _ in settings], dtype=torch.float32),
        torch.tensor([min(k or vocab, vocab) for _, k, _ in settings], dtype=torch.int32),
        torch.tensor([p for _, _, p in settings], dtype=torch.float32),
    )


def test_rows_draw_with_their_own_settings_from_their_kept_tokens_softmax():
    """Two groups of rows over the same logits with different settings: each group's frequencies are its own warped
    softmax; rows not drawn keep what `out` held."""
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    rows = 400
    settings = [(0.5, 6, 0.95), (1.5, None, 1.0)] * (rows // 2)
    logits = base.expand(rows + 1, -1).contiguous()
    out = torch.full((rows + 1,), -1, dtype=torch.long)
    seeds = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(0))
    sampling.sample_rows(logits, torch.arange(1, rows + 1), *_rows_settings(settings, 8), seeds, out)
    assert out[0] == -1
    for group, (temperature, top_k, top_p) in enumerate(settings[:2]):
        want = torch.softmax(_warped(base[None], temperature, top_k, top_p), -1)[0]
        freq = torch.bincount(out[1 + group :: 2], minlength=8).float() / (rows // 2)
        assert (freq[want == 0] == 0).all()
        assert (freq - want).abs().max() < 0.12, (group, freq, want)  # ~4 sigma at 200 draws


def test_a_rows_draw_depends_on_its_key_not_on_the_other_rows():
    torch.manual_seed(1)
    logits = torch.randn(5, 300) * 2
    settings = [(0.8, 40, 0.9), (1.0, None, 1.0), (1.3, None, 0.8)]
    seeds = torch.tensor([11, 22, 33])
    together = torch.zeros(5, dtype=torch.long)
    sampling.sample_rows(logits, torch.tensor([4, 0, 2]), *_rows_settings(settings, 300), seeds, together)
    for j, row in enumerate([4, 0, 2]):
        alone = torch.zeros(1, dtype=torch.long)
        one = _rows_settings(settings[j : j + 1], 300)
        sampling.sample_rows(logits[row : row + 1], torch.tensor([0]), *one, seeds[j : j + 1], alone)
        assert alone[0] == together[row]
    other = torch.zeros(5, dtype=torch.long)  # other keys draw other tokens (30 draws: all equal by chance ~never)
    draws = []
    for seed in range(30):
        sampling.sample_rows(
            logits, torch.tensor([1]), *_rows_settings(settings[1:2], 300), torch.tensor([seed]), other
        )
        draws.append(int(other[1]))
    assert len(set(draws)) > 5


def test_rows_keep_the_tokens_the_warpers_keep_at_the_extremes():
    """top_k 1 and top_p 0 keep only the largest logit (the warpers keep one token), whatever the key."""
    torch.manual_seed(2)
    logits = torch.randn(4, 257) * 3
    out = torch.zeros(4, dtype=torch.long)
    settings = [(1.0, 1, 1.0), (0.7, None, 0.0), (2.0, 1, 0.5), (1.0, 300, 0.0)]
    for seed in range(5):
        sampling.sample_rows(logits, torch.arange(4), *_rows_settings(settings, 257), torch.full((4,), seed), out)
        assert torch.equal(out, logits.argmax(-1))
