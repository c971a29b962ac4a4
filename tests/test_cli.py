"""Tests of the `longllama` command line, on a tiny random checkpoint and a SentencePiece tokenizer trained here.

The CLI's text must be exactly what `LongLlamaForCausalLM.generate` produces, decoded; user errors must end the
command with one `longllama: error: ...` line and status 2.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import assert_one_line_errors

from longllama import LongLlamaForCausalLM
from longllama.cli import TextStreamer, main
from longllama.config import preset
from longllama.lm import LongLlamaLM
from longllama.tokenizer import encode_prompt, load_tokenizer

VOCAB = 300
PROMPT = "the quick brown fox"
WORDS = (
    "the quick brown fox jumps over a lazy dog memory layer attention context long llama token window "
    "café naïve 東京 2023 42 , . !"
).split()


def _corpus(seed: int = 0, lines: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def _train_tokenizer(folder: Path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        character_coverage=0.99,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )


def _tiny_model(folder: Path) -> None:
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", vocab_size=VOCAB))
    # A random model picks byte pieces as often as words; their random runs decode to U+FFFD. Zeroing the output
    # rows of control, unknown and byte pieces makes it write words, so the text comparisons below read clearly.
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    muted = [i for i in range(VOCAB) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    with torch.no_grad():
        model.lm_head.weight[muted] = 0
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    folder.mkdir()
    _train_tokenizer(folder)
    _tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def loaded(checkpoint: Path):
    return LongLlamaForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint)


def _expected(loaded, prompt: str, *, seed: int | None = None, **settings) -> str:
    """The continuation text of `model.generate`: the decoded whole sequence minus the decoded prompt."""
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, prompt)
    if seed is not None:
        torch.manual_seed(seed)
    sequence = model.generate(torch.tensor([ids]), **settings)[0].tolist()
    prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
    full = tokenizer.decode(sequence, skip_special_tokens=True)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    # CPU unless a test names a device (the last --device wins): the expected text is computed on the CPU.
    code = main(["generate", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_greedy_equals_model_generate(checkpoint: Path, loaded, capsys) -> None:
    code, out, err = _run(capsys, "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12")
    expected = _expected(loaded, PROMPT, max_new_tokens=12, do_sample=False)
    assert code == 0
    assert expected.strip() and out == expected + "\n"
    assert "\ufffd" not in out
    assert "reading prompt" in err and "Traceback" not in err


def test_prompt_file_reads_the_same_prompt(checkpoint: Path, loaded, capsys, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("a lazy dog\nmemory layer", encoding="utf-8")
    code, out, _ = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--prompt-file",
        str(prompt_file),
        "--max-new-tokens",
        "8",
        "--dtype",
        "float32",
    )
    assert code == 0
    assert out == _expected(loaded, "a lazy dog\nmemory layer", max_new_tokens=8, do_sample=False) + "\n"


@pytest.mark.parametrize("extra", [[], ["--mem-attention-grouping", "2,32", "--last-context-length", "40"]])
def test_long_prompt_reads_in_windows_with_progress(checkpoint: Path, loaded, capsys, extra: list[str]) -> None:
    model, tokenizer = loaded
    prompt = " ".join(random.Random(1).choice(WORDS) for _ in range(200))
    n = len(encode_prompt(tokenizer, prompt))
    assert n > 4 * model.config.context_window  # several memory windows, then the final one
    code, out, err = _run(capsys, "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "10", *extra)
    lcl = {"last_context_length": 40} if extra else {}
    assert code == 0
    assert out == _expected(loaded, prompt, max_new_tokens=10, do_sample=False, **lcl) + "\n"
    assert f"{n}/{n}" in err and "tok/s" in err


def test_progress_is_reported_after_each_window(checkpoint: Path, loaded, capsys, monkeypatch) -> None:
    model, tokenizer = loaded
    prompt = " ".join(random.Random(2).choice(WORDS) for _ in range(100))
    n = len(encode_prompt(tokenizer, prompt))
    calls: list[int] = []
    original = LongLlamaLM.generate

    def spy(self, *args, progress, **kwargs):
        return original(self, *args, progress=lambda done: (calls.append(done), progress(done)), **kwargs)

    monkeypatch.setattr(LongLlamaLM, "generate", spy)  # the command line runs the plain-PyTorch class
    code, _, _ = _run(capsys, "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "2")
    cw, lcl = model.config.context_window, model.config.last_context_length
    memory_part = n - lcl
    assert code == 0
    assert calls == [min(end, memory_part) for end in range(cw, memory_part + cw, cw)] + [n]


def test_plan_changes_reach_the_model_and_verbose_prints_the_plan(
    checkpoint: Path, loaded, capsys, monkeypatch
) -> None:
    plans = []
    original = LongLlamaLM.generate

    def spy(self, *args, **kwargs):
        plans.append(self.plan)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LongLlamaLM, "generate", spy)  # the command line runs the plain-PyTorch class
    code, out, err = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--plan",
        "skip_dead_layers=false",
        "--plan",
        "window_group_tokens=128",
        "--verbose",
    )
    assert code == 0
    assert out == _expected(loaded, PROMPT, max_new_tokens=8, do_sample=False) + "\n"  # the same maths
    plan = plans[0]  # the command's model (the expected text's model.generate comes next)
    assert not plan.skip_dead_layers and plan.window_group_tokens == 128 and plan.device == "cpu"
    assert "ExecutionPlan(" in err and "window_group_tokens=128" in err and "skip_dead_layers=False" in err
    code, _, err = _run(capsys, "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "2")
    assert code == 0 and "ExecutionPlan(" not in err and plans[-1].skip_dead_layers  # only when asked


def test_sampling_is_seeded(checkpoint: Path, loaded, capsys) -> None:
    args = [
        "--model",
        str(checkpoint),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    code, out, _ = _run(capsys, *args)
    expected = _expected(
        loaded, PROMPT, seed=3, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.9
    )
    assert code == 0 and out == expected + "\n"
    assert _run(capsys, *args)[1] == out


def test_streamer_keeps_leading_spaces_and_holds_partial_characters(loaded) -> None:
    _, tokenizer = loaded
    text = " jumps 🦙 über café"  # 🦙 and ü are not in the training text: byte pieces, several per character
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert sum(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids) >= 4

    class Chunks(list):
        def write(self, chunk: str) -> None:
            self.append(chunk)

        def flush(self) -> None:
            pass

    out = Chunks()
    streamer = TextStreamer(tokenizer, out)
    streamer.put(torch.tensor([[1, 5, 6]]))  # the prompt: skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.put(torch.tensor([tokenizer.eos_token_id]))
    streamer.end()
    assert "".join(out) == text + "\n"
    assert out[0].startswith(" ")  # the first piece's space, which decoding it alone would drop
    assert all("\ufffd" not in chunk for chunk in out)
    assert streamer.text == text and streamer.tokens == len(ids) + 1


def _error_cases(checkpoint: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(checkpoint, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer.*"))
    ok = ["--model", str(checkpoint)]
    cases = {
        "missing model folder": (["--model", str(tmp_path / "nope"), "--prompt", PROMPT], "no such folder"),
        "missing prompt file": ([*ok, "--prompt-file", str(tmp_path / "nope.txt")], "does not exist"),
        "prompt file is a folder": ([*ok, "--prompt-file", str(tmp_path)], "cannot read prompt file"),
        "empty prompt": ([*ok, "--prompt", ""], "prompt is empty"),
        "empty prompt file": ([*ok, "--prompt-file", str(empty_file)], "is empty"),
        "no prompt": (ok, "--prompt"),
        "bad dtype": ([*ok, "--prompt", PROMPT, "--dtype", "float8"], "choose from"),
        "bad device": ([*ok, "--prompt", PROMPT, "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
        "bad grouping": ([*ok, "--prompt", PROMPT, "--mem-attention-grouping", "4"], "HEADS,QUERIES"),
        "negative temperature": ([*ok, "--prompt", PROMPT, "--temperature", "-1"], "greedy"),
        "unknown plan field": ([*ok, "--prompt", PROMPT, "--plan", "no_such_choice=1"], "--plan"),
        "plan without a value": ([*ok, "--prompt", PROMPT, "--plan", "window_group_tokens"], "KEY=VALUE"),
        "bad plan value": ([*ok, "--prompt", PROMPT, "--plan", "memory_width=12"], "multiple of 8"),
        "plan device": ([*ok, "--prompt", PROMPT, "--plan", "device=cuda"], "--plan"),
        "no tokenizer": (["--model", str(no_tokenizer), "--prompt", PROMPT], "tokenizer.model"),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = ([*ok, "--prompt", PROMPT, "--device", "cuda"], "use --device cpu")
    return cases


def test_errors_are_one_line_with_status_2(checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert_one_line_errors(lambda *args: _run(capsys, *args), _error_cases(checkpoint, tmp_path))


def test_help_returns_0(capsys) -> None:
    assert main(["generate", "--help"]) == 0
    assert "--mem-attention-grouping" in capsys.readouterr().out
    assert main([]) == 2


def test_console_script_exit_status(checkpoint: Path, tmp_path: Path) -> None:
    script = shutil.which("longllama", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "longllama.cli"]
    result = subprocess.run(
        [
            *command,
            "generate",
            "--model",
            str(checkpoint),
            "--prompt-file",
            "-",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ],
        input=PROMPT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # Only the progress bar on stderr: no transformers notices or warnings.
    assert all(line.startswith("reading prompt") for line in result.stderr.replace("\r", "\n").split("\n") if line)


def test_verbose_notes_a_python_that_writes_no_bytecode():
    """--verbose names the cost and the fix where every process compiles the libraries' sources (python -B sets the
    same flag as PYTHONDONTWRITEBYTECODE); a Python that writes bytecode gets no note."""
    code = "from longllama.cli import bytecode_note; print(bytecode_note())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    without = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "writes no bytecode" in without.stdout and "compileall" in without.stdout
    assert "\n" not in without.stdout.strip()
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert plain.stdout.strip() == "None"
