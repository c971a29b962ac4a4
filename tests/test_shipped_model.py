"""The small LongLLaMA shipped in the package (configs/small-fot.yaml, trained on an H100 with `longllama train`):
it loads, is the default --model of the commands, and retrieves pass keys from its memory on the CPU."""

from __future__ import annotations

import json

import torch

from longllama import LongLlamaForCausalLM, cli
from longllama.cli import SHIPPED_MODEL, main
from longllama.tokenizer import load_tokenizer


def test_shipped_folder_is_small_and_loads():
    size = sum(f.stat().st_size for f in SHIPPED_MODEL.iterdir())
    assert size <= 40 * 2**20
    model = LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL)
    params = sum(p.numel() for p in model.parameters())
    assert params <= 15_000_000 and model.config.context_window <= 512
    assert model.config.mem_layers == [4, 6] and model.dtype == torch.bfloat16
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (1, 2, model.config.vocab_size)


def test_commands_default_to_the_shipped_model(capsys):
    assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "shipped small model" in err and out.strip()


def test_shipped_model_retrieves_pass_keys_from_memory(tmp_path, capsys, bf16_cpu_attention):
    # 4k tokens = 8 windows of 512: the key is read back from the memory layers (the local context holds 256).
    out = tmp_path / "r.json"
    assert main(["passkey", "--lengths", "4k", "--trials", "3", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["overall"]["accuracy"] == 1.0, capsys.readouterr().out
    # Without memory layers the same prompts fail: the key is never in the local context.
    assert (
        main(
            [
                "passkey",
                "--lengths",
                "4k",
                "--trials",
                "3",
                "--device",
                "cpu",
                "--mem-layers",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["summary"]["overall"]["accuracy"] == 0.0


def test_without_a_shipped_model_the_commands_ask_for_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "SHIPPED_MODEL", tmp_path / "missing")
    for argv in (["generate", "--prompt", "x"], ["passkey", "--lengths", "300"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "pass --model DIR" in err and "\n" not in err
