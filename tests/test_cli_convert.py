"""`longllama convert`: the three conversions through the command line, and its one-line errors."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longllama import LongLlamaForCausalLM
from longllama.cli import main


def _llama_folder(path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=False)
    return path


def test_convert_round_trip(tmp_path, capsys):
    llama = _llama_folder(tmp_path / "llama")
    assert main(["convert", str(llama), str(tmp_path / "st"), "--to", "safetensors"]) == 0
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert (
        main(
            [
                "convert",
                str(tmp_path / "st"),
                str(tmp_path / "long"),
                "--to",
                "longllama",
                "--mem-layers",
                "1,2",
                "--last-context-length",
                "16",
                "--mem-dtype",
                "float32",
            ]
        )
        == 0
    )
    model = LongLlamaForCausalLM.from_pretrained(tmp_path / "long")
    assert model.config.mem_layers == [1, 2] and model.config.last_context_length == 16
    assert model.config.num_key_value_heads == 2
    assert main(["convert", str(tmp_path / "long"), str(tmp_path / "back"), "--to", "llama"]) == 0
    a = LlamaForCausalLM.from_pretrained(llama)
    b = LlamaForCausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # the same weights after the round trip, the same code
        # A short input (<= last_context_length) through LongLLaMA equals LLaMA.
        assert (model(ids, use_cache=False).logits - a(ids).logits).abs().max() < 1e-5
    assert "wrote" in capsys.readouterr().out


def test_convert_casts_weights_to_a_smaller_dtype(tmp_path):
    llama = _llama_folder(tmp_path / "llama")
    assert main(["convert", str(llama), str(tmp_path / "long"), "--to", "longllama", "--mem-layers", "1"]) == 0
    assert (
        main(["convert", str(tmp_path / "long"), str(tmp_path / "bf16"), "--to", "safetensors", "--dtype", "bfloat16"])
        == 0
    )
    full = LongLlamaForCausalLM.from_pretrained(tmp_path / "long")
    half = LongLlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert half.dtype == torch.bfloat16 and half.config.mem_layers == [1]
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "long" / "model.safetensors"
    ).stat().st_size
    for name, tensor in full.state_dict().items():
        assert torch.equal(half.state_dict()[name], tensor.to(torch.bfloat16)), name  # the CLI's cast is this cast


def test_convert_errors(tmp_path, capsys):
    llama = _llama_folder(tmp_path / "llama")
    cases = [
        ["convert", str(llama), str(tmp_path / "x"), "--to", "longllama"],  # no --mem-layers
        ["convert", str(llama), str(tmp_path / "y"), "--to", "longllama", "--mem-layers", "7"],  # out of range
        ["convert", str(tmp_path / "missing"), str(tmp_path / "z"), "--to", "safetensors"],
        ["convert", str(llama), str(tmp_path / "w"), "--to", "llama", "--dtype", "bfloat16"],  # cast needs safetensors
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("longllama: error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()
