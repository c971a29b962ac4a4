"""`longllama eval icl`: demonstration packing, label scoring against hand-computed log-likelihoods, the truncated
mode against transformers' LlamaForCausalLM on the shipped weights, the command end to end, and its input errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_invariants import hf_llama

from longllama.cli import SHIPPED_MODEL, main
from longllama.evals import icl

# ----------------------------------------------------------------------------------------------- fakes


class WordTokenizer:
    """Whitespace tokenizer: one id per distinct word (ids from 3), BOS 1."""

    bos_token_id = 1

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.ids.setdefault(w, len(self.ids) + 3) for w in text.split()]


class BigramModel:
    """Logits of a position are row `table[token]`; the cache it returns records the ids it has read."""

    def __init__(self, table: torch.Tensor, window: int = 64):
        self.table = table
        self.config = SimpleNamespace(last_context_length=window)
        self.device = torch.device("cpu")
        self.calls: list[dict] = []

    def __call__(self, input_ids, past_key_values=None, use_cache=None, last_context_length=None, logits_to_keep=0):
        ids = input_ids[0].tolist()
        self.calls.append({"ids": ids, "cache": past_key_values, "window": last_context_length})
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        before = tuple(past_key_values) if past_key_values is not None else ()
        return SimpleNamespace(logits=logits, past_key_values=before + tuple(ids))


def _log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(v) for v in row))


# --------------------------------------------------------------------------------------------- packing


def test_demonstration_order_by_seed():
    a, b = icl.demonstration_order(50, 0), icl.demonstration_order(50, 1)
    assert sorted(a) == list(range(50)) and a == icl.demonstration_order(50, 0) and a != b


def test_pack_memory_keeps_all_truncated_keeps_the_last_that_fit():
    demos = [[10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34], [40, 41]]
    context, kept = icl.pack(demos, mode="memory", window=12, question_tokens=2, label_tokens=1, bos=1)
    assert kept == 4 and context == [1] + [t for d in demos for t in d]
    # room = 12 - BOS - question 2 - label 1 = 8: the last demo (2) and the one before (5) fit, the next (4) not.
    context, kept = icl.pack(demos, mode="truncated", window=12, question_tokens=2, label_tokens=1, bos=1)
    assert kept == 2 and context == [1, 30, 31, 32, 33, 34, 40, 41]
    context, kept = icl.pack(demos, mode="truncated", window=5, question_tokens=2, label_tokens=1, bos=1)
    assert kept == 0 and context == [1]
    with pytest.raises(icl.InputError, match="do not fit"):
        icl.pack(demos, mode="truncated", window=3, question_tokens=2, label_tokens=1, bos=1)


def test_label_log_likelihood_against_hand_computed():
    table = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 3.0], [-2.0, 0.0, 0.5, 1.5]], dtype=torch.float32
    )
    model = BigramModel(table)
    cache = ("context",)
    scores = icl.label_log_likelihoods(model, cache, [1, 2], [[3], [0, 1], [2, 3]], last_context_length=64)
    rows = table.tolist()
    expected = [
        _log_softmax(rows[2], 3),  # P(3 | 2)
        _log_softmax(rows[2], 0) + _log_softmax(rows[0], 1),  # P(0 | 2) P(1 | 0)
        _log_softmax(rows[2], 2) + _log_softmax(rows[2], 3),  # P(2 | 2) P(3 | 2)
    ]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert all(call["cache"] is cache for call in model.calls)  # every label continues the same context


def test_evaluate_on_a_fake_model_packs_and_predicts():
    tokenizer = WordTokenizer()
    train = [{"text": f"t{i}", "label": "yes" if i % 2 else "no"} for i in range(6)]
    test = [{"text": "q1", "label": "yes"}, {"text": "q2", "label": "no"}]
    for e in train + test:  # fix the ids in file order
        tokenizer.encode(icl.demonstration_line(e))
    vocab = 3 + len(tokenizer.ids)
    table = torch.zeros(vocab, vocab)
    arrow = tokenizer.ids["->"]
    table[arrow, tokenizer.ids["yes"]] = 5.0  # after "->" the model says "yes"
    model = BigramModel(table)
    records, summary = icl.evaluate(model, tokenizer, train, test, shots=[0, 3], seeds=2, modes=["memory"])
    assert summary["labels"] == ["no", "yes"] and summary["chance"] == 0.5
    assert summary["modes"]["memory"]["3"]["accuracy_per_seed"] == [0.5, 0.5]
    assert [r["predicted"] for r in records] == ["yes"] * 8
    # For seed 1 and 3 shots: the context read once is BOS + the first 3 demonstrations of seed 1's order.
    order = icl.demonstration_order(6, 1)[:3]
    expected_context = [1] + [t for i in order for t in tokenizer.encode(icl.demonstration_line(train[i]))]
    reads = [c for c in model.calls if c["cache"] is None]
    assert reads[-1]["ids"] == expected_context
    # Then each question comes last, followed by one label, continuing that context.
    last = [c for c in model.calls if c["cache"] == tuple(expected_context)]
    q2 = tokenizer.encode("q2 ->")
    assert [c["ids"] for c in last[-2:]] == [q2 + [tokenizer.ids["no"]], q2 + [tokenizer.ids["yes"]]]


# ------------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def shipped():
    from longllama.cli import LoadOptions, eval_model

    _, model, tokenizer = eval_model(str(SHIPPED_MODEL), LoadOptions(dtype="float32", device="cpu"))
    return model, tokenizer


def test_truncated_mode_stays_in_the_window_and_equals_llama(shipped):
    model, tokenizer = shipped
    train = icl.synthetic_examples(80, seed=1)
    test = icl.synthetic_examples(2, seed=2)
    labels = sorted({e["label"] for e in train})
    window = model.config.last_context_length
    records, summary = icl.evaluate(model, tokenizer, train, test, shots=[80], seeds=1, modes=["truncated"])
    row = summary["modes"]["truncated"]["80"]
    assert 0 < row["demonstrations_per_seed"][0] < 80
    questions = [icl.encode_text(tokenizer, icl.question_line(e)) for e in test]
    tails = [t for e in test for t in icl.label_continuations(tokenizer, icl.question_line(e), labels)]
    assert row["context_tokens_per_seed"][0] + max(map(len, questions)) + max(map(len, tails)) <= window
    # One more demonstration would not fit.
    demo_ids = [icl.encode_text(tokenizer, icl.demonstration_line(train[i])) for i in icl.demonstration_order(80, 0)]
    one_more = sum(len(d) for d in demo_ids[80 - row["demonstrations_per_seed"][0] - 1 :])
    assert 1 + one_more + max(map(len, questions)) + max(map(len, tails)) > window
    # The whole input fits one window with no memory: the scores are LLaMA's on context + question + label.
    llama = hf_llama(model)  # the shipped weights, read in fp32 by the fixture
    kept = row["demonstrations_per_seed"][0]
    context = [tokenizer.bos_token_id] + [t for d in demo_ids[80 - kept :] for t in d]
    for example, question, record in zip(test, questions, records):
        for label, tail in zip(labels, icl.label_continuations(tokenizer, icl.question_line(example), labels)):
            ids = torch.tensor([context + question + tail])
            with torch.no_grad():
                logprobs = torch.log_softmax(llama(ids).logits[0].float(), -1)
            start = len(context) + len(question)
            expected = sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(tail))
            assert record["scores"][label] == pytest.approx(expected, abs=1e-4)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_command_end_to_end(tmp_path, capsys):
    train = _write(tmp_path / "train.jsonl", icl.synthetic_examples(40, seed=1))
    test = _write(tmp_path / "test.jsonl", icl.synthetic_examples(10, seed=2))
    out, plot = tmp_path / "icl.json", tmp_path / "icl.png"
    files = ["--train", train, "--test", test, "--out", str(out), "--plot", str(plot)]
    argv = "eval icl --dtype float32 --shots 0,4,32 --seeds 2 --limit 4 --modes memory,truncated".split() + files
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert set(record["summary"]["modes"]) == {"memory", "truncated"}
    assert set(record["summary"]["modes"]["memory"]) == {"0", "4", "32"}
    assert len(record["records"]) == 2 * 3 * 2 * 4
    assert record["settings"]["test_questions"] == 4 and record["settings"]["seeds"] == [0, 1]
    for r in record["records"]:
        assert 0 <= r["demonstrations"] <= r["shots"] and r["predicted"] in record["summary"]["labels"]
        if r["mode"] == "memory":
            assert r["demonstrations"] == r["shots"]
    assert plot.stat().st_size > 1000
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "train_rows, test_rows, message",
    [
        ([{"text": "a"}], [{"text": "b", "label": "x"}], "lacks label"),
        ([], [{"text": "b", "label": "x"}], "holds no examples"),
        ([{"text": "a", "label": "x"}, {"text": "c", "label": "y"}], [{"text": "b", "label": "z"}], "'z'"),
        ([{"text": "a", "label": "x"}, {"text": "c", "label": "x"}], [{"text": "b", "label": "x"}], "at least 2"),
        ([{"label": "x"}], [{"text": "b", "label": "x"}], "lacks text"),
    ],
    ids=["missing-label", "empty", "unknown-test-label", "one-label", "missing-text"],
)
def test_input_errors_are_one_line(tmp_path, capsys, train_rows, test_rows, message):
    train = _write(tmp_path / "train.jsonl", train_rows)
    test = _write(tmp_path / "test.jsonl", test_rows)
    assert main(["eval", "icl", "--train", train, "--test", test, "--shots", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_not_json_is_one_line(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\nnot json\n', encoding="utf-8")
    test = _write(tmp_path / "test.jsonl", [{"text": "b", "label": "x"}])
    assert main(["eval", "icl", "--train", str(train), "--test", test]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2 is not JSON" in err[0]


def test_more_shots_than_examples_is_an_error(tmp_path, capsys):
    rows = [{"text": "a", "label": "x"}, {"text": "c", "label": "y"}]
    train, test = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "test.jsonl", rows)
    assert main(["eval", "icl", "--train", train, "--test", test, "--shots", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the 2 training examples" in err[0]


def test_memory_mode_cache_reuse_equals_one_call(shipped):
    # The demonstrations, read once, fill memory (beyond the final window); each label continues that cache. One
    # call over the whole input whose final window is the cached window plus the continuation sees the same keys.
    model, tokenizer = shipped
    window = model.config.last_context_length
    train = icl.synthetic_examples(100, seed=1)
    question_text = icl.question_line(icl.synthetic_examples(1, seed=2)[0])
    labels = sorted({e["label"] for e in train})
    demo_ids = [icl.encode_text(tokenizer, icl.demonstration_line(e)) for e in train]
    context, kept = icl.pack(demo_ids, mode="memory", window=window, question_tokens=0, label_tokens=0, bos=1)
    assert kept == 100 and len(context) > model.config.context_window + window  # several memory windows
    cache = icl.read_context(model, context, last_context_length=window)
    question = icl.encode_text(tokenizer, question_text)
    tails = icl.label_continuations(tokenizer, question_text, labels)
    scores = icl.label_log_likelihoods(model, cache, question, tails, last_context_length=window)
    assert icl.label_log_likelihoods(model, cache, question, tails, last_context_length=window) == scores
    for score, tail in zip(scores, tails):
        new = len(question) + len(tail)
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor([context + question + tail]), use_cache=False, last_context_length=window + new
            )
        logprobs = torch.log_softmax(out.logits[0].float(), -1)
        start = len(context) + len(question)
        assert score == pytest.approx(sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(tail)), abs=1e-4)
