"""Tests of the key-value retrieval task (docs/evaluation.md#key-value-retrieval) and the `longllama kv` command.

The intro, question and filler texts are written out here rather than imported, so a change of the module's
constants (which must stay those the shipped model was trained on) fails the test. Models are a fake whose
`generate` answers from the prompt text (the scoring rule), the shipped model (it finds the values) and a tiny random
LongLLaMA with the shipped tokenizer (the command end to end).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_errors
from test_passkey import FakeModel

from longllama import LongLlamaForCausalLM
from longllama.cli import build_parser, main
from longllama.config import preset
from longllama.errors import InputError
from longllama.evals import kv as task
from longllama.evals import passkey
from longllama.tokenizer import encode_prompt, load_tokenizer

INTRO = (
    "Some keys and their values are hidden in the text below, each on its own line as 'key: value'. "
    "Remember them; you will be asked for some of the values at the end."
)
SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER = " ".join([SENTENCE] * 1000)
PAIR_LINE = re.compile(r"^([a-z]+_[a-z]+_[1-9][0-9]{2}): ([0-9]{1,6}|[0-9a-f]{8})$")
SMALL = Path(task.__file__).parents[1] / "models" / "small"  # the shipped model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMALL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LongLLaMA with the shipped model's tokenizer: quick to run, its answers are noise."""
    folder = tmp_path_factory.mktemp("kv") / "tiny"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SMALL / name, folder / name)
    torch.manual_seed(0)
    LongLlamaForCausalLM(preset("tiny", vocab_size=8192)).save_pretrained(folder)
    return folder


def parse(text: str) -> tuple[list[str], list[tuple[str, str, int]], str]:
    """(the filler pieces, each pair line as (key, value, filler characters before it), the asked key), checking the
    intro comes first and the question last."""
    lines = text.split("\n")
    assert lines[0] == INTRO
    question = re.fullmatch(r"What is the value of (\S+)\? The value of (\S+) is", lines[-1])
    assert question and question.group(1) == question.group(2), lines[-1]
    pieces, pairs, chars = [], [], 0
    for line in lines[1:-1]:
        assert line, "an empty filler piece was kept"
        match = PAIR_LINE.match(line)
        if match:
            pairs.append((match.group(1), match.group(2), chars))
        else:
            pieces.append(line)
            chars += len(line)
    return pieces, pairs, question.group(1)


# --------------------------------------------------------------------------------------------------------------------
# The generator


@pytest.mark.parametrize(("n_garbage", "seed", "pairs"), [(5000, 5, 8), (3000, 11, 3), (700, 2, 1), (40, 9, 12)])
def test_prompt_layout(n_garbage: int, seed: int, pairs: int) -> None:
    prompt = task.kv_prompt(n_garbage, seed, pairs=pairs)
    pieces, found, asked = parse(prompt.text)
    # The filler pieces are the filler cut in order (sorted cuts), nothing lost or repeated.
    assert "".join(pieces) == FILLER[:n_garbage]
    assert [(key, value) for key, value, _ in found] == list(prompt.pairs.items())  # each line once, drawn order
    keys, values = [key for key, _, _ in found], [value for _, value, _ in found]
    assert len(keys) == pairs and len(set(keys)) == pairs and len(set(values)) == pairs
    assert asked == prompt.key and asked in keys and prompt.value == prompt.pairs[asked]
    assert prompt.asked_chars == dict((key, chars) for key, _, chars in found)[asked]
    assert task.asked_depth(prompt, n_garbage) == round(prompt.asked_chars / n_garbage, 4)
    assert len(prompt.text.split("\n")) == 2 + pairs + len(pieces)


def test_cuts_are_spread_over_the_filler() -> None:
    # Over many seeds the asked line sits anywhere in the filler, and every pair's place varies.
    depths = [task.asked_depth(task.kv_prompt(10_000, seed), 10_000) for seed in range(200)]
    assert min(depths) < 0.1 and max(depths) > 0.9 and 0.35 < float(np.mean(depths)) < 0.65
    places = [[chars for _, _, chars in parse(task.kv_prompt(10_000, seed).text)[1]] for seed in range(50)]
    assert all(len(set(column)) > 40 for column in zip(*places))


def test_seeds_are_deterministic_and_lengths_keep_the_pairs() -> None:
    np.random.seed(1234)
    before = np.random.get_state()
    first = task.kv_prompt(4000, 7)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert task.kv_prompt(4000, 7) == first
    longer = task.kv_prompt(90_000, 7)
    assert longer.pairs == first.pairs and longer.key == first.key and longer.text != first.text
    other = task.kv_prompt(4000, 8)
    assert other.pairs != first.pairs and other.text != first.text
    assert len(task.kv_prompt(4000, 7, pairs=3).pairs) == 3


def test_values_mix_numbers_and_hex_as_in_training() -> None:
    values = [v for seed in range(150) for v in task.kv_prompt(100, seed).pairs.values()]
    hex_values = [v for v in values if len(v) == 8]  # some of them all digits
    numbers = [v for v in values if len(v) != 8]
    assert all(re.fullmatch(r"[0-9a-f]{8}", v) for v in hex_values) and any(not v.isdigit() for v in hex_values)
    assert all(re.fullmatch(r"[1-9][0-9]{0,5}", v) for v in numbers)
    assert 0.3 < len(hex_values) / len(values) < 0.5
    assert {len(v) for v in numbers} >= {2, 3, 4, 5, 6}
    keys = [k for seed in range(150) for k in task.kv_prompt(100, seed).pairs]
    assert all(k.split("_")[0] in task.KEY_WORDS and k.split("_")[1] in task.KEY_WORDS for k in keys)
    assert 32 <= len(task.KEY_WORDS) == len(set(task.KEY_WORDS)) <= 64


class Scripted:
    """A generator that draws the given key numbers and decimal values in turn (both words the list's first)."""

    def __init__(self, numbers: list[int], values: list[int]) -> None:
        self.numbers, self.values = list(numbers), list(values)

    def integers(self, low: int, high: int | None = None, size: int | None = None):
        if size is not None:
            return np.zeros(size, dtype=np.int64)
        if (low, high) == (100, 1000):
            return self.numbers.pop(0)
        if (low, high) == (2, 7):
            return 2  # numbers below 100
        return self.values.pop(0)

    def random(self) -> float:
        return 0.0  # always a decimal number


def test_repeated_keys_and_values_are_drawn_again() -> None:
    # The second draw repeats a key, the third a value: both are dropped, the last two draws complete the three.
    pairs = task._draw_pairs(Scripted([100, 100, 101, 102, 103], [1, 2, 1, 3, 4]), 3)
    assert pairs == {"amber_amber_100": "1", "amber_amber_102": "3", "amber_amber_103": "4"}


@pytest.mark.parametrize(
    "call",
    [
        lambda: task.kv_prompt(0, 1),
        lambda: task.kv_prompt(100, 1, pairs=0),
        lambda: task.kv_prompt(100, 1, pairs=-2),
        lambda: task.kv_prompt(100, 1, pairs=2.5),
        lambda: task.kv_prompt(100, 1, pairs=True),
        lambda: task.kv_prompt(100, 1, pairs=task.MAX_PAIRS + 1),
        lambda: task.kv_prompt(100, -1),
    ],
)
def test_bad_generator_arguments(call) -> None:
    with pytest.raises(InputError) as error:
        call()
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------------------------
# Lengths in tokens


@pytest.mark.parametrize("tokens", [300, 2048, 8192])
def test_calibrated_length_is_close_to_the_request(tokenizer, tokens: int) -> None:
    n_garbage = task.n_garbage_for_tokens(tokenizer, tokens, seed=3)
    actual = [passkey.prompt_tokens(tokenizer, task.kv_prompt(n_garbage, seed).text) for seed in (3, 4, 5, 6)]
    assert abs(actual[0] - tokens) <= max(2, tokens // 1000), (tokens, actual)
    # Other seeds hide other keys and values (a few tokens each): the same filler, a few dozen tokens apart at most.
    assert all(abs(a - tokens) <= max(6 * task.DEFAULT_PAIRS, 0.02 * tokens) for a in actual), (tokens, actual)


def test_too_short_length_is_refused(tokenizer) -> None:
    fixed = passkey.prompt_tokens(tokenizer, task.kv_prompt(1, 0).text)
    with pytest.raises(InputError, match="too short"):
        task.n_garbage_for_tokens(tokenizer, fixed)
    with pytest.raises(InputError, match="too short"):
        task.check_lengths(tokenizer, [fixed + 50, fixed])
    task.check_lengths(tokenizer, [fixed + 1])
    with pytest.raises(InputError, match="too short"):  # more pairs, a longer fixed part
        task.check_lengths(tokenizer, [fixed + 1], pairs=16)


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def value_in(prompt: str) -> str:
    """The asked key's value, read from the prompt's lines."""
    _, found, asked = parse(prompt)
    return next(value for key, value, _ in found if key == asked)


def other_value_in(prompt: str) -> str:
    """The value of the first key not asked."""
    _, found, asked = parse(prompt)
    return next(value for key, value, _ in found if key != asked)


def fake_model(tokenizer, reply) -> FakeModel:
    """test_passkey's fake model reading the asked value: `reply(value, value_ids, prompt)` gives its ids."""
    return FakeModel(tokenizer, reply, read=value_in)


def test_scoring_needs_the_exact_value_ids(tokenizer) -> None:
    prompt = task.kv_prompt(1500, 4, pairs=5)
    answer = encode_prompt(tokenizer, prompt.value, bos=False)
    assert tokenizer.decode(answer) == prompt.value and answer[0] != tokenizer.bos_token_id
    other = encode_prompt(tokenizer, other_value_in(prompt.text), bos=False)
    cases = {
        "exact": (lambda v, a, p: a, True),
        "another key's value": (lambda v, a, p: other, False),
        "with BOS first": (lambda v, a, p: [tokenizer.bos_token_id] + a, False),
        "stopped at EOS": (lambda v, a, p: a[:1] + [tokenizer.eos_token_id], False),
        "cut short": (lambda v, a, p: a[:-1], False),
    }
    for name, (reply, expected) in cases.items():
        model = fake_model(tokenizer, reply)
        scored = passkey.score_passkey(model, tokenizer, prompt.text, prompt.value, last_context_length=77)
        assert scored["correct"] is expected, name
        assert scored["answer_ids"] == answer
        assert model.calls[0]["max_new_tokens"] == len(answer) and model.calls[0]["last_context_length"] == 77
        assert model.calls[0]["do_sample"] is False and model.calls[0]["num_beams"] == 1


def test_run_records_and_batches(tokenizer) -> None:
    """run_kv records what its prompts hid and what the model answered; batch=2 reads two trials at once and
    records the same; the summaries of passkey.py read the records."""

    def reply(value, answer, prompt):  # right for hex values, another key's value for numbers
        return answer if not value.isdigit() else encode_prompt(tokenizer, other_value_in(prompt), bos=False)

    alone, batched = fake_model(tokenizer, reply), fake_model(tokenizer, reply)
    settings = dict(lengths=[600, 1000], trials=5, seed0=3, pairs=4, last_context_length=99, progress=False)
    seen = []
    one = task.run_kv(alone, tokenizer, on_record=lambda records: seen.append(len(records)), **settings)
    two = task.run_kv(batched, tokenizer, batch=2, **settings)
    assert two == one and len(one) == 10 and seen == list(range(1, 11))
    assert [c["rows"] for c in batched.calls] == [2, 2, 1, 2, 2, 1]
    assert all(c["last_context_length"] == 99 for c in alone.calls)
    fields = {"length", "tokens", "n_garbage", "depth", "pairs", "seed", "key", "asked_depth", "answer"}
    fields |= {"answer_ids", "generated_ids", "generated", "correct"}
    for r in one:
        assert set(r) == fields and r["depth"] is None and r["pairs"] == 4
        prompt = task.kv_prompt(r["n_garbage"], r["seed"], pairs=4)
        assert r["key"] == prompt.key and r["answer"] == prompt.value
        assert r["asked_depth"] == task.asked_depth(prompt, r["n_garbage"])
        assert r["tokens"] == passkey.prompt_tokens(tokenizer, prompt.text)
        assert r["answer_ids"] == encode_prompt(tokenizer, prompt.value, bos=False)
        assert r["correct"] is (not prompt.value.isdigit()) and r["correct"] == (r["generated"] == r["answer"])
    assert [r["seed"] for r in one] == [3, 4, 5, 6, 7] * 2
    assert 0 < sum(r["correct"] for r in one) < 10
    summary = passkey.summarize(one)
    assert summary["overall"]["correct"] == sum(r["correct"] for r in one)
    assert "depth random" in passkey.format_table(summary)


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        (dict(trials=0), "trials"),
        (dict(batch=0), "batch"),
        (dict(pairs=0), "pairs"),
        (dict(seed0=-1), "seed"),
        (dict(lengths=[100]), "too short"),
    ],
)
def test_bad_run_settings_are_refused_before_the_model(tokenizer, settings: dict, hint: str) -> None:
    model = fake_model(tokenizer, lambda v, a, p: a)
    with pytest.raises(InputError, match=hint):
        task.run_kv(model, tokenizer, **{"lengths": [600], "trials": 2, "progress": False, **settings})
    assert model.calls == []


class CountingModel:
    """A model whose generate calls are counted (rows per call)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, input_ids: torch.Tensor, **settings) -> torch.Tensor:
        self.rows.append(input_ids.shape[0])
        return self.model.generate(input_ids, **settings)


def test_the_shipped_model_finds_the_values(tokenizer) -> None:
    """The shipped model (trained on this layout) answers three prompts of about 2k tokens, eight pairs each, the
    first two read as one batch; the local context is 256 tokens, so the lines are reachable only through memory.
    Seeds 2-4 were picked where every answer token wins by a wide logit margin (about 3 or more)."""
    model = CountingModel(LongLlamaForCausalLM.from_pretrained(SMALL, dtype=torch.float32).eval())
    with torch.no_grad():
        records = task.run_kv(
            model, tokenizer, lengths=[2048], trials=3, seed0=2, batch=2, last_context_length=256, progress=False
        )
    assert model.rows == [2, 1]
    assert [(r["answer"], r["generated"]) for r in records] == [(r["answer"], r["answer"]) for r in records]
    assert all(r["correct"] for r in records)
    assert len({r["answer"] for r in records}) == 3 and all(abs(r["tokens"] - 2048) <= 48 for r in records)


# --------------------------------------------------------------------------------------------------------------------
# The command


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """`longllama kv ARGS`: the exit status, stdout and stderr."""
    code = main(["kv", *args])
    return (code, *capsys.readouterr())


def test_command_end_to_end(checkpoint: Path, tokenizer, tmp_path: Path, capsys) -> None:
    out, plot = tmp_path / "results.json", tmp_path / "kv.png"
    args = ["--model", str(checkpoint), "--device", "cpu", "--last-context-length", "64", "--seed", "3"]
    code, stdout, err = _run(
        capsys, *args, "--lengths", "400,300", "--trials", "3", "--pairs", "4", "--batch", "2", "--out", str(out)
    )
    assert code == 0, err
    assert "all depths" in stdout and re.search(r"\d/6 correct", stdout) and f"wrote {out}" in stdout
    assert "kv" in err  # the progress bar
    saved = json.loads(out.read_text())
    settings = saved["settings"]
    assert settings["task"] == "kv" and settings["pairs"] == 4 and settings["batch"] == 2
    assert settings["lengths"] == [300, 400] and settings["trials"] == 3 and settings["seed"] == 3
    assert settings["last_context_length"] == 64 and settings["complete"] is True and "depths" not in settings
    assert saved["summary"]["lengths"] == [300, 400] and saved["summary"]["overall"]["trials"] == 6
    records = saved["records"]
    assert [(r["length"], r["seed"]) for r in records] == [(300, 3), (300, 4), (300, 5), (400, 3), (400, 4), (400, 5)]
    for r in records:
        prompt = task.kv_prompt(r["n_garbage"], r["seed"], pairs=4)
        assert (r["key"], r["answer"], r["pairs"]) == (prompt.key, prompt.value, 4)
        assert abs(r["tokens"] - r["length"]) <= 24
    # The last record was read alone (the third trial of a batch of two): its ids are the model's greedy ones.
    last = records[-1]
    model = LongLlamaForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([encode_prompt(tokenizer, task.kv_prompt(last["n_garbage"], last["seed"], pairs=4).text)])
    expected = model.generate(ids, max_new_tokens=len(last["answer_ids"]), last_context_length=64)
    assert last["generated_ids"] == expected[0, ids.shape[1] :].tolist()
    # Without --pairs: eight lines a prompt, and a plot.
    code, stdout, err = _run(capsys, *args, "--lengths", "300", "--trials", "1", "--out", str(out), "--plot", str(plot))
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["settings"]["pairs"] == 8 and saved["records"][0]["pairs"] == 8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {plot}" in stdout


def test_command_errors_are_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    ok = ["--model", str(checkpoint), "--device", "cpu"]
    # Weights that cannot load: the prompt settings must be refused before the model is read.
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    cases = {
        "missing model": (["--model", str(tmp_path / "nope")], "no such folder"),
        "too short": (["--model", str(broken), "--lengths", "100"], "too short"),
        "too short for the pairs": (["--model", str(broken), "--lengths", "300", "--pairs", "40"], "too short"),
        "no pairs": ([*ok, "--pairs", "0"], "at least 1"),
        "too many pairs": (["--model", str(broken), "--pairs", str(task.MAX_PAIRS + 1)], "pairs"),
        "depths are passkey's": ([*ok, "--depths", "0.5"], "unrecognized arguments"),
        "negative seed": (["--model", str(broken), "--lengths", "300", "--seed", "-1"], "seed"),
        "weights": (["--model", str(broken), "--lengths", "300"], "safetensors"),
        "no batch": ([*ok, "--batch", "0"], "--batch"),
        "out folder missing": ([*ok, "--lengths", "300", "--out", str(tmp_path / "no" / "r.json")], "does not exist"),
        "bad plot suffix": ([*ok, "--lengths", "300", "--plot", str(tmp_path / "p.xyz")], "suffixes"),
    }
    assert_one_line_errors(lambda *args: _run(capsys, *args), cases)


def test_arguments_and_help(capsys) -> None:
    args = build_parser().parse_args(["kv", "--lengths", "16k,2k", "--pairs", "3", "--batch", "4"])
    assert args.lengths == [2048, 16384] and args.pairs == 3 and args.batch == 4
    defaults = build_parser().parse_args(["kv"])
    assert defaults.lengths is None and defaults.pairs is None and defaults.trials == 10
    assert main(["kv", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--pairs" in text and "--batch" in text and "--depths" not in text
