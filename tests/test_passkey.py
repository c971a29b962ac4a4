"""Tests of the passkey retrieval task (docs/evaluation.md#passkey-retrieval, invariant F21) and the `longllama passkey`
command.

The prompt texts are written out here rather than imported, so a typo in the module's constants fails the test.
Models are a fake whose `generate` answers from the prompt text (to check the scoring rule) and a tiny random
LongLLaMA (to run the command end to end).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_errors, train_llama_spm

from longllama import LongLlamaForCausalLM
from longllama.cli import main
from longllama.config import LongLlamaConfig, preset
from longllama.errors import InputError
from longllama.evals import passkey as task
from longllama.tokenizer import encode_prompt, load_tokenizer

SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
QUESTION = "What is the pass key? The pass key is"
FILLER = " ".join([SENTENCE] * 5000)
VOCAB = 400
SMALL = Path(task.__file__).parents[1] / "models" / "small"  # the shipped model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LongLLaMA with a SentencePiece tokenizer trained on the passkey prompt's own text."""
    folder = tmp_path_factory.mktemp("passkey") / "tiny"
    rng = np.random.default_rng(0)
    sentences = [SENTENCE, TASK, QUESTION, " ".join([SENTENCE] * 3), FILLER[:1000]]
    sentences += [f"The pass key is {k}. Remember it. {k} is the pass key." for k in rng.integers(1, 50000, 50)]
    # LLaMA's normalization (none): newlines survive as byte pieces, so the prompt's five lines reach the model.
    train_llama_spm(
        folder, sentences, vocab_size=VOCAB, normalization_rule_name="identity", remove_extra_whitespaces=False
    )
    torch.manual_seed(0)
    LongLlamaForCausalLM(preset("tiny", vocab_size=VOCAB)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    return load_tokenizer(checkpoint)


# --------------------------------------------------------------------------------------------------------------------
# The generator


def test_f21_seed_555_prompt() -> None:
    np.random.seed(1234)
    before = np.random.get_state()
    prompt, key = task.passkey_prompt(30000, 555)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert key == 15338
    lines = prompt.split("\n")
    assert len(lines) == 5
    assert lines[0] == TASK
    assert len(lines[1]) == 4782 and lines[1] == FILLER[:4782]
    assert lines[2] == "The pass key is 15338. Remember it. 15338 is the pass key."
    assert lines[3] == FILLER[: 30000 - 4782]  # the suffix also comes from the start of the filler
    assert lines[4] == QUESTION
    assert prompt == "\n".join([TASK, FILLER[:4782], lines[2], FILLER[:25218], QUESTION])
    assert task.prefix_chars_of(prompt) == 4782


def test_filler_is_the_reference_and_extends_it() -> None:
    assert task.filler(449_999) == FILLER
    longer = task.filler(1_000_000)
    assert len(longer) == 1_000_000 and longer.startswith(FILLER + " " + SENTENCE)


def test_depth_places_the_key_and_keeps_the_seeded_key() -> None:
    _, key = task.passkey_prompt(1000, 7)
    for depth, prefix in [(0, 0), (0.25, 250), (0.5, 500), (1, 1000), (0.3333, 333), (0.6667, 667)]:
        prompt, depth_key = task.passkey_prompt(1000, 7, depth=depth)
        lines = prompt.split("\n")
        assert depth_key == key
        assert len(lines) == 5 and lines[1] == FILLER[:prefix] and lines[3] == FILLER[: 1000 - prefix]
        assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert task.passkey_prompt(1000, 8)[1] != key


@pytest.mark.parametrize(
    "call",
    [
        lambda: task.passkey_prompt(0, 1),
        lambda: task.passkey_prompt(100, 1, depth=1.5),
        lambda: task.passkey_prompt(100, 1, depth=float("nan")),
        lambda: task.passkey_prompt(100, 1, depth=-0.1),
    ],
)
def test_bad_generator_arguments(call) -> None:
    with pytest.raises(InputError):
        call()


# --------------------------------------------------------------------------------------------------------------------
# Lengths in tokens


@pytest.mark.parametrize("tokens", [150, 400, 1000, 5000])
def test_calibrated_length_is_close_to_the_request(tokenizer, tokens: int) -> None:
    n_garbage = task.n_garbage_for_tokens(tokenizer, tokens, seed=3)
    # At the seed it was calibrated on, the prompt is within the calibration's tolerance; other seeds move the cut.
    assert abs(task.prompt_tokens(tokenizer, task.passkey_prompt(n_garbage, 3)[0]) - tokens) <= max(2, tokens // 1000)
    actual = [task.prompt_tokens(tokenizer, task.passkey_prompt(n_garbage, seed)[0]) for seed in (3, 4, 5)]
    assert all(abs(a - tokens) <= max(3, 0.02 * tokens) for a in actual), (tokens, n_garbage, actual)
    assert task.prompt_tokens(tokenizer, task.passkey_prompt(n_garbage, 3)[0]) == len(
        encode_prompt(tokenizer, task.passkey_prompt(n_garbage, 3)[0])
    )


def test_too_short_length_is_refused(tokenizer) -> None:
    fixed = task.shortest_length(tokenizer)
    with pytest.raises(InputError, match="too short"):
        task.n_garbage_for_tokens(tokenizer, fixed)
    with pytest.raises(InputError, match="too short"):
        task.check_lengths(tokenizer, [fixed + 50, 10])
    task.check_lengths(tokenizer, [fixed + 1])


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def pass_key_in(prompt: str) -> int:
    return int(re.search(r"The pass key is (\d+)\.", prompt).group(1))


class FakeModel:
    """Answers from the prompt text: `read(prompt)` is what the prompt hides (its pass key unless told; test_kv.py
    reads a value), and `reply(key, answer_ids, prompt)` gives the ids to return as generated."""

    def __init__(self, tokenizer, reply, *, read=pass_key_in):
        self.tokenizer, self.reply, self.read, self.calls = tokenizer, reply, read, []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **settings) -> torch.Tensor:
        self.calls.append({**settings, "rows": input_ids.shape[0]})
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            pads = mask.index(1)  # left padding only, masked
            assert mask[pads:] == [1] * (len(mask) - pads) and ids[pads] == self.tokenizer.bos_token_id
            prompt = self.tokenizer.decode(ids[pads:], skip_special_tokens=True)
            key = self.read(prompt)
            answer = encode_prompt(self.tokenizer, str(key), bos=False)
            rows.append(list(self.reply(key, answer, prompt))[: settings["max_new_tokens"]])
        width = max(len(r) for r in rows)  # rows that ended early padded with EOS, as generate does
        generated = [r + [self.tokenizer.eos_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(generated, dtype=torch.long)], dim=1)


def test_scoring_needs_the_exact_answer_ids(tokenizer) -> None:
    prompt, key = task.passkey_prompt(500, 11)
    answer = encode_prompt(tokenizer, str(key), bos=False)
    assert answer[0] != tokenizer.bos_token_id
    wrong_digit = encode_prompt(tokenizer, str(key)[:-1] + str((key + 1) % 10), bos=False)
    cases = {
        "exact": (lambda k, a, p: a, True),
        "with BOS first": (lambda k, a, p: [tokenizer.bos_token_id] + a, False),
        "stopped at EOS": (lambda k, a, p: a[:2] + [tokenizer.eos_token_id], False),
        "cut short": (lambda k, a, p: a[:-1], False),
        "last digit wrong": (lambda k, a, p: wrong_digit, False),
    }
    for name, (reply, expected) in cases.items():
        model = FakeModel(tokenizer, reply)
        scored = task.score_passkey(model, tokenizer, prompt, key, last_context_length=77)
        assert scored["correct"] is expected, name
        assert scored["answer_ids"] == answer
        assert scored["tokens"] == len(encode_prompt(tokenizer, prompt))
        settings = model.calls[0]
        assert settings["max_new_tokens"] == len(answer), name
        assert settings["do_sample"] is False and settings["num_beams"] == 1
        assert settings["last_context_length"] == 77
    assert task.score_passkey(FakeModel(tokenizer, lambda k, a, p: a), tokenizer, prompt, key)[
        "generated"
    ].strip() == str(key)


def test_run_and_summarize_count_per_length_and_depth(tokenizer) -> None:
    # Right only when the key comes first: depth 0 is always right, depth 1 always wrong.
    model = FakeModel(tokenizer, lambda k, a, p: a if p.split("\n")[1] == "" else a[:-1] + [a[-1] + 1])
    records = task.run_passkey(model, tokenizer, lengths=[200, 400], depths=[0, 1], trials=3, seed0=5, progress=False)
    assert len(records) == 12 and len(model.calls) == 12
    assert {(r["length"], r["depth"]) for r in records} == {(200, 0), (200, 1), (400, 0), (400, 1)}
    assert sorted({r["seed"] for r in records}) == [5, 6, 7]
    assert all(r["last_context_length"] == 1024 for r in model.calls)
    for r in records:
        prompt, key = task.passkey_prompt(r["n_garbage"], r["seed"], depth=r["depth"])
        assert r["key"] == key and r["answer"] == str(key)
        assert r["tokens"] == task.prompt_tokens(tokenizer, prompt)
        assert r["prefix_chars"] == (0 if r["depth"] == 0 else r["n_garbage"])
        assert r["correct"] is (r["depth"] == 0)
    summary = task.summarize(records)
    cells = {(c["length"], c["depth"]): c["accuracy"] for c in summary["by_length_depth"]}
    assert cells == {(200, 0): 1.0, (200, 1): 0.0, (400, 0): 1.0, (400, 1): 0.0}
    assert [(t["length"], t["accuracy"], t["trials"]) for t in summary["by_length"]] == [(200, 0.5, 6), (400, 0.5, 6)]
    assert summary["overall"]["correct"] == 6
    table = task.format_table(summary)
    assert "depth 0" in table and "depth 1" in table and "all depths" in table and "6/12 correct" in table
    assert re.search(r"^\s*200\s+\d+\s+100\.0%\s+0\.0%\s+50\.0%$", table, re.MULTILINE), table


def test_batches_score_each_prompt_as_alone(tokenizer) -> None:
    """run_passkey with batch=2 reads a length's trials two at a time (left-padded, masked) and records what it
    records one at a time: the same keys, answers and scores, an early EOS cutting a row's answer."""

    def reply(key, answer, prompt):  # odd keys answered right, even ones stopped by EOS after one token
        return answer if key % 2 else answer[:1] + [tokenizer.eos_token_id]

    alone, batched = FakeModel(tokenizer, reply), FakeModel(tokenizer, reply)
    settings = dict(lengths=[200, 400], depths=[None], trials=5, seed0=3, progress=False)
    one = task.run_passkey(alone, tokenizer, **settings)
    two = task.run_passkey(batched, tokenizer, batch=2, **settings)
    assert two == one
    assert [c["rows"] for c in batched.calls] == [2, 2, 1, 2, 2, 1]
    assert {r["key"] % 2 for r in one if r["correct"]} == {1} and any(not r["correct"] for r in one)
    assert any(len(r["generated_ids"]) == 2 for r in two)
    with pytest.raises(InputError, match="batch"):
        task.run_passkey(alone, tokenizer, batch=0, **settings)
    with pytest.raises(InputError, match="no prompts"):
        task.score_passkeys(alone, tokenizer, [])


def test_batched_trials_of_the_shipped_model() -> None:
    """The shipped model reading three pass-key prompts of about 2k tokens as one batch (block retrieval with a
    recent block, so padding reaches the summaries): prompts of the batch's longest length give exactly their
    lone answers, and every key is found, the shorter prompts' too."""
    shipped = load_tokenizer(SMALL)
    model = LongLlamaForCausalLM.from_pretrained(
        SMALL, dtype=torch.float32, mem_retrieval="blocks", mem_blocks=4, mem_recent_blocks=1
    ).eval()
    n_garbage = task.n_garbage_for_tokens(shipped, 2048, seed=0)
    prompts = [task.passkey_prompt(n_garbage, seed) for seed in range(6)]
    tokens = [task.prompt_tokens(shipped, p) for p, _ in prompts]
    assert len(set(tokens)) > 1  # some prompts are padded
    with torch.no_grad():
        batch = task.score_passkeys(model, shipped, prompts, last_context_length=256)
        for (prompt, key), result, n in zip(prompts, batch, tokens):
            assert result["correct"], (key, result["generated"])
            if n == max(tokens):  # no padding: the row is computed as alone
                alone = task.score_passkey(model, shipped, prompt, key, last_context_length=256)
                assert alone["generated_ids"] == result["generated_ids"]


def test_files_are_replaced_atomically(tmp_path: Path, monkeypatch) -> None:
    records = [
        {"length": 100, "tokens": 101, "depth": None, "correct": True},
        {"length": 100, "tokens": 99, "depth": None, "correct": False},
    ]
    summary = task.summarize(records)
    out = tmp_path / "results.json"
    out.write_text("old")
    task.save_results(out, records, summary, settings={"seed": 0})
    saved = json.loads(out.read_text())
    assert saved["records"] == records and saved["summary"]["overall"]["accuracy"] == 0.5
    assert saved["settings"] == {"seed": 0}
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    plot = tmp_path / "p.png"
    plot.write_bytes(b"old")
    from matplotlib.figure import Figure

    def broken_savefig(self, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError):
        task.plot_summary(summary, plot)
    assert plot.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "results.json"]  # no temporary files left
    with pytest.raises(InputError, match="suffixes"):
        task.plot_format(tmp_path / "p.xyz")


# --------------------------------------------------------------------------------------------------------------------
# The command


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["passkey", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_end_to_end(checkpoint: Path, tokenizer, tmp_path: Path, capsys) -> None:
    out, plot = tmp_path / "results.json", tmp_path / "passkey.png"
    code, stdout, err = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--lengths",
        "300,200",
        "--depths",
        "0,1",
        "--trials",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--plot",
        str(plot),
    )
    assert code == 0, err
    assert "all depths" in stdout and f"wrote {out}" in stdout and f"wrote {plot}" in stdout
    assert "passkey" in err  # the progress bar
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    # The local context defaults to the model's own last_context_length (1024 in the released checkpoints).
    lcl = LongLlamaConfig.from_pretrained(checkpoint).last_context_length
    assert saved["settings"]["lengths"] == [200, 300] and saved["settings"]["last_context_length"] == lcl
    assert saved["summary"]["lengths"] == [200, 300] and saved["summary"]["depths"] == [0.0, 1.0]
    records = saved["records"]
    assert len(records) == 8 and sorted({r["seed"] for r in records}) == [3, 4]
    fields = {
        "length",
        "tokens",
        "n_garbage",
        "depth",
        "prefix_chars",
        "seed",
        "key",
        "answer",
        "answer_ids",
        "generated_ids",
        "generated",
        "correct",
    }
    assert all(set(r) == fields for r in records)
    assert all(abs(r["tokens"] - r["length"]) <= 6 for r in records)
    assert all(r["correct"] == (r["generated_ids"] == r["answer_ids"]) for r in records)
    # The command's generated ids are the model's greedy continuation of the prompt.
    model = LongLlamaForCausalLM.from_pretrained(checkpoint).eval()
    first = records[0]
    prompt, key = task.passkey_prompt(first["n_garbage"], first["seed"], depth=first["depth"])
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    expected = model.generate(ids, max_new_tokens=len(first["answer_ids"]), last_context_length=lcl)
    assert first["key"] == key and first["generated_ids"] == expected[0, ids.shape[1] :].tolist()


def test_command_without_depths_uses_the_random_place(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    code, stdout, err = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--lengths",
        "250",
        "--trials",
        "2",
        "--device",
        "cpu",
        "--last-context-length",
        "64",
        "--mem-layers",
        "none",
        "--out",
        str(out),
    )
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["summary"]["depths"] == [None] and "depth random" in stdout
    assert saved["settings"]["mem_layers"] == [] and saved["settings"]["last_context_length"] == 64
    for r in saved["records"]:
        prompt, _ = task.passkey_prompt(r["n_garbage"], r["seed"])
        assert r["prefix_chars"] == task.prefix_chars_of(prompt)


def test_command_with_top_k_memory(checkpoint: Path, tmp_path: Path, capsys) -> None:
    # --mem-top-k reaches the model: with k = 1 the generated ids differ from dense attention's on some trial.
    runs = {}
    for k in ("0", "1"):
        out = tmp_path / f"k{k}.json"
        code, _, err = _run(
            capsys,
            "--model",
            str(checkpoint),
            "--lengths",
            "600",
            "--trials",
            "3",
            "--device",
            "cpu",
            "--last-context-length",
            "64",
            "--mem-top-k",
            k,
            "--out",
            str(out),
        )
        assert code == 0, err
        runs[k] = json.loads(out.read_text())
    assert runs["1"]["settings"]["mem_top_k"] == 1
    dense = [r["generated_ids"] for r in runs["0"]["records"]]
    assert dense != [r["generated_ids"] for r in runs["1"]["records"]]


def test_command_cut_short_keeps_its_finished_trials(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # --out is rewritten after every trial; a run interrupted at its third trial leaves the first two, marked
    # incomplete, and a full run is marked complete.
    out = tmp_path / "r.json"
    real, calls = task._trials, []

    def trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(task, "_trials", trial)
    code, _, _ = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--lengths",
        "250",
        "--trials",
        "4",
        "--device",
        "cpu",
        "--last-context-length",
        "64",
        "--out",
        str(out),
    )
    assert code == 130
    saved = json.loads(out.read_text())
    assert saved["settings"]["complete"] is False and [r["seed"] for r in saved["records"]] == [0, 1]
    assert saved["summary"]["overall"]["trials"] == 2
    monkeypatch.setattr(task, "_trials", real)
    code, _, err = _run(
        capsys,
        "--model",
        str(checkpoint),
        "--lengths",
        "250",
        "--trials",
        "4",
        "--device",
        "cpu",
        "--last-context-length",
        "64",
        "--out",
        str(out),
    )
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["settings"]["complete"] is True and len(saved["records"]) == 4


def test_command_reads_trials_in_batches(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """--batch N reads N trials of a length together (one generate call) and records the setting."""
    out, calls = tmp_path / "r.json", []
    real = task.score_passkeys
    monkeypatch.setattr(
        task, "score_passkeys", lambda m, t, prompts, **kw: calls.append(len(prompts)) or real(m, t, prompts, **kw)
    )
    args = ["--model", str(checkpoint), "--lengths", "250", "--trials", "3", "--device", "cpu", "--out", str(out)]
    code, _, err = _run(capsys, *args, "--batch", "2", "--last-context-length", "64")
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert calls == [2, 1] and saved["settings"]["batch"] == 2
    assert [r["seed"] for r in saved["records"]] == [0, 1, 2]
    code, _, err = _run(capsys, *args, "--batch", "0")
    assert code == 2 and "--batch" in err


def test_command_errors_are_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ok = ["--model", str(checkpoint), "--device", "cpu"]
    cases = {
        "missing model": (["--model", str(tmp_path / "nope")], "no such folder"),
        "too short": ([*ok, "--lengths", "10"], "too short"),
        "bad length": ([*ok, "--lengths", "abc"], "tokens"),
        "bad depth": ([*ok, "--depths", "0,1.5"], "[0, 1]"),
        "no trials": ([*ok, "--trials", "0"], "at least 1"),
        "out folder missing": ([*ok, "--lengths", "300", "--out", str(tmp_path / "no" / "r.json")], "does not exist"),
        "bad plot suffix": ([*ok, "--lengths", "300", "--plot", str(tmp_path / "p.xyz")], "suffixes"),
        "bad memory layer": ([*ok, "--lengths", "300", "--mem-layers", "99"], "mem_layers"),
        "negative layer": ([*ok, "--mem-layers", "-1"], ">= 0"),
        "negative top k": ([*ok, "--mem-top-k", "-1"], "0 or more"),
    }
    assert_one_line_errors(lambda *args: _run(capsys, *args), cases)
    assert not (tmp_path / "p.xyz").exists()


def test_lengths_and_depths_parsing(capsys) -> None:
    from longllama.cli import build_parser

    args = build_parser().parse_args(["passkey", "--lengths", "16k,4096,4k", "--depths", "none,0.5,0,0.5"])
    assert args.lengths == [4096, 16384] and args.depths == [None, 0.5, 0.0]
    defaults = build_parser().parse_args(["passkey"])
    assert defaults.lengths is None and defaults.depths is None and defaults.last_context_length is None
    assert build_parser().parse_args(["passkey", "--mem-layers", "none"]).mem_layers == []
    assert build_parser().parse_args(["passkey", "--mem-layers", "6,4"]).mem_layers == [4, 6]
    assert build_parser().parse_args(["passkey", "--lengths", "1m,4M,32k"]).lengths == [32768, 1 << 20, 1 << 22]
    assert build_parser().parse_args(["passkey", "--mem-top-k", "128"]).mem_top_k == 128
    assert main(["passkey", "--help"]) == 0
    assert "--depths" in capsys.readouterr().out
