"""The chat-tuning data (scripts/chat_data.py) and the shipped chat model (models/small-chat): rows are reproducible,
exactly as long as the fine-tuning examples, answers are stated in their documents, and the evidence sits in the
memory windows where the row says; `longllama chat` with no --model and no --template answers a pass-key question."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
import torch

from longllama.cli import SHIPPED_CHAT_MODEL, SHIPPED_MODEL, is_adapter_folder, main
from longllama.evals import passkey
from longllama.tokenizer import load_tokenizer
from longllama.training.data.sft import ChatExample, SFTLengths

ROOT = Path(__file__).resolve().parents[1]
TOKENS, LCL = 512, 128  # smaller than the config's 1024 / 256, for speed; the layout rules are the same


def _load_script():
    spec = importlib.util.spec_from_file_location("chat_data", ROOT / "scripts" / "chat_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chat_data"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chat_data():
    return _load_script()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def rows(chat_data, tokenizer):
    return list(
        chat_data.training_rows(tokenizer, count=16, seed=3, tokens=TOKENS, last_context_length=LCL, in_memory=0.75)
    )


def test_rows_are_determined_by_the_seed(chat_data, tokenizer, rows):
    again = list(
        chat_data.training_rows(tokenizer, count=4, seed=3, tokens=TOKENS, last_context_length=LCL, in_memory=0.75)
    )
    assert again == rows[:4]
    other = list(
        chat_data.training_rows(tokenizer, count=4, seed=4, tokens=TOKENS, last_context_length=LCL, in_memory=0.75)
    )
    assert all(a["conversations"][0] != b["conversations"][0] for a, b in zip(other, rows))


def _evidence(answer: str) -> list[str]:
    """Lines of the document that state an answer, in any of the generator's wordings."""
    if match := re.fullmatch(r"The pass key is (\S+)\.", answer):
        return [f"pass key is {match[1]}.", f"pass key: {match[1]}."]
    if match := re.fullmatch(r"The value of (\S+) is (\S+)\.", answer):
        return [f"{match[1]}: {match[2]}", f"The value of {match[1]} is {match[2]}."]
    match = re.fullmatch(r"The function is (\S+)\.", answer)
    assert match, answer
    return [f"def {match[1]}("]


def test_rows_fill_the_example_and_place_the_evidence(tokenizer, rows):
    example = ChatExample(
        tokenizer, template="sharegpt-3b-v1.1", lengths=SFTLengths(max_total_length=TOKENS, random_pad=False)
    )
    in_memory = 0
    for row in rows:
        built = example(row)
        ids = built["input_ids"].tolist()
        assert len(ids) == TOKENS and 0 not in ids  # exactly one example's length: no padding, nothing cut
        # The answers are the learned turns, word for word, and are what the model is trained to write.
        answers = [turn["markdown"] for turn in row["conversations"] if turn["from"] == "gpt"]
        assert answers == row["meta"]["answers"]
        labelled = tokenizer.decode([t for t in built["labels"].tolist() if t >= 0 and t != 2])
        assert all(answer in labelled for answer in answers)
        document = row["conversations"][0]["markdown"]
        for answer in answers:
            lines = [line for line in _evidence(answer) if line in document]
            assert lines, (answer, document[:200])
            # The first id at which the decoded example holds the stated line: found by decoding, not by the
            # generator's own arithmetic.
            low, high = 1, len(ids)
            while low < high:
                middle = (low + high) // 2
                if any(line in tokenizer.decode(ids[:middle]) for line in lines):
                    high = middle
                else:
                    low = middle + 1
            if row["meta"]["in_memory"]:
                assert low <= TOKENS - LCL, (answer, low)
            else:
                assert low > TOKENS - LCL - 4, (answer, low)
        in_memory += row["meta"]["in_memory"]
    assert in_memory >= len(rows) // 2


shipped = pytest.mark.skipif(not is_adapter_folder(SHIPPED_CHAT_MODEL), reason="no chat model shipped")


@shipped
def test_shipped_adapters_merge_into_the_same_function(tokenizer):
    """The merged model (how the CLI loads it) against peft running the adapters beside the frozen weights."""
    peft = pytest.importorskip("peft")
    from longllama import LongLlamaForCausalLM
    from longllama.cli import LoadOptions, load_model

    merged = load_model(SHIPPED_CHAT_MODEL, LoadOptions(dtype="float32", device="cpu"))
    base = LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, str(SHIPPED_CHAT_MODEL)).eval()
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\nThe pass key is 123.")])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-2  # the adapters change the model


@shipped
def test_chat_without_model_or_template_answers_a_pass_key(tokenizer, tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    prompt, key = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 4096, seed=0), 11)
    path = tmp_path / "haystack.txt"
    path.write_text(prompt[: -len(passkey.QUESTION_LINE)], encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the pass key?\n"))
    code = main(["chat", "--file", str(path), "--max-new-tokens", "12", "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "shipped chat model" in captured.err
    assert re.search(rf"(?<!\d){key}(?!\d)", captured.out), (key, captured.out)


@shipped
def test_without_peft_chat_falls_back_and_named_adapters_fail_in_one_line(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    prompt, key = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 2048, seed=0), 5)
    path = tmp_path / "haystack.txt"
    path.write_text(prompt[: -len(passkey.QUESTION_LINE)], encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO(passkey.QUESTION_LINE + "\n"))
    code = main(["chat", "--file", str(path), "--max-new-tokens", "6", "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pip install 'longllama[lora]'" in captured.err and "--template none" in captured.err
    assert captured.out.strip().startswith(str(key)), (key, captured.out)  # the base model's plain continuation

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the pass key?\n"))
    code = main(["chat", "--model", "small-chat", "--file", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "pip install 'longllama[lora]'" in err[0], err
