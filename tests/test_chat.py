"""`longllama chat` and `longllama memory`, scripted through standard input with the shipped model: a pass key hidden
in a 16k-token document is answered from a file, from a built memory and from a memory kept with /save."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import assert_one_line_errors

from longllama.cli import SHIPPED_MODEL, main
from longllama.evals import passkey
from longllama.tokenizer import load_tokenizer

QUESTION = passkey.QUESTION_LINE  # "What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 16k-token pass-key document (the evaluation's prompt without its question line) and its key."""
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    prompt, key = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 16384, seed=0), 7)
    assert prompt.endswith("\n" + QUESTION)
    path = tmp_path_factory.mktemp("chat") / "haystack.txt"
    path.write_text(prompt[: -len(QUESTION)], encoding="utf-8")
    return path, key


def _run(monkeypatch, capsys, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))  # not a terminal: one question per line
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _answers(out: str) -> list[str]:
    return out.splitlines()


def test_chat_answers_a_pass_key_from_a_file_memory_and_saved_memory(
    document, tmp_path, monkeypatch, capsys, bf16_cpu_attention
):
    path, key = document
    options = ["--template", "none", "--max-new-tokens", "6"]
    code, out, err = _run(monkeypatch, capsys, ["chat", "--file", str(path), *options], f"{QUESTION}\n{QUESTION}\n")
    assert code == 0, err
    answers = _answers(out)
    assert len(answers) == 2 and all(answer.strip().startswith(str(key)) for answer in answers), (key, out)
    assert "tok/s" in err

    built = tmp_path / "haystack.mem"
    code, out, err = _run(
        monkeypatch, capsys, ["memory", "build", str(path), "--out", str(built), "--template", "none"]
    )
    assert code == 0, err
    assert out.strip().endswith(f"tokens -> {built}") and (built / "manifest.json").is_file()

    code, out, err = _run(monkeypatch, capsys, ["memory", "info", str(built)])
    assert code == 0 and "template: none" in out and "source haystack.txt" in out

    saved = tmp_path / "kept.mem"
    script = f"{QUESTION}\n/save {saved}\n/reset\n{QUESTION}\n/exit\n{QUESTION}\n"
    code, out, err = _run(monkeypatch, capsys, ["chat", "--memory", str(built), "--max-new-tokens", "6"], script)
    assert code == 0, err
    assert _answers(out) == answers  # the same answers as reading the file; /exit ends before the last line
    assert "saved" in err and (saved / "manifest.json").is_file()

    code, out, err = _run(monkeypatch, capsys, ["chat", "--memory", str(saved), "--max-new-tokens", "6"], QUESTION)
    assert code == 0, err
    assert _answers(out) == answers[:1]
    # The lower memory layer computed again from the saved tokens, the upper one read: the same answer.
    recompute = ["--memory-recompute-layers", "1", "--max-new-tokens", "6"]
    code, out, err = _run(monkeypatch, capsys, ["chat", "--memory", str(saved), *recompute], QUESTION)
    assert code == 0, err
    assert _answers(out) == answers[:1]


def test_chat_refuses_bad_input_in_one_line(document, tmp_path, monkeypatch, capsys):
    path, _ = document

    def run(*args: str) -> tuple[int, str, str]:
        return _run(monkeypatch, capsys, list(args))

    assert_one_line_errors(
        run,
        {
            "both sources": (["chat", "--file", str(path), "--memory", str(tmp_path)], "--file and --memory"),
            "no source": (["chat"], "--file F"),
            "no memory": (["chat", "--memory", str(tmp_path / "nothing")], "does not exist"),
            "negative recompute": (["chat", "--memory-recompute-layers", "-1"], "-1"),
            "not a memory": (["memory", "info", str(tmp_path)], "manifest.json"),
            "unknown template": (
                ["chat", "--model", str(SHIPPED_MODEL), "--file", str(path), "--template", "x"],
                "not one of",
            ),
            "missing file": (["memory", "build", str(tmp_path / "x.txt"), "--out", str(tmp_path / "m")], "x.txt"),
        },
    )


def test_chat_keeps_going_after_a_bad_command(document, tmp_path, monkeypatch, capsys, bf16_cpu_attention):
    path, key = document
    built = tmp_path / "m"
    assert _run(monkeypatch, capsys, ["memory", "build", str(path), "--out", str(built), "--template", "none"])[0] == 0
    script = f"/frobnicate\n/save\n{QUESTION}\n"
    code, out, err = _run(monkeypatch, capsys, ["chat", "--memory", str(built), "--max-new-tokens", "6"], script)
    assert code == 0
    assert "unknown command /frobnicate" in err and "/save needs a path" in err
    assert _answers(out)[0].strip().startswith(str(key))
