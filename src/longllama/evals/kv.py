"""Key-value retrieval (docs/evaluation.md#key-value-retrieval): several `key: value` lines hidden in the pass-key
filler, one key asked at the end, its value scored by exact match.

A harder needle than the pass key: the model must pick the asked line among several of the same shape, and the
values (numbers, hex strings) share no words with the question. The layout is the one the shipped model was trained
on (`kv_document` in scripts/corpus.py) with the pass-key filler around the lines, so the two tasks differ only in
what is hidden. Everything else is passkey.py's: the length calibration, the batched greedy scoring, the loop over
trials, the summaries, table, JSON file and plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longllama.errors import InputError
from longllama.evals import passkey
from longllama.evals.passkey import (  # noqa: F401  (summaries, table and files are this task's too)
    DEFAULT_LAST_CONTEXT_LENGTH,
    format_table,
    save_results,
    summarize,
)

INTRO_LINE = (
    "Some keys and their values are hidden in the text below, each on its own line as 'key: value'. "
    "Remember them; you will be asked for some of the values at the end."
)
QUESTION_LINE = "What is the value of {key}? The value of {key} is"
DEFAULT_PAIRS = 8
MAX_PAIRS = 10_000  # keys are drawn until distinct: far below the 2 million the word list and numbers allow
# Keys are two of these words and a three-digit number, e.g. "maple_orbit_417": lookalikes that differ in a word.
KEY_WORDS = tuple(
    "amber anchor apple arrow basket bridge candle canyon cedar copper coral desert ember falcon feather forest "
    "garden glacier harbor hollow island jacket ladder lantern maple meadow mirror orange orbit pebble pepper "
    "pillow planet rabbit ribbon river saddle silver spider summit thunder timber tunnel velvet violet walnut "
    "window winter".split()
)


@dataclasses.dataclass(frozen=True)
class KvPrompt:
    """A key-value prompt: its text, the hidden pairs in the order their lines appear, the asked key, and the filler
    characters before the asked key's line."""

    text: str
    pairs: dict[str, str]
    key: str
    asked_chars: int

    @property
    def value(self) -> str:
        """The answer: the asked key's value."""
        return self.pairs[self.key]


# --------------------------------------------------------------------------------------------------------------------
# Prompts


def kv_prompt(n_garbage: int, seed: int, *, pairs: int = DEFAULT_PAIRS) -> KvPrompt:
    """The key-value prompt with `n_garbage` filler characters and `pairs` hidden lines.

    One generator seeded with `seed` draws the pairs, then which key is asked, then where the filler is cut: the
    keys, values and asked key are the same at every filler size, only the lines' places move with it. numpy's
    global RNG is not touched.
    """
    passkey.check_n_garbage(n_garbage)
    _check_pairs(pairs)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed={seed!r} must be a whole number, 0 or more")
    rng = np.random.default_rng(seed)
    drawn = _draw_pairs(rng, pairs)
    asked = int(rng.integers(pairs))  # the index of the asked pair, whose line follows the asked-th cut
    cuts = sorted(int(c) for c in rng.integers(0, n_garbage + 1, size=pairs))
    garbage = passkey.filler(n_garbage)
    lines = [INTRO_LINE]
    for start, end, (key, value) in zip([0, *cuts], cuts, drawn.items()):
        lines += [garbage[start:end], f"{key}: {value}"]
    key = list(drawn)[asked]
    lines += [garbage[cuts[-1] :], QUESTION_LINE.format(key=key)]
    text = "\n".join(line for line in lines if line)  # a cut at another cut (or an end) leaves no filler between
    return KvPrompt(text=text, pairs=drawn, key=key, asked_chars=cuts[asked])


def _check_pairs(pairs: int) -> None:
    if isinstance(pairs, bool) or not isinstance(pairs, (int, np.integer)) or not 1 <= pairs <= MAX_PAIRS:
        raise InputError(f"pairs={pairs!r} must be a whole number of key-value lines from 1 to {MAX_PAIRS}")


def _draw_pairs(rng: np.random.Generator, count: int) -> dict[str, str]:
    """`count` pairs with distinct keys and distinct values (draw_value), keys as in training from KEY_WORDS."""
    pairs: dict[str, str] = {}
    values: set[str] = set()
    while len(pairs) < count:
        first, second = (KEY_WORDS[int(i)] for i in rng.integers(len(KEY_WORDS), size=2))
        key = f"{first}_{second}_{int(rng.integers(100, 1000))}"
        value = draw_value(rng)
        if key not in pairs and value not in values:
            pairs[key] = value
            values.add(value)
    return pairs


def draw_value(rng: np.random.Generator) -> str:
    """A value as the training documents draw it (scripts/corpus.py): 60% decimal numbers of 2-6 digits, else 8 hex
    digits."""
    if rng.random() < 0.6:
        return str(int(rng.integers(1, 10 ** int(rng.integers(2, 7)))))
    return f"{int(rng.integers(16**8)):08x}"


def asked_depth(prompt: KvPrompt, n_garbage: int) -> float:
    """The fraction of the filler before the asked line, rounded to 4 places (0: first, 1: right before the
    question)."""
    return round(prompt.asked_chars / n_garbage, 4)


# --------------------------------------------------------------------------------------------------------------------
# Lengths in tokens


def _text(seed: int, pairs: int) -> Callable[[int], str]:
    return lambda n_garbage: kv_prompt(n_garbage, seed, pairs=pairs).text


def n_garbage_for_tokens(tokenizer, tokens: int, *, seed: int = 0, pairs: int = DEFAULT_PAIRS) -> int:
    """Filler characters that make the prompt (seed, pairs) about `tokens` tokens long (passkey's calibration)."""
    return passkey.n_garbage_for_tokens(tokenizer, tokens, prompt=_text(seed, pairs))


def check_lengths(tokenizer, lengths: Sequence[int], *, seed: int = 0, pairs: int = DEFAULT_PAIRS) -> None:
    """Fail before any model work when a requested length cannot hold the prompt's fixed lines."""
    passkey.check_lengths(tokenizer, lengths, prompt=_text(seed, pairs))


# --------------------------------------------------------------------------------------------------------------------
# Trials


def run_kv(
    model,
    tokenizer,
    *,
    lengths: Sequence[int],
    trials: int,
    seed0: int = 0,
    pairs: int = DEFAULT_PAIRS,
    last_context_length: int | None = DEFAULT_LAST_CONTEXT_LENGTH,
    progress: bool = True,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
    batch: int = 1,
) -> list[dict[str, Any]]:
    """One record per (length, trial): seeds seed0 .. seed0 + trials - 1 at every length, `pairs` lines each; as
    run_passkey for the rest (one filler size per length calibrated on the first seed, `batch` trials of a length
    read together, `on_record` after every batch)."""
    _check_pairs(pairs)
    passkey.check_trials(trials, batch)
    check_lengths(tokenizer, lengths, seed=seed0, pairs=pairs)
    sizes = {length: n_garbage_for_tokens(tokenizer, length, seed=seed0, pairs=pairs) for length in lengths}

    def score(length: int, seeds: list[int]) -> list[dict[str, Any]]:
        return _trials(model, tokenizer, length, sizes[length], pairs, seeds, last_context_length=last_context_length)

    return passkey.run_trials(
        list(lengths), score, trials=trials, seed0=seed0, batch=batch, name="kv", progress=progress, on_record=on_record
    )


def _trials(
    model,
    tokenizer,
    length: int,
    n_garbage: int,
    pairs: int,
    seeds: Sequence[int],
    *,
    last_context_length: int | None,
) -> list[dict[str, Any]]:
    """One record per seed, the prompts read as one batch."""
    prompts = [kv_prompt(n_garbage, seed, pairs=pairs) for seed in seeds]
    scored = passkey.score_passkeys(
        model, tokenizer, [(p.text, p.value) for p in prompts], last_context_length=last_context_length
    )
    records = []
    for seed, prompt, result in zip(seeds, prompts, scored):
        own = {
            "length": length,
            "tokens": result["tokens"],
            "n_garbage": n_garbage,
            "depth": None,  # the lines' places are random: passkey's summaries show one "random" column
            "pairs": pairs,
            "seed": seed,
            "key": prompt.key,
            "asked_depth": asked_depth(prompt, n_garbage),
            "answer": prompt.value,
        }
        records.append(passkey.trial_record(own, result, hidden=f"{prompt.key} is {prompt.value}"))
    return records


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """passkey.plot_summary under this task's title."""
    return passkey.plot_summary(summary, path, title="key-value retrieval")
