"""The tokenizer through transformers' own entry points: AutoTokenizer (with and without `import longllama`),
save_pretrained round trips, the pad token, batched pipelines and the chat template, checked against SentencePiece
itself, the fine-tuning data code and the unbatched pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, pipeline

from longllama import LongLlamaForCausalLM
from longllama import tokenizer as tokenizer_module
from longllama.checkpoint import convert_to_safetensors
from longllama.cli import SHIPPED_MODEL, main
from longllama.config import LongLlamaConfig
from longllama.errors import InputError
from longllama.tokenizer import (
    TOKENIZER_FILE,
    TRANSFORMERS_FILES,
    LongLlamaTokenizer,
    load_tokenizer,
    tokenizer_files,
)
from longllama.training.data.sft import CHAT_PROMPT, ChatExample, ChatTemplate, InstructionExample, SFTLengths

TEXTS = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n  indented\tand tabbed",
    "\n starts with a newline",
    "digits 0123456789 and 3.14159, 2024-01-01",
    "unicode: café naïve 東京 你好 こんにちは 😀🦙 ∑ ﬁ Ａ１",
    "def add(a, b):\n    return a + b\n",
    "text that spells </s> and <s> and <unk>",
    "x",
]


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(SHIPPED_MODEL / TOKENIZER_FILE))


def _reference(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    return [sp.bos_id()] + sp.encode(text)


def _plain_transformers(folder: Path, script: str) -> object:
    """Run `script` (which sets `result`) in a fresh interpreter that never imports longllama; return `result`."""
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"{script}\n"
        "assert 'longllama' not in sys.modules\n"
        "print(json.dumps(result))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shipped_files_equal_a_fresh_build() -> None:
    # scripts/tokenizer_files.py regenerates them; a stale file here means it was not run after a change.
    for name, text in tokenizer_files(SHIPPED_MODEL).items():
        assert (SHIPPED_MODEL / name).read_text(encoding="utf-8") == text, f"{name}: run scripts/tokenizer_files.py"


def test_plain_autotokenizer_equals_sentencepiece(sp) -> None:
    script = (
        f"texts = {TEXTS!r}\n"
        "result = {'class': type(tokenizer).__name__, 'ids': [tokenizer.encode(t) for t in texts],\n"
        "          'pad': tokenizer.pad_token_id, 'side': tokenizer.padding_side,\n"
        "          'max': tokenizer.model_max_length}"
    )
    result = _plain_transformers(SHIPPED_MODEL, script)
    assert result["class"] == "TokenizersBackend"  # transformers' fallback for a class it does not know
    assert result["ids"] == [_reference(sp, text) for text in TEXTS]
    config = LongLlamaConfig.from_pretrained(SHIPPED_MODEL)
    assert (result["pad"], result["side"], result["max"]) == (config.pad_token_id, "left", _context(SHIPPED_MODEL))


def test_registered_autotokenizer_equals_load_tokenizer_and_sentencepiece(sp) -> None:
    auto = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    ours = load_tokenizer(SHIPPED_MODEL)
    assert isinstance(auto, LongLlamaTokenizer)
    for text in TEXTS:
        assert auto.encode(text) == ours.encode(text) == _reference(sp, text), text
        assert auto.decode(auto.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))
    batch = auto(TEXTS[:3])["input_ids"]
    assert batch == [_reference(sp, text) for text in TEXTS[:3]]


def test_folder_with_only_tokenizer_model_loads_exactly(sp, tmp_path: Path) -> None:
    for name in (TOKENIZER_FILE, "config.json"):
        shutil.copy(SHIPPED_MODEL / name, tmp_path / name)
    auto = AutoTokenizer.from_pretrained(tmp_path)  # no tokenizer_config.json: found through model_type longllama
    assert isinstance(auto, LongLlamaTokenizer)
    assert [auto.encode(text) for text in TEXTS] == [_reference(sp, text) for text in TEXTS]
    assert auto.pad_token_id == 0 and auto.chat_template is not None


def _context(folder: Path) -> int:
    return LongLlamaConfig.from_pretrained(folder).max_position_embeddings


def test_model_max_length_is_the_configs_usable_context(tmp_path: Path) -> None:
    config = LongLlamaConfig.from_pretrained(SHIPPED_MODEL)
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    assert tokenizer.model_max_length == config.max_position_embeddings
    assert tokenizer.model_max_length > config.context_window  # the usable context, not the attention window
    # An older config (no context_window) reads its max_position_embeddings as the window and advertises more.
    old = json.loads((SHIPPED_MODEL / "config.json").read_text())
    old.pop("context_window")
    old["max_position_embeddings"] = config.context_window
    (tmp_path / "config.json").write_text(json.dumps(old))
    shutil.copy(SHIPPED_MODEL / TOKENIZER_FILE, tmp_path / TOKENIZER_FILE)
    older = LongLlamaConfig.from_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).model_max_length == older.max_position_embeddings > config.context_window


def test_pad_token_comes_from_config(sp, tmp_path: Path) -> None:
    assert sp.pad_id() < 0  # LLaMA-style: no pad piece of its own
    assert load_tokenizer(SHIPPED_MODEL).pad_token == sp.id_to_piece(0) == "<unk>"
    shutil.copy(SHIPPED_MODEL / TOKENIZER_FILE, tmp_path / TOKENIZER_FILE)
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "pad_token_id": 2}))
    assert load_tokenizer(tmp_path).pad_token_id == 2
    (tmp_path / "config.json").unlink()
    assert load_tokenizer(tmp_path).pad_token is None  # no config, no pad piece: nothing to pick


def test_save_pretrained_round_trip_and_cli_reopens(sp, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "saved"
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    tokenizer.save_pretrained(saved)
    assert (saved / TOKENIZER_FILE).read_bytes() == (SHIPPED_MODEL / TOKENIZER_FILE).read_bytes()
    assert {name for name in TRANSFORMERS_FILES} <= {path.name for path in saved.iterdir()}
    reloaded = AutoTokenizer.from_pretrained(saved)
    assert isinstance(reloaded, LongLlamaTokenizer)
    assert [reloaded.encode(text) for text in TEXTS] == [_reference(sp, text) for text in TEXTS]
    assert (reloaded.pad_token, reloaded.padding_side) == (tokenizer.pad_token, tokenizer.padding_side)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.model_max_length == tokenizer.model_max_length
    # Saved without transformers knowing the class either: the plain fallback still reads it exactly.
    assert _plain_transformers(saved, f"result = [tokenizer.encode(t) for t in {TEXTS!r}]") == [
        _reference(sp, text) for text in TEXTS
    ]
    # The CLI needs weights and config.json too: save the model beside the tokenizer, then compare with the original.
    LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL).save_pretrained(saved)
    args = ["generate", "--device", "cpu", "--prompt", "def add(a, b):", "--max-new-tokens", "6"]
    assert main([*args, "--model", str(SHIPPED_MODEL)]) == 0
    expected = capsys.readouterr().out
    assert main([*args, "--model", str(saved)]) == 0
    assert capsys.readouterr().out == expected and expected.strip()


def test_conversion_writes_fresh_tokenizer_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(SHIPPED_MODEL, source)
    # A LLaMA-era tokenizer_config.json would send AutoTokenizer to transformers' inexact LlamaTokenizer.
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    convert_to_safetensors(source, tmp_path / "out", dtype=torch.float32)
    out = tmp_path / "out"
    for name, text in tokenizer_files(out).items():
        assert (out / name).read_text(encoding="utf-8") == text
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LongLlamaTokenizer"


def test_pipeline_batches_with_left_padding() -> None:
    model = LongLlamaForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["def add(a, b):", "import numpy as np\nimport torch\n\nclass Model:\n    def forward(self, x):", "x ="]
    settings = dict(max_new_tokens=8, do_sample=False)
    alone = [generator(prompt, **settings)[0]["generated_text"] for prompt in prompts]
    batched = [rows[0]["generated_text"] for rows in generator(prompts, batch_size=2, **settings)]
    assert batched == alone
    assert all(text.startswith(prompt) and len(text) > len(prompt) for text, prompt in zip(alone, prompts))


CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4.  Anything else?"},
    {"role": "user", "content": " A haiku about 東京,\nplease </s>"},
]


def _sft_ids(tokenizer, conversation: list[dict], system: str = CHAT_PROMPT) -> list[int]:
    rows = [{"from": "gpt" if m["role"] == "assistant" else "human", "value": m["content"]} for m in conversation]
    build = ChatExample(
        tokenizer,
        template=ChatTemplate(initial_prompt=system),
        lengths=SFTLengths(max_total_length=4096, always_pad=False, random_pad=False),
    )
    return build({"conversations": rows})["input_ids"].tolist()


@pytest.mark.parametrize("loader", ["auto", "load_tokenizer"])
def test_chat_ids_equal_the_fine_tuning_codes(loader: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL) if loader == "auto" else load_tokenizer(SHIPPED_MODEL)
    ids = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=True, return_dict=False)
    assert ids == _sft_ids(tokenizer, CONVERSATION[:2])
    # A conversation ending in a user turn, continued with the generation prompt: the training ids of that
    # conversation followed by the assistant prefix, tokenized on its own.
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    prefix = tokenizer.encode("\nASSISTANT: ", add_special_tokens=False)
    assert prompt == _sft_ids(tokenizer, CONVERSATION) + prefix
    system = [{"role": "system", "content": "You answer in one word.\n\n"}, *CONVERSATION[:2]]
    assert tokenizer.apply_chat_template(system, return_dict=False) == _sft_ids(
        tokenizer, CONVERSATION[:2], system="You answer in one word.\n\n"
    )


def test_chat_text_is_the_instruct_format() -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    system = (
        "A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted as ASSISTANT:)."
        " The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
    )
    expected = (
        "<s>" + system + "\nUSER: What is 2 + 2?" + "\nASSISTANT: It is 4.  Anything else?</s>"
        "\nUSER:  A haiku about 東京,\nplease </s>" + "\nASSISTANT: "
    )
    assert text == expected
    # Without import longllama the same template renders the same text, but transformers tokenizes it joined: the
    # pieces merge across their joints ("USER: " + "What" differs from "USER:" "▁" + "▁What"), and "</s>" stays text.
    script = (
        f"chat = {CONVERSATION!r}\n"
        "result = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),\n"
        "          tokenizer.apply_chat_template(chat[:2], tokenize=True, return_dict=False)]"
    )
    plain_text, plain_ids = _plain_transformers(SHIPPED_MODEL, script)
    assert plain_text == expected
    joined = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert plain_ids == tokenizer.encode(joined, add_special_tokens=False) != _sft_ids(tokenizer, CONVERSATION[:2])


def test_chat_output_options() -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    one = tokenizer.apply_chat_template(CONVERSATION[:1])
    assert one["attention_mask"] == [1] * len(one["input_ids"])
    batch = tokenizer.apply_chat_template([CONVERSATION[:1], CONVERSATION], padding=True, return_tensors="pt")
    long = tokenizer.apply_chat_template(CONVERSATION, return_dict=False)
    assert batch["input_ids"].shape == (2, len(long))
    assert batch["input_ids"][1].tolist() == long
    # Left padding: the short row ends where the long one does.
    short = len(one["input_ids"])
    assert batch["input_ids"][0, -short:].tolist() == one["input_ids"]
    assert batch["attention_mask"][0].sum().item() == short


def test_chat_rejects_unknown_roles_and_marker_text() -> None:
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    with pytest.raises(Exception, match="role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(InputError, match="marker"):
        tokenizer.apply_chat_template([{"role": "user", "content": f"a{tokenizer_module._SEGMENT_MARK}b"}])


def test_training_export_writes_tokenizer_files(tmp_path: Path) -> None:
    from longllama.config import preset
    from longllama.training.checkpoints import export_model
    from longllama.training.parallel import Processes

    model = LongLlamaForCausalLM(preset("tiny", vocab_size=8192))
    folder = export_model(model, tmp_path / "model", procs=Processes(), tokenizer=SHIPPED_MODEL / TOKENIZER_FILE)
    for name, text in tokenizer_files(folder).items():
        assert (folder / name).read_text(encoding="utf-8") == text
    auto = AutoTokenizer.from_pretrained(folder)
    assert auto.model_max_length == _context(folder) and auto.encode("hi") == load_tokenizer(SHIPPED_MODEL).encode("hi")


INSTRUCTION_ROWS = {
    "openorca-3b": (
        {"system_prompt": "You are terse.", "question": "Name a colour.\n  ", "response": " Blue, 42 東京."},
        [("system", "system_prompt"), ("user", "question"), ("assistant", "response")],
    ),
    "code-7b-instruct-mathinstruct": (
        {"instruction": "What is 12 * 12?", "output": "144"},
        [("user", "instruction"), ("assistant", "output")],
    ),
    "code-7b-instruct-openorca": (
        {"question": "Translate 'hi' to French.", "response": "Salut </s> !"},
        [("user", "question"), ("assistant", "response")],
    ),
}


@pytest.mark.parametrize("name", INSTRUCTION_ROWS)
def test_instruction_templates_equal_the_fine_tuning_codes(name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    row, roles = INSTRUCTION_ROWS[name]
    messages = [{"role": role, "content": row[field]} for role, field in roles]
    build = InstructionExample(tokenizer, template=name, lengths=SFTLengths(always_pad=False, random_pad=False))
    expected = build(row)["input_ids"].tolist()
    assert tokenizer.apply_chat_template(messages, chat_template=name, return_dict=False) == expected
    # The prompt for an answer: the same ids up to where the answer starts.
    prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=name, add_generation_prompt=True)
    given = [1] + tokenizer.encode(build.texts(row)[0], add_special_tokens=False)
    assert prompt["input_ids"] == given == expected[: len(given)]


def test_openorca_without_system_message_keeps_its_newline() -> None:
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}], chat_template="openorca-3b", tokenize=False
    )
    assert text == "<s>\nQ\n"  # docs/finetuning.md: an empty system prompt still contributes its newline
    with pytest.raises(Exception, match="one user message"):
        tokenizer.apply_chat_template(CONVERSATION, chat_template="openorca-3b", tokenize=False)


def test_classifier_reads_each_rows_last_token_with_the_tokenizers_left_padding() -> None:
    from longllama import LongLlamaForSequenceClassification

    config = LongLlamaConfig.from_pretrained(SHIPPED_MODEL, num_labels=3)
    torch.manual_seed(0)
    model = LongLlamaForSequenceClassification(config).float().eval()
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    texts = ["short one", "a longer sentence with several more words in it"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left" and batch["attention_mask"][0, 0] == 0
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])
    # Relative RoPE: the padded row differs from the unpadded one only by rounding.
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
