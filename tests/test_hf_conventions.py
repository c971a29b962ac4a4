"""transformers conventions the model keeps: right-padded prompts in generate, the cache under both of its names."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ForcedTokens, sharp_tiny

from longllama.errors import InputError
from longllama.generate import generate as plain_generate

# Left-aligned rows against the same rows alone: the same maths with masked columns in the sums (fp32).
TOL = 1e-5


def _right_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


@torch.no_grad()
def test_right_padded_batch_continues_each_row():
    model = sharp_tiny()
    torch.manual_seed(3)
    rows = [torch.randint(3, 320, (n,)) for n in (20, 13, 7)]  # within last_context_length: one window per row
    new = 10
    alone = [
        model.generate(r[None], max_new_tokens=new, output_logits=True, return_dict_in_generate=True) for r in rows
    ]
    ids, mask = _right_padded(rows)
    forced = torch.cat([ids, torch.cat([a.sequences[:, -new:] for a in alone])], dim=1)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        logits_processor=[ForcedTokens(forced)],
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)  # the prompts come back as given
    batch = torch.stack(out.logits, dim=1)  # (rows, steps, vocab)
    for i, a in enumerate(alone):
        single = torch.stack(a.logits, dim=1)[0]
        assert (batch[i] - single).abs().max() <= TOL, i

    # What the left alignment fixes: read as given, the shorter rows continue from a pad.
    raw = plain_generate(
        model, ids, attention_mask=mask, max_new_tokens=1, output_logits=True, return_dict_in_generate=True
    )
    first = torch.stack([a.logits[0][0] for a in alone])
    assert (raw.logits[0][1:] - first[1:]).abs().max() > 1e-2
    assert (raw.logits[0][0] - first[0]).abs().max() <= TOL  # the full row is unaffected


def test_an_all_padding_row_is_refused():
    model = sharp_tiny()
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(InputError, match="all padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


@torch.no_grad()
def test_cache_is_readable_by_its_old_name_without_a_warning(caplog):
    from transformers.utils import logging as hf_logging

    model = sharp_tiny()
    out = model(torch.tensor([[1, 5, 9, 4]]))
    warned = logging.Logger.warning_once
    if hasattr(warned, "cache_clear"):
        warned.cache_clear()  # a warning given earlier in the process would otherwise be silent here
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            got = [out.past_key_values, out["past_key_values"], out.get("past_key_values")]
            assert "past_key_values" in out
            again = model(torch.tensor([[7]]), past_key_values=out.past_key_values)
            generated = model.generate(torch.tensor([[1, 5]]), max_new_tokens=2, return_dict_in_generate=True)
            got += [generated.past_key_values, generated["past_key_values"]]
    finally:
        hf_logging.disable_propagation()
    assert all(g is out.cache for g in got[:3]) and all(g is generated.cache for g in got[3:])
    assert again.past_key_values.local_length == 5
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa", "fast"])
@torch.no_grad()
def test_forward_compiles_as_one_graph(attn_impl):
    """No host read in the forward path: fullgraph tracing of a padded long input (memory in use) and of a decoding
    step; the traced calls give the eager logits (aot_eager: the same kernels after functionalisation)."""
    model = sharp_tiny(attn_impl=attn_impl)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    ids = torch.randint(3, 320, (2, 150))  # beyond the 64-token window
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :5] = 0
    want, got = model(ids, attention_mask=mask), compiled(ids, attention_mask=mask)
    assert got.past_key_values.memory_length == want.past_key_values.memory_length > 0
    torch.testing.assert_close(got.logits[mask.bool()], want.logits[mask.bool()], rtol=0, atol=1e-5)
    step = torch.cat([mask, mask[:, :1]], dim=1)
    want = model(ids[:, :1], attention_mask=step, past_key_values=want.past_key_values)
    got = compiled(ids[:, :1], attention_mask=step, past_key_values=got.past_key_values)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
