"""LongLlamaForSequenceClassification (docs/inference.md#other-entry-points): the same long-input handling, a `score`
head read at the last
non-pad token; equals transformers' LLaMA classifier when the input fits in the final window."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from longllama import LongLlamaForSequenceClassification
from longllama.config import preset
from longllama.errors import InputError


def _pair(num_labels=3):
    torch.manual_seed(0)
    ours = LongLlamaForSequenceClassification(preset("tiny", num_labels=num_labels, pad_token_id=0)).eval()
    c = ours.config
    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_labels=num_labels,
            pad_token_id=0,
            max_position_embeddings=c.context_window,
        )
    ).eval()
    llama.config._attn_implementation = "eager"
    llama.load_state_dict(ours.state_dict())
    return ours, llama


def test_short_right_padded_batch_equals_llama():
    ours, llama = _pair()
    ids = torch.randint(3, 320, (2, 20))
    ids[1, 14:] = 0  # right padding
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = llama(ids, attention_mask=mask, labels=labels)
    assert (a.logits - b.logits).abs().max() < 1e-5
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_long_input_reads_windows_and_memory():
    ours, _ = _pair(num_labels=1)
    ids = torch.randint(3, 320, (1, 300))
    with torch.no_grad():
        out = ours(ids, labels=torch.tensor([0.5]), use_cache=True)
    assert out.logits.shape == (1, 1) and out.past_key_values.memory_length == 300 - 24
    assert out.loss.item() >= 0


def test_auto_class_and_batch_without_pad_id(tmp_path):
    ours, _ = _pair()
    ours.save_pretrained(tmp_path / "clf")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert type(loaded).__name__ == "LongLlamaForSequenceClassification"
    loaded.config.pad_token_id = None
    with pytest.raises(InputError):
        loaded(torch.randint(3, 320, (2, 10)))
