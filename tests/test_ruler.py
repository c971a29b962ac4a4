"""`longllama eval ruler`: RULER's templates written out by hand from the published constants (not imported from the
module), its two metrics on hand-made predictions, lengths counted by `encode_prompt` on the whole prompt,
determinism by seed, the command end to end on the shipped model, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
from conftest import run_benchmark

from longllama.cli import SHIPPED_MODEL, main
from longllama.errors import InputError
from longllama.tokenizer import encode_prompt, load_tokenizer

pytest.importorskip("wonderwords")
from longllama.evals import ruler  # noqa: E402

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SINGLE = (
    "A special magic {v} is hidden within the following text. Make sure to memorize it. I will quiz you about the "
    "{v} afterwards.\n(?P<context>.*)\nWhat is the special magic {v} for (?P<query>\\S+) mentioned in the "
    "provided text\\?"
)
SINGLE_PREFIX = " The special magic {v} for {q} mentioned in the provided text is"
PLURAL = (
    "Some special magic {v} are hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the {v} afterwards.\n(?P<context>.*)\nWhat are all the special magic {v} for (?P<query>.+) mentioned in the "
    "provided text\\?"
)
PLURAL_PREFIX = " The special magic {v} for {q} mentioned in the provided text are"
VT = (
    "Memorize and track the chain\\(s\\) of variable assignment hidden in the following text.\n\n(?P<context>.*)\n"
    "Question: Find all variables that are assigned the value (?P<query>\\d+) in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the "
    "value {q}, they are: "
)
CWE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n(?P<context>.*)\nQuestion: What are the 10 most common words in the above list\\?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. (?P<context>.*)\nQuestion: Do not provide any explanation. Please ignore the dots "
    "'....'. What are the three most frequently appeared words in the above coded text\\?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
NUMBER, UUID = r"\d{7}", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
WORD_KEY = r"[^\n]+?-[^\n]+?"  # an adjective-noun pair (either may hold spaces)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def samples(tokenizer) -> dict[str, ruler.Sample]:
    return {task: ruler.make_sample(task, 2048, 3, tokenizer, seed=7) for task in ruler.TASKS}


def _needles(context: str, v: str, key: str, value: str) -> list[tuple[str, str]]:
    return re.findall(f"One of the special magic {v} for ({key}) is: ({value})\\.", context)


def _full(pattern: str, text: str) -> re.Match:
    match = re.fullmatch(pattern, text, flags=re.S)
    assert match is not None, text[:300]
    return match


@pytest.mark.parametrize(
    ("task", "value", "key"),
    [("niah_single_1", NUMBER, WORD_KEY), ("niah_multikey_2", NUMBER, WORD_KEY), ("niah_multikey_3", UUID, UUID)],
)
def test_niah_line_haystacks(samples, task: str, value: str, key: str) -> None:
    s = samples[task]
    m = _full(SINGLE.format(v="number" if value == NUMBER else "uuid"), s.input)
    query = m["query"]
    assert s.answer_prefix == SINGLE_PREFIX.format(v="number" if value == NUMBER else "uuid", q=query)
    lines = m["context"].split("\n")
    needles = [(k, v) for k, v in _needles(m["context"], "numbers" if value == NUMBER else "uuids", key, value)]
    if task == "niah_single_1":  # noise lines and exactly one needle
        assert len(needles) == 1 and sum(line == NOISE for line in lines) == len(lines) - 1
    else:  # every line is a needle; the queried key's is the answer
        assert len(needles) == len(lines)
    assert [v for k, v in needles if k == query] == s.outputs and len(s.outputs) == 1


@pytest.mark.parametrize("task", ["niah_single_2", "niah_single_3", "niah_multikey_1"])
def test_niah_essay_single_answer(samples, task: str) -> None:
    s = samples[task]
    v = "uuid" if task == "niah_single_3" else "number"
    m = _full(SINGLE.format(v=v), s.input)
    assert s.answer_prefix == SINGLE_PREFIX.format(v=v, q=m["query"])
    needles = _needles(m["context"], v + "s", WORD_KEY, UUID if v == "uuid" else NUMBER)
    assert len(needles) == (4 if task == "niah_multikey_1" else 1)
    assert len({k for k, _ in needles}) == len(needles)
    assert [val for k, val in needles if k == m["query"]] == s.outputs
    # Between the needles: the language reference's sentences, in their order from the start
    rest = re.sub(r" ?One of the special magic \S+ for .+? is: \S+\.", "", m["context"])
    assert rest.startswith(" ".join(ruler.essay_sentences()[:3]))


def test_niah_multivalue_and_multiquery(samples) -> None:
    s = samples["niah_multivalue"]
    m = _full(PLURAL.format(v="numbers"), s.input)
    assert s.answer_prefix == PLURAL_PREFIX.format(v="numbers", q=m["query"])
    needles = _needles(m["context"], "numbers", WORD_KEY, NUMBER)
    assert {k for k, _ in needles} == {m["query"]} and sorted(v for _, v in needles) == sorted(s.outputs)
    assert len(s.outputs) == 4

    s = samples["niah_multiquery"]
    m = _full(PLURAL.format(v="numbers"), s.input)
    assert s.answer_prefix == PLURAL_PREFIX.format(v="numbers", q=m["query"])
    keys = re.fullmatch(r"(.+), (.+), (.+), and (.+)", m["query"]).groups()
    found = dict(_needles(m["context"], "numbers", WORD_KEY, NUMBER))
    assert [found[k] for k in keys] == s.outputs


def test_vt(samples) -> None:
    s = samples["vt"]
    # A worked example with 3-letter names, its answer prefix, a space and its answer (RULER's double space), a
    # blank line, then the question
    head, question = re.fullmatch(r"(.*they are:  [A-Z]{3}(?: [A-Z]{3}){4})\n\n(.*)", s.input, flags=re.S).groups()
    example = _full(VT + re.escape(" Answer: According to the chain(s)") + ".*", head)
    example_prompt = head[: head.rindex("they are: ") + len("they are: ")]
    # fitted to 500 tokens on one draw of names, as RULER does; another draw may differ by a token or two
    assert (
        example["context"].count("VAR ") == 9
        and len(encode_prompt(load_tokenizer(SHIPPED_MODEL), example_prompt)) <= 505
    )
    m = _full(VT, question)
    assert s.answer_prefix == VT_PREFIX.format(q=m["query"])
    lines = [line for line in m["context"].split("\n") if line != NOISE]
    names = [re.fullmatch(r"VAR ([A-Z]{5}) = .*", line)[1] for line in lines]
    assert lines[0] == f"VAR {names[0]} = {m['query']}"
    assert lines[1:] == [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    assert s.outputs == names


def test_cwe(samples) -> None:
    s = samples["cwe"]
    # The worked example (template, answer prefix and its answer), a newline, then the question
    shot, question = s.input.split("\nBelow is a numbered list of words.")
    question = "Below is a numbered list of words." + question
    example = re.fullmatch(
        CWE.replace("(?P<context>.*)", "(?P<context>[^\n]*)") + re.escape(CWE_PREFIX) + " (.*)", shot
    )
    assert example is not None and re.fullmatch(r"(\d+\. [^ ]+ ?){10}", example[2])
    m = _full(CWE, question)
    assert s.answer_prefix == CWE_PREFIX
    entries = re.findall(r"(\d+)\. (\S+)", m["context"])
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    # Under 4096 tokens RULER's short setting: the 10 common words 6 times each, the others once
    assert sorted(counts[w] for w in s.outputs) == [6] * 10
    assert all(c == 1 for w, c in counts.items() if w not in s.outputs)


def test_fwe(samples) -> None:
    s = samples["fwe"]
    m = _full(FWE, s.input)
    assert s.answer_prefix == FWE_PREFIX
    counts = Counter(m["context"].split(" "))
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert counts.most_common(1)[0][0] == "..."
    assert set(s.outputs) == set(ranked[:3]) and all(len(w) == 6 for w in s.outputs)
    assert counts[s.outputs[0]] >= counts[s.outputs[1]] >= counts[s.outputs[2]] > counts[ranked[3]]


def test_scoring_as_ruler_defines_it() -> None:
    # string_match_all: the fraction of references found, case-insensitively; part: any of them
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789", "000"]) == 0.5
    assert ruler.string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert ruler.string_match_all("nothing", ["x"]) == 0.0
    assert ruler.string_match_part("only 789 here", ["123", "789"]) == 1.0
    assert ruler.string_match_part("none", ["123", "789"]) == 0.0
    # the prediction is stripped and control characters become newlines before matching
    assert ruler.postprocess("  12\x0034\t \n") == "12\n34"
    assert ruler.score("niah_single_1", " 12\x0034", ["1234"]) == 0.0
    assert ruler.score("vt", " AAAAA BBBBB", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.5
    assert ruler.zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-12)


@pytest.mark.parametrize("length", [2048, 4096])
def test_lengths_within_tolerance(tokenizer, length: int) -> None:
    for task, spec in ruler.TASKS.items():
        s = ruler.make_sample(task, length, 0, tokenizer)
        used = len(encode_prompt(tokenizer, s.prompt)) + spec.max_new_tokens  # counted on the whole prompt
        assert used == s.tokens + spec.max_new_tokens
        # never over; under by less than one haystack unit (the largest here: a uuid needle line, ~50 tokens)
        assert length - 64 <= used <= length, (task, used)


def test_tight_lengths_draw_again(tokenizer) -> None:
    """cwe at 4096 is near its shortest with this tokenizer: draws that cannot fit are replaced, never overlong."""
    for index in range(6):
        s = ruler.make_sample("cwe", 4096, index, tokenizer)
        assert len(encode_prompt(tokenizer, s.prompt)) + 120 <= 4096
    with pytest.raises(InputError, match="cwe at length 900 does not fit"):
        ruler.make_sample("cwe", 900, 0, tokenizer)


def test_pieces_encode_like_the_whole_text(tokenizer) -> None:
    text = ruler.make_sample("niah_multikey_3", 48 * 1024, 0, tokenizer).prompt
    assert len(text) > 4 * ruler.PIECE_CHARS
    assert ruler._encode(tokenizer, text) == encode_prompt(tokenizer, text)


def test_deterministic_by_seed(tokenizer) -> None:
    for task in ("niah_multikey_2", "vt", "cwe", "fwe"):
        a = ruler.make_sample(task, 1024, 1, tokenizer, seed=3)
        assert (a.input, a.outputs) == (lambda b: (b.input, b.outputs))(
            ruler.make_sample(task, 1024, 1, tokenizer, seed=3)
        )
        assert a.outputs != ruler.make_sample(task, 1024, 1, tokenizer, seed=4).outputs
        assert a.outputs != ruler.make_sample(task, 1024, 2, tokenizer, seed=3).outputs


class _Oracle:
    """A stand-in model that continues each known prompt with the given text (truncated to the new tokens)."""

    device = "cpu"

    def __init__(self, tokenizer, continuations: dict[tuple[int, ...], str]):
        self.tokenizer, self.continuations = tokenizer, continuations

    def generate(self, input_ids, *, max_new_tokens: int, **_):
        import torch

        text = self.continuations[tuple(input_ids[0].tolist())]
        new = encode_prompt(self.tokenizer, text, bos=False)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


@pytest.mark.parametrize("first_only", [False, True])
def test_run_scores_answers(tokenizer, first_only: bool) -> None:
    """All answers in the continuation score 1; only the first scores 1 / (number of answers) (string_match_all)."""
    tasks, length, n = list(ruler.TASKS), 2048, 2
    expected = {(t, i): ruler.make_sample(t, length, i, tokenizer, seed=5) for t in tasks for i in range(n)}
    said = {k: s.outputs[:1] if first_only else s.outputs for k, s in expected.items()}
    oracle = _Oracle(tokenizer, {tuple(s.ids): " " + ", ".join(said[k]) + "." for k, s in expected.items()})
    records = ruler.run_ruler(oracle, tokenizer, tasks=tasks, lengths=[length], samples=n, seed=5, progress=False)
    assert [(r["task"], r["index"]) for r in records] == list(expected)
    for r in records:
        assert r["score"] == pytest.approx(len(said[r["task"], r["index"]]) / len(r["outputs"])), r
    summary = ruler.summarize(records)
    assert [c["task"] for c in summary] == tasks
    assert all(
        c["score"] == pytest.approx(1 / len(expected[c["task"], 0].outputs) if first_only else 1) for c in summary
    )


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", "ruler", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_end_to_end(tmp_path, capsys, bf16_cpu_attention) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    code, stdout, _ = _run(
        capsys,
        "--tasks",
        "niah_single_1,fwe",
        "--lengths",
        "1k",
        "--samples",
        "2",
        "--out",
        str(out),
        "--plot",
        str(plot),
    )
    assert code == 0 and plot.stat().st_size > 0
    assert re.search(r"niah_single_1\s+\d+\.\d", stdout) and "fwe" in stdout
    record = json.loads(out.read_text())
    assert record["settings"]["complete"] is True and record["settings"]["lengths"] == [1024]
    assert [(c["task"], c["length"]) for c in record["summary"]] == [("niah_single_1", 1024), ("fwe", 1024)]
    assert all(0 <= c["score"] <= 1 for c in record["summary"])
    assert len(record["records"]) == 4
    for r in record["records"]:
        assert {"task", "length", "index", "prediction", "outputs", "score"} <= set(r)
        assert r["score"] == ruler.score(r["task"], r["prediction"], r["outputs"])
    by_task = {t: [r["score"] for r in record["records"] if r["task"] == t] for t in ("niah_single_1", "fwe")}
    assert [c["score"] for c in record["summary"]] == [sum(v) / 2 for v in by_task.values()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "niah_single_1,nope"], "unknown RULER task(s) nope"),
        (["--tasks", "vt", "--lengths", "300"], "length 300 is too short for vt"),
        (["--tasks", "cwe", "--lengths", "1000"], "length 1000 is too short for cwe"),
    ],
)
def test_bad_input_is_one_line(capsys, args: list[str], message: str) -> None:
    code, _, err = _run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err


def test_bench_ruler_tiny_run_records_throughput(tmp_path):
    """benchmarks/bench_ruler.py in its tiny mode: one throughput record per task with its timings, a past deadline
    records the remaining tasks as skipped."""
    out = tmp_path / "ruler.json"
    result = run_benchmark(
        "bench_ruler.py", "--tiny", "--device", "cpu", "--tasks", "niah_single_1,vt", "--samples", "1",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    done = {r["task"]: r for r in records if r["benchmark"] == "ruler_throughput"}
    assert set(done) == {"niah_single_1", "vt"}
    for task, record in done.items():
        assert (
            record["samples"] == 1
            and record["length"] == 2048
            and record["max_new_tokens"] == ruler.TASKS[task].max_new_tokens
        )
        assert record["samples_per_minute"] == pytest.approx(
            60 / (record["make_seconds"] + record["answer_seconds"]), rel=0.05
        )
        assert 0 < record["mean_tokens"] <= 2048
    out.unlink()
    late = run_benchmark(
        "bench_ruler.py", "--tiny", "--device", "cpu", "--tasks", "vt", "--deadline", "0", "--out", str(out)
    )
    assert late.returncode == 0, late.stderr[-2000:]
    assert [r.get("skipped") for r in json.loads(out.read_text()) if r["benchmark"] == "ruler_throughput"] == [True]
