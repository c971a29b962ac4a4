"""Bad input gets a one-line error that names the problem and the fix (model, config and loading level)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from longllama import LongLlamaForCausalLM
from longllama.config import ConfigError, LongLlamaConfig, preset
from longllama.errors import CheckpointError, InputError, LongLlamaError


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LongLlamaForCausalLM(preset("tiny")).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(mem_layers=[4]), "mem_layers"),
        (dict(mem_layers=[-1]), "mem_layers"),
        (dict(mem_layers=[1, 1]), "repeats"),
        (dict(mem_attention_grouping=(0, 16)), "mem_attention_grouping"),
        (dict(mem_attention_grouping=(4, -1)), "mem_attention_grouping"),
        (dict(mem_attention_grouping=(4,)), "mem_attention_grouping"),
        (dict(mem_dtype="int4"), "mem_dtype"),
        (dict(mem_dtype="bf16x"), "mem_dtype"),
        (dict(last_context_length=0), "last_context_length"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_config_values_out_of_range(overrides, words):
    with pytest.raises(ConfigError) as info:
        preset("tiny", **overrides)
    assert words in _one_line(info.value)
    assert isinstance(info.value, LongLlamaError)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(mem_layers=[9]), "mem_layers"),
        (dict(mem_attention_grouping=(0, 2048)), "mem_attention_grouping"),
        (dict(mem_dtype="float64"), "mem_dtype"),
    ],
)
def test_load_time_overrides_are_validated(folder, overrides, words):
    with pytest.raises(ConfigError) as info:
        LongLlamaForCausalLM.from_pretrained(folder, **overrides)
    assert words in _one_line(info.value)


def test_config_json_out_of_range(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["mem_layers"] = [0, 17]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(LongLlamaError) as info:
        LongLlamaForCausalLM.from_pretrained(bad)
    assert "mem_layers" in _one_line(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as info:
        LongLlamaForCausalLM.from_pretrained(tmp_path / "nope")
    assert "does not exist" in _one_line(info.value)


def test_truncated_weights(folder, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(folder, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        LongLlamaForCausalLM.from_pretrained(bad)
    assert "model.safetensors" in _one_line(info.value)


@pytest.mark.parametrize(
    "ids, words",
    [
        (torch.tensor([[5, 320, 7]]), "outside the vocabulary"),
        (torch.tensor([[5, -1, 7]]), "outside the vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
    ],
)
def test_bad_token_ids(model, ids, words):
    with pytest.raises(InputError) as info:
        model(ids)
    assert words in _one_line(info.value)


def test_generate_rejects_bad_input(model):
    ids = torch.tensor([[1, 5, 7]])
    cases = [
        (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
        (dict(num_beams=4, num_beam_groups=2), "num_beam_groups"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(typical_q=0.5), "unsupported"),
    ]
    for kwargs, words in cases:
        with pytest.raises(InputError) as info:
            model.generate(ids, **kwargs)
        assert words in _one_line(info.value)
    with pytest.raises(InputError) as info:
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    assert "non-empty" in _one_line(info.value)
    with pytest.raises(InputError):
        model.generate(torch.tensor([[1, 400]]), max_new_tokens=2)


def test_bad_mask_and_past(model):
    ids = torch.tensor([[1, 5, 7, 9]])
    with pytest.raises(InputError) as info:
        model(ids, attention_mask=torch.ones(1, 3))
    assert "attention_mask" in _one_line(info.value)
    past = model(ids, use_cache=True).past_key_values
    with pytest.raises(InputError) as info:
        model(ids, past_key_values=past, use_cache=False)
    assert "use_cache" in _one_line(info.value)
    legacy = list(past.to_legacy())
    legacy[0] = legacy[0][:5]
    with pytest.raises(InputError) as info:
        model(ids, past_key_values=tuple(legacy))
    assert "6" in _one_line(info.value)
    with pytest.raises(InputError) as info:
        model(ids, last_context_length=0)
    assert "last_context_length" in _one_line(info.value)
    with pytest.raises(InputError) as info:
        model(ids, labels=torch.tensor([[1, 2]]))
    assert "labels" in _one_line(info.value)
    with pytest.raises(InputError) as info:
        model(ids, not_an_argument=1)
    assert "not_an_argument" in _one_line(info.value)


def test_memory_for_non_memory_layer_is_rejected(model):
    ids = torch.randint(3, 300, (1, 100))
    legacy = list(model(ids, use_cache=True).past_key_values.to_legacy())
    legacy[0] = legacy[0][:3] + legacy[1][3:]  # layer 0 is not a memory layer
    with pytest.raises(InputError) as info:
        model(ids[:, :2], past_key_values=tuple(legacy))
    assert "not a memory layer" in _one_line(info.value)


def test_config_accepts_original_fields():
    """Fields the released config.json files carry (auto_map, torch_dtype, transformers_version) are accepted."""
    config = LongLlamaConfig(
        **{
            **preset("tiny").to_dict(),
            "auto_map": {"AutoConfig": "x.Y"},
            "torch_dtype": "bfloat16",
            "transformers_version": "4.30.2",
        }
    )
    assert config.dtype == torch.bfloat16
    assert config.mem_dtype == "float32" and config.num_key_value_heads == config.num_attention_heads


class _Payload:
    """Pickles into a call that would leave a marker file if it ever ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_bin_weights_is_not_executed(folder, tmp_path):
    """.bin weights are read with weights_only: a pickle carrying code is refused, and the code never runs."""
    from safetensors.torch import load_file

    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    state = load_file(folder / "model.safetensors")
    marker = tmp_path / "executed"
    torch.save({**state, "payload": _Payload(marker)}, bad / "pytorch_model.bin")
    with pytest.raises(LongLlamaError) as info:
        LongLlamaForCausalLM.from_pretrained(bad)
    _one_line(info.value)
    assert not marker.exists()
