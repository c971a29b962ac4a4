"""RULER's synthetic long-context tasks (docs/evaluation.md#ruler), generated offline and sized in the model's tokens.

RULER (Hsieh et al., arXiv 2404.06654; github.com/NVIDIA/RULER) asks a model to find, trace and count things in a
long haystack. This module follows its task definitions, templates, answer prefixes, generation budgets and scoring
for the eleven synthetic tasks: needle-in-a-haystack in eight variants (niah_*), variable tracking (vt), common
words (cwe) and frequent words (fwe). RULER's two QA tasks need SQuAD / HotpotQA downloads and are not here.

What differs from RULER, so the numbers are **not comparable with published ones**:

* the "essay" haystack: RULER uses Paul Graham's essays (a download). Here it is the prose of the Python language
  reference that ships with CPython (`pydoc_data.topics`): its unindented paragraphs, split into sentences at
  ". X"-style boundaries, repeated when a length needs more. The "noise" haystack (the grass-is-green sentence) and
  the "needle" haystack (distractor needles) are RULER's own.
* words: RULER's `wonderwords` lists (nouns, adjectives, verbs; keys are adjective-noun pairs) are used as RULER
  does; where cwe needs more distinct words than those lists hold (lengths past ~128k), adjective-noun pairs stand in
  for RULER's `english_words.json`.
* randomness: each sample draws from its own `random.Random` seeded by (seed, task, length, index), so a sample is
  the same whichever other tasks, lengths or counts are asked for; RULER draws from one stream per task file.
* fitting: RULER binary-searches the haystack size on one sample and shrinks later samples that overflow; here
  every sample is fitted on its own (interpolation search on its exact token count), so each is the longest of its
  kind that fits: prompt tokens (BOS and answer prefix included) + the task's new tokens <= the length.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import random
import re
import string
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longllama.errors import InputError

if TYPE_CHECKING:
    from longllama.cli import LoadOptions

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Templates and task settings (RULER's scripts/data/synthetic/constants.py and scripts/synthetic.yaml)

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {num_cw} most common words in the above list?"
)
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Needle depths in percent of the essay's sentences: 40 evenly spaced, rounded (RULER's DEPTHS).
DEPTHS = [round(100 * i / 39) for i in range(40)]


@dataclass(frozen=True)
class Task:
    """One RULER task: its generator (`kind`), the generator's settings, new tokens and metric."""

    name: str
    kind: str  # niah, vt, cwe, fwe
    max_new_tokens: int
    args: dict[str, Any] = field(default_factory=dict)
    metric: str = "all"  # string_match_all; "part" is string_match_part (RULER's QA tasks)


def _niah(name: str, haystack: str, k: str = "words", v: str = "numbers", *, nk=1, nv=1, nq=1) -> Task:
    args = {"haystack": haystack, "type_k": k, "type_v": v, "num_k": nk, "num_v": nv, "num_q": nq}
    return Task(name, "niah", 128, args)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", v="uuids"),
        _niah("niah_multikey_1", "essay", nk=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", k="uuids", v="uuids"),
        _niah("niah_multivalue", "essay", nv=4),
        _niah("niah_multiquery", "essay", nq=4),
        Task("vt", "vt", 30, {"num_chains": 1, "num_hops": 4}),
        Task("cwe", "cwe", 120, {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10, "num_fewshot": 1}),
        Task("fwe", "fwe", 50, {"alpha": 2.0, "coded_wordlen": 6}),
    ]
}


# --------------------------------------------------------------------------------------------------------------------
# Scoring (RULER's scripts/eval/synthetic/constants.py, per sample and on a 0-1 scale)


def postprocess(prediction: str) -> str:
    """The prediction stripped, control characters turned into newlines (as RULER's evaluate.py does)."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The fraction of references found in the prediction, case-insensitively."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any reference is found in the prediction (case-insensitively), else 0."""
    text = prediction.lower()
    return float(any(r.lower() in text for r in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"all": string_match_all, "part": string_match_part}


def score(task: str, prediction: str, references: Sequence[str]) -> float:
    """A sample's score in [0, 1] under its task's metric, on the post-processed prediction."""
    return METRICS[TASKS[task].metric](postprocess(prediction), references)


# --------------------------------------------------------------------------------------------------------------------
# Word lists and the offline essay


@functools.cache
def _wonderwords() -> tuple[list[str], list[str], list[str]]:
    try:
        from wonderwords import RandomWord
    except ImportError as exc:
        raise InputError(f"wonderwords is not installed ({exc}): pip install 'longllama[eval]'") from None
    words = RandomWord()
    return tuple(sorted(set(words.filter(include_categories=[c]))) for c in ("noun", "adjective", "verb"))


def key_word(index: int) -> str:
    """RULER's needle keys: adjective-noun pairs of the wonderwords lists, by index in [0, key_words_count())."""
    nouns, adjectives, _ = _wonderwords()
    return f"{adjectives[index // len(nouns)]}-{nouns[index % len(nouns)]}"


def key_words_count() -> int:
    """How many needle keys there are (adjectives x nouns)."""
    nouns, adjectives, _ = _wonderwords()
    return len(nouns) * len(adjectives)


@functools.cache
def common_words() -> list[str]:
    """cwe's words: nouns, adjectives and verbs without repeats, sorted."""
    nouns, adjectives, verbs = _wonderwords()
    return sorted(set(nouns + adjectives + verbs))


@functools.cache
def essay_sentences() -> list[str]:
    """The offline "essay" haystack: sentences of the Python language reference's prose (`pydoc_data.topics`)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise InputError(f"pydoc_data is missing from this Python ({exc}): use a full CPython install") from None
    paragraphs = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.strip("\n").splitlines()
            # Indented blocks are code or grammar, and rule lines underline headings: prose is the rest.
            if lines and not lines[0][:1].isspace() and not re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                paragraphs.append(" ".join(paragraph.split()))
    text = " ".join(paragraphs)
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text) if s]


# --------------------------------------------------------------------------------------------------------------------
# Generators: a sample is (input, answer prefix, outputs), drawn from `rng` with `n` haystack units


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return key_word(rng.randrange(key_words_count()))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert_at_fractions(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """`items` placed among `units` at the given fractions of their length (item order kept)."""
    out, start = [], 0
    for item, at in zip(items, sorted(fractions)):
        cut = int(at * len(units))
        out.extend(units[start:cut])
        out.append(item)
        start = cut
    return out + units[start:]


def _essay(n: int) -> list[str]:
    sentences = essay_sentences()
    return [sentences[i % len(sentences)] for i in range(n)]


def niah(
    rng: random.Random, n: int, *, haystack: str, type_k: str, type_v: str, num_k: int, num_v: int, num_q: int
) -> tuple[str, str, list[str]]:
    """A needle-in-a-haystack sample with `n` haystack units (essay sentences, noise lines or distractor needles):
    (input, answer prefix, answers)."""
    num_k = max(num_k, num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, type_k))
        values.append([_random_value(rng, type_v) for _ in range(num_v)])
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    queried = rng.sample(range(num_k), num_q)
    if haystack == "essay":
        depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
        context = " ".join(_insert_at_fractions(_essay(n), needles, depths))
    else:
        fractions = [rng.random() for _ in needles]
        if haystack == "noise":
            units = [NOISE] * n
        else:  # distractor needles, drawn last so the real ones do not depend on n
            units = [
                NEEDLE.format(type_needle_v=type_v, key=_random_value(rng, type_k), value=_random_value(rng, type_v))
                for _ in range(n)
            ]
        context = "\n".join(_insert_at_fractions(units, needles, fractions))
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if num_q * num_v == 1:  # one answer: RULER turns the template singular
        template, prefix = _singular(template), _singular(prefix)
        type_v = type_v[:-1]
    slots = {"type_needle_v": type_v, "query": query}
    return template.format(context=context, **slots), prefix.format(**slots), [v for i in queried for v in values[i]]


def _singular(text: str) -> str:
    for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, single)
    return text


def _chain(rng: random.Random, num_hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < num_hops + 1:  # distinct variable names
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99998))  # numpy's randint(10000, 99999) in RULER: 99999 never drawn
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, lines


def _vt_text(rng: random.Random, n: int, num_chains: int, num_hops: int, letters: int) -> tuple[str, str, list[str]]:
    chains = [_chain(rng, num_hops, letters) for _ in range(num_chains)]
    sentences = [NOISE] * n
    for _, lines in chains:
        # A chain's lines keep their order, each at its own noise position (RULER's insert at p + j).
        positions = sorted(rng.sample(range(len(sentences)), len(lines)))
        for j, (at, line) in enumerate(zip(positions, lines)):
            sentences.insert(at + j, line)
    context = "\n".join(sentences).replace(". \n", ".\n")
    names, lines = chains[0]
    value = lines[0].split("=")[-1].strip()
    prefix = VT_PREFIX.format(num_v=num_hops + 1, query=value)
    return VT_TEMPLATE.format(context=context, query=value), prefix, names


VT_EXAMPLE_TOKENS = 500  # RULER's worked example: the same task with 3-letter names, fitted to 500 tokens


def vt(rng: random.Random, n: int, *, num_chains: int, num_hops: int, example_noise: int) -> tuple[str, str, list[str]]:
    """A variable-tracking sample with `n` noise lines, after a worked example with `example_noise` of them."""
    example_input, example_prefix, example_answer = _vt_text(rng, example_noise, num_chains, num_hops, 3)
    example = example_input + example_prefix + " " + " ".join(example_answer) + "\n"
    text, prefix, answer = _vt_text(rng, n, num_chains, num_hops, 5)
    return example + "\n" + text, prefix, answer


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng: random.Random, n: int, repeats: int, uncommon_repeats: int, num_cw: int):
    if n <= len(common_words()):
        chosen = rng.sample(common_words(), n)
    else:  # more words than the lists hold: adjective-noun pairs (RULER takes english_words.json here)
        chosen = [key_word(i) for i in rng.sample(range(key_words_count()), n)]
    common, uncommon = chosen[:num_cw], chosen[num_cw:]
    listed = common * repeats + uncommon * uncommon_repeats
    rng.shuffle(listed)
    return _numbered(listed), common


def cwe(
    rng: random.Random, n: int, *, freq_cw: int, freq_ucw: int, num_cw: int, num_fewshot: int, short: bool
) -> tuple[str, str, list[str]]:
    """A common-words sample listing `n` distinct words; `short` (lengths under 4096) uses RULER's smaller worked
    example and repeats."""
    shots = []
    for _ in range(num_fewshot):
        context, answer = _cwe_list(rng, 20, 3, 1, num_cw) if short else _cwe_list(rng, 40, 10, 3, num_cw)
        shots.append(
            CWE_TEMPLATE.format(context=context, num_cw=num_cw)
            + CWE_PREFIX.format(num_cw=num_cw)
            + " "
            + _numbered(answer)
        )
    context, answer = _cwe_list(rng, n, 6, 1, num_cw) if short else _cwe_list(rng, n, freq_cw, freq_ucw, num_cw)
    text = "\n".join(shots) + "\n" + CWE_TEMPLATE.format(context=context, num_cw=num_cw)
    return text, CWE_PREFIX.format(num_cw=num_cw), answer


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1: a partial sum and its Euler-Maclaurin tail (error far below 1e-9 at 1000 terms)."""
    partial = math.fsum(k**-s for k in range(1, terms))
    return partial + terms ** (1 - s) / (s - 1) + terms**-s / 2 + s * terms ** (-s - 1) / 12


def fwe(rng: random.Random, n: int, *, alpha: float, coded_wordlen: int, vocab_size: int) -> tuple[str, str, list[str]]:
    """A frequent-words sample of about `n` coded words with Zipf(alpha) counts over `vocab_size` words."""
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise the prompt tells the model to ignore
    norm = zeta(alpha)
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k**-alpha / norm))]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, ranked[1:4]


# --------------------------------------------------------------------------------------------------------------------
# Samples fitted to a length in tokens


@dataclass
class Sample:
    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: list[str]
    units: int  # haystack units (sentences, lines or words) that fitted
    ids: list[int] = field(repr=False)  # prompt (input + answer prefix) token ids, BOS first

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


def _builder(task: Task, length: int, tokenizer, key: str) -> Callable[[int], tuple[str, str, list[str]]]:
    """n -> (input, prefix, outputs) of one sample; every call starts the sample's random stream afresh."""
    args = dict(task.args)
    if task.kind == "vt":
        args["example_noise"] = _vt_example_noise(tokenizer, task)
    elif task.kind == "cwe":
        args["short"] = length < 4096
    elif task.kind == "fwe":
        args["vocab_size"] = max(4, (length - task.max_new_tokens) // 50)
    generate = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe}[task.kind]
    return lambda n: generate(random.Random(key), n, **args)


def _vt_example_noise(tokenizer, task: Task) -> int:
    def count(n: int) -> int:
        text, prefix, _ = _vt_text(random.Random(0), n, task.args["num_chains"], task.args["num_hops"], 3)
        return _count(tokenizer, text + prefix)  # as RULER: the example's prompt, without its answer

    return _fit(count, VT_EXAMPLE_TOKENS, _min_units(task), what="vt's worked example")[0]


def _min_units(task: Task) -> int:
    if task.kind == "niah":
        return 1
    if task.kind == "vt":
        return task.args["num_hops"] + 1  # the chain's lines each take a noise position
    if task.kind == "cwe":
        return task.args["num_cw"] + 1
    return 10


def _count(tokenizer, text: str) -> int:
    return len(_encode(tokenizer, text))


PIECE_CHARS = 16384  # long prompts are encoded in pieces of about this many characters (see _encode)
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")


def _encode(tokenizer, text: str) -> list[int]:
    """The prompt's ids, BOS first: `encode_prompt`'s, computed in pieces where that gives the same ids.

    A tokenizer without a pre-tokenizer (SentencePiece's way, as `longllama.tokenizer` builds it) runs BPE over the
    whole text as one word, which is slow on a million tokens. When no vocabulary piece holds a space mark after a
    non-space, no token can span a single space between two words, so encoding the text cut at such spaces (each
    piece getting the dummy-prefix mark the space would have become) gives the same ids, in parallel.
    """
    from longllama.tokenizer import encode_prompt

    if len(text) < 2 * PIECE_CHARS or not _cuts_at_spaces(tokenizer):
        return encode_prompt(tokenizer, text, bos=True)
    pieces, start = [], 0
    while (cut := _SPACE_CUT.search(text, start + PIECE_CHARS)) is not None:
        pieces.append(text[start : cut.start()])
        start = cut.end()
    pieces.append(text[start:])
    encoded = tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False)
    return [tokenizer.bos_token_id, *(i for e in encoded for i in e.ids)]


def _cuts_at_spaces(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is not None or tokenizer.bos_token_id is None:
        return False
    if 'Prepend(prepend="\u2581")' not in repr(backend.normalizer):
        return False
    return not any("\u2581" in piece.lstrip("\u2581") for piece in backend.get_vocab())


def _fit(count: Callable[[int], int], budget: int, lo: int, *, what: str) -> tuple[int, int]:
    """A large n >= lo with count(n) <= budget, and its count: within one unit's tokens or 0.1 % of the budget.

    Interpolation search: the token count is close to linear in n, so each probe aims just below where the line
    through the nearest known points meets the budget. Long probes are the expensive part (a 1M-token prompt takes
    seconds to tokenize); this needs two or three of them where bisection needs about twenty.
    """
    t_lo = count(lo)
    if t_lo > budget:
        raise InputError(
            f"{what} does not fit: its shortest prompt has {t_lo} tokens, more than the {budget} it may use; "
            "ask for a longer length"
        )
    good, bad = (lo, t_lo), None  # the largest n known to fit and the smallest known not to, with their counts
    probe = lo + 16  # a short first probe measures the tokens per unit
    while bad is None or bad[0] > good[0] + 1:
        t = count(probe)
        if t <= budget:
            good = (probe, t)
        else:
            bad = (probe, t)
        far = bad if bad is not None else (lo, t_lo)
        rate = max(abs(far[1] - good[1]) / max(abs(far[0] - good[0]), 1), 1e-6)  # tokens per unit
        tolerance = max(rate, budget / 1000)
        if budget - good[1] < tolerance:
            break
        step = max(1, math.floor((budget - tolerance / 2 - good[1]) / rate))
        if bad is None and good[0] - lo < 256:
            step = min(step, 32 * (good[0] - lo + 16))  # the rate of a few units is a rough guess: grow boundedly
        probe = good[0] + step if bad is None else min(good[0] + step, bad[0] - 1)
    return good


DRAWS = 10  # a sample whose shortest form is over its length is drawn again, at most this many times in all


def make_sample(task_name: str, length: int, index: int, tokenizer, *, seed: int = 0) -> Sample:
    """Sample `index` of `task_name` fitted to `length` tokens (prompt + the task's new tokens) for `tokenizer`.

    Near a task's shortest length some draws (long words, say) do not fit even with the least haystack; those are
    drawn again from the next stream, as RULER's generators skip or retry them, so the sample stays deterministic.
    """
    task = _task(task_name)
    for draw in range(DRAWS):
        key = f"ruler:{seed}:{task.name}:{length}:{index}" + (f":{draw}" if draw else "")
        try:
            return _fitted_sample(task, length, index, tokenizer, key)
        except InputError:
            if draw == DRAWS - 1:
                raise
    raise AssertionError("unreachable")


def _fitted_sample(task: Task, length: int, index: int, tokenizer, key: str) -> Sample:
    build = _builder(task, length, tokenizer, key)
    last: dict[int, tuple[tuple[str, str, list[str]], list[int]]] = {}

    def count(n: int) -> int:
        built = build(n)
        last[n] = (built, _encode(tokenizer, built[0] + built[1]))
        return len(last[n][1])

    what = f"{task.name} at length {length}"
    units, _ = _fit(count, length - task.max_new_tokens, _min_units(task), what=what)
    (text, prefix, outputs), ids = last[units]
    if any(o not in text for o in outputs):  # the generators' own invariant: every answer is in the context
        raise AssertionError(f"{task.name} sample {index}: an answer is missing from its text")
    return Sample(task.name, length, index, text, prefix, outputs, units, ids)


def _task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(f"unknown RULER task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def check_lengths(tokenizer, tasks: Sequence[str], lengths: Sequence[int], *, seed: int = 0) -> None:
    """Fail (one line) before any model work when a task is unknown or a length cannot hold its shortest prompt."""
    for name in tasks:
        _task(name)
    for name in tasks:
        for length in lengths:
            task = TASKS[name]
            build = _builder(task, length, tokenizer, f"ruler:{seed}:{name}:{length}:0")
            lo = _min_units(task)
            shortest = _count(tokenizer, "".join(build(lo)[:2])) + task.max_new_tokens
            if shortest > length:
                raise InputError(
                    f"length {length} is too short for {name}: its shortest prompt and {task.max_new_tokens} new "
                    f"tokens need {shortest} tokens; ask for at least {shortest}"
                )


# --------------------------------------------------------------------------------------------------------------------
# Running a model


def predict(model, tokenizer, sample: Sample) -> str:
    """Greedy continuation of the sample's prompt (answer prefix included), up to the task's new tokens."""
    import torch

    input_ids = torch.tensor([sample.ids], dtype=torch.long, device=getattr(model, "device", None))
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=TASKS[sample.task].max_new_tokens,
    )
    return tokenizer.decode(output[0, len(sample.ids) :].tolist(), skip_special_tokens=True)


def run_ruler(
    model,
    tokenizer,
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int = 0,
    progress: bool = True,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per (task, length, index), lengths outermost: generate, predict, score."""
    grid = [(length, task, i) for length in lengths for task in tasks for i in range(samples)]
    records: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(grid), desc="ruler", unit="sample", file=sys.stderr, disable=not progress) as bar:
        for length, task, index in grid:
            start = time.perf_counter()
            sample = make_sample(task, length, index, tokenizer, seed=seed)
            made = time.perf_counter()
            prediction = predict(model, tokenizer, sample)
            done = time.perf_counter()
            records.append(
                {
                    "task": task,
                    "length": length,
                    "index": index,
                    "tokens": sample.tokens,
                    "units": sample.units,
                    "answer_prefix": sample.answer_prefix,
                    "outputs": sample.outputs,
                    "prediction": prediction,
                    "score": score(task, prediction, sample.outputs),
                    "generate_seconds": round(made - start, 3),  # the sample's text, on the CPU
                    "model_seconds": round(done - made, 3),  # reading it and answering
                }
            )
            bar.update(1)
            bar.set_postfix(task=task, length=length)
            if on_record is not None:
                on_record(records)
    return records


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score per (task, length), tasks in RULER's order, lengths ascending."""
    cells = []
    for task in [t for t in TASKS if any(r["task"] == t for r in records)]:
        for length in sorted({r["length"] for r in records if r["task"] == task}):
            group = [r for r in records if r["task"] == task and r["length"] == length]
            cells.append(
                {
                    "task": task,
                    "length": length,
                    "score": sum(r["score"] for r in group) / len(group),
                    "samples": len(group),
                    "mean_tokens": sum(r["tokens"] for r in group) / len(group),
                    "samples_per_minute": _per_minute(group),
                }
            )
    return cells


def _per_minute(group: Sequence[dict[str, Any]]) -> float | None:
    """Samples per minute, making and answering them one after the other (None for records without timings)."""
    seconds = [r.get("generate_seconds", 0) + r.get("model_seconds", 0) for r in group if "model_seconds" in r]
    return round(60 * len(seconds) / sum(seconds), 2) if seconds and sum(seconds) > 0 else None


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """Scores in percent: one row per task, one column per length, and the mean over tasks."""
    tasks = list(dict.fromkeys(c["task"] for c in summary))
    lengths = sorted({c["length"] for c in summary})
    cell = {(c["task"], c["length"]): c["score"] for c in summary}
    rows = [["task", *map(_length_label, lengths)]]
    for task in tasks:
        rows.append([task, *(_percent(cell.get((task, length))) for length in lengths)])
    means = [[cell[(t, length)] for t in tasks if (t, length) in cell] for length in lengths]
    rows.append(["mean", *(_percent(sum(m) / len(m)) for m in means)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(r, widths))) for r in rows
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _length_label(length: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)


def plot_summary(summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A task x length heatmap of scores."""
    import numpy as np
    from matplotlib.figure import Figure

    from longllama.evals.records import plot_format, replace_atomically

    fmt = plot_format(path)
    tasks = list(dict.fromkeys(c["task"] for c in summary))
    lengths = sorted({c["length"] for c in summary})
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for c in summary:
        grid[tasks.index(c["task"]), lengths.index(c["length"])] = c["score"]
    figure = Figure(figsize=(2.5 + 1.1 * len(lengths), 1.2 + 0.4 * len(tasks)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("length (tokens)")
    ax.set_title("RULER score (%)")
    figure.colorbar(image, ax=ax, label="score")
    return replace_atomically(Path(path), lambda tmp: figure.savefig(tmp, format=fmt, dpi=120))


# --------------------------------------------------------------------------------------------------------------------
# Command line


DESCRIPTION = (
    "RULER's synthetic long-context tasks (eight needle-in-a-haystack variants, variable tracking, common and "
    "frequent words), generated offline at lengths in the model's own tokens; greedy answers after RULER's answer "
    "prefixes, scored by string match. The essay haystack is Python's language reference, not RULER's essays: "
    "scores are not comparable with published ones (docs/evaluation.md#ruler)."
)


def add_parser(tasks, common) -> None:
    p = tasks.add_parser(
        "ruler", help="RULER's synthetic long-context tasks, generated offline", description=DESCRIPTION
    )
    common(p)
    p.add_argument("--tasks", type=_task_names, default=list(TASKS), metavar="A,B", help="tasks (default: all)")
    p.add_argument(
        "--lengths",
        type=_lengths,
        default=[4096],
        metavar="N,N",
        help="lengths in tokens (prompt + new tokens), a k suffix meaning x1024, m x1024^2 (default: 4k)",
    )
    p.add_argument(
        "--samples", type=_positive_int, default=10, metavar="N", help="samples per task and length (default 10)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw a task x length heatmap of scores")
    p.set_defaults(func=run)


def _task_names(text: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown RULER task(s) {', '.join(unknown) or repr(text)}: choose from {', '.join(TASKS)}"
        )
    return names


def _lengths(text: str) -> list[int]:
    from longllama.cli import _lengths as lengths_in_tokens

    return lengths_in_tokens(text)


def _positive_int(text: str) -> int:
    from longllama.cli import _positive_int as positive

    return positive(text)


def run(
    *,
    model: str | None,
    tasks: list[str],
    lengths: list[int],
    samples: int = 10,
    plot: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    load: LoadOptions | None = None,
) -> int:
    """`longllama eval ruler`: prints a task x length table; --out keeps the record, --plot draws a heatmap."""
    from longllama.cli import _model_folder, eval_model, output_file
    from longllama.evals import records as eval_records
    from longllama.tokenizer import load_tokenizer

    samples = min(samples, limit) if limit is not None else samples
    out_path = output_file(out)
    plot_path = output_file(plot, "--plot")
    if plot_path is not None:
        eval_records.plot_format(plot_path)
    # What can fail without the model fails before it loads.
    check_lengths(load_tokenizer(_model_folder(model)), tasks, lengths, seed=seed)
    folder, lm, tokenizer = eval_model(model, load)
    settings = {
        **eval_records.model_settings(folder, lm, load),
        "tasks": tasks,
        "lengths": lengths,
        "samples": samples,
        "seed": seed,
        "max_new_tokens": {t: TASKS[t].max_new_tokens for t in tasks},
        "haystack": "essay: Python language reference prose (pydoc_data.topics), not RULER's Paul Graham essays",
        "python": sys.version.split()[0],
    }

    def save_so_far(records: list[dict[str, Any]]) -> None:  # a run cut short keeps its finished samples
        eval_records.save_results(out_path, records, summarize(records), settings={**settings, "complete": False})

    records = run_ruler(
        lm,
        tokenizer,
        tasks=tasks,
        lengths=lengths,
        samples=samples,
        seed=seed,
        on_record=save_so_far if out_path is not None else None,
    )
    summary = summarize(records)
    print(format_table(summary))
    if out_path is not None:
        path = eval_records.save_results(out_path, records, summary, settings={**settings, "complete": True})
        print(f"wrote {path}", file=sys.stderr)
    if plot_path is not None:
        print(f"wrote {plot_summary(summary, plot_path)}", file=sys.stderr)
    return 0
