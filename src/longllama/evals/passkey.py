"""Passkey retrieval (docs/evaluation.md#passkey-retrieval): hide a number in filler text, ask the model for it back,
score exact matches.

The prompt generator is the landmark-attention one LongLLaMA evaluates with: the filler sentence repeated, a pass
key line at a random character offset, drawn from numpy's global RNG under a fixed seed (and the RNG put back).
On top of it this module adds what a sweep needs:

* lengths in tokens: `n_garbage_for_tokens` finds the filler size (in characters) that makes the prompt about the
  asked number of tokens with a given tokenizer; every record also keeps the prompt's actual token count;
* key depths: `depth` in [0, 1] puts the key at that fraction of the filler instead of at the random offset;
* `run_passkey` over a grid of lengths x depths x trials, `summarize` into accuracies, a text table, a JSON file
  and a plot.

The length calibration, the scoring and the loop over trials take any prompt maker and answer, so other needle
tasks in the same filler (evals/kv.py) share them.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longllama.errors import InputError
from longllama.evals.records import plot_format, save_results  # noqa: F401  (part of this module's API)
from longllama.evals.records import replace_atomically as _replace_atomically
from longllama.tokenizer import encode_prompt, encode_prompts

logger = logging.getLogger(__name__)

FILLER_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK_LINE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION_LINE = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)  # numpy randint bounds: 50000 itself is never drawn
DEFAULT_LAST_CONTEXT_LENGTH = 1024


# --------------------------------------------------------------------------------------------------------------------
# Prompts


def filler(n_chars: int) -> str:
    """The first `n_chars` characters of the filler sentence repeated and joined by single spaces.

    Up to 449,999 characters this is exactly the reference's filler (5000 sentences), as prompts only ever take its
    start; longer requests (prompts past ~100k tokens) continue the same pattern instead of failing.
    """
    repeats = n_chars // (len(FILLER_SENTENCE) + 1) + 1
    return " ".join([FILLER_SENTENCE] * repeats)[:n_chars]


def passkey_prompt(n_garbage: int, seed: int, *, depth: float | None = None) -> tuple[str, int]:
    """The passkey prompt with `n_garbage` filler characters, and its pass key.

    With `depth` None (the reference's generator) the key line sits after randint(0, n_garbage) filler characters; with
    a
    depth in [0, 1] it sits after round(depth * n_garbage) of them. The random offset is drawn either way, so one
    seed gives the same key at every depth. numpy's global RNG is restored afterwards.
    """
    check_n_garbage(n_garbage)
    _check_depth(depth)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        prefix_chars = int(np.random.randint(0, n_garbage))
        key = int(np.random.randint(*KEY_RANGE))
    finally:
        np.random.set_state(state)  # callers' own numpy randomness must not depend on having run this
    if depth is not None:
        prefix_chars = round(depth * n_garbage)
    garbage = filler(n_garbage)
    # Both parts come from the start of the filler (as the reference does), so neither starts mid-sentence.
    lines = [
        TASK_LINE,
        garbage[:prefix_chars],
        KEY_LINE.format(key=key),
        garbage[: n_garbage - prefix_chars],
        QUESTION_LINE,
    ]
    return "\n".join(lines), key


def check_n_garbage(n_garbage: int) -> None:
    if isinstance(n_garbage, bool) or not isinstance(n_garbage, (int, np.integer)) or n_garbage < 1:
        raise InputError(f"n_garbage={n_garbage!r} must be a positive number of filler characters")


def _check_depth(depth: float | None) -> None:
    ok = isinstance(depth, numbers.Real) and not isinstance(depth, bool) and 0 <= depth <= 1
    if depth is not None and not ok:
        raise InputError(f"depth={depth!r} must be a number in [0, 1] (0: key at the start, 1: at the end) or None")


def prefix_chars_of(prompt: str) -> int:
    """Filler characters before the key line (the filler has no newlines, so the second line is the prefix)."""
    return len(prompt.split("\n")[1])


# --------------------------------------------------------------------------------------------------------------------
# Lengths in tokens


def prompt_tokens(tokenizer, prompt: str) -> int:
    """The number of tokens the model reads for `prompt` (BOS included)."""
    return len(encode_prompt(tokenizer, prompt, bos=True))


def chars_per_token(tokenizer) -> float:
    """Filler characters per token, measured on a stretch of filler long enough to average out the cut at its end."""
    sample = filler(100 * (len(FILLER_SENTENCE) + 1))
    return len(sample) / len(encode_prompt(tokenizer, sample, bos=False))


def shortest_length(tokenizer, *, seed: int = 0, prompt: Callable[[int], str] | None = None) -> int:
    """Tokens of a prompt with a single filler character: shorter lengths cannot be asked for. `prompt` makes the
    prompt text of a filler size (default: the pass-key prompt of `seed`)."""
    prompt = prompt or _passkey_text(seed)
    return prompt_tokens(tokenizer, prompt(1))


def _passkey_text(seed: int, depth: float | None = None) -> Callable[[int], str]:
    return lambda n_garbage: passkey_prompt(n_garbage, seed, depth=depth)[0]


def n_garbage_for_tokens(
    tokenizer,
    tokens: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    max_rounds: int = 8,
    prompt: Callable[[int], str] | None = None,
) -> int:
    """Filler characters that make the prompt about `tokens` tokens long with `tokenizer`. `prompt` makes the prompt
    text of a filler size; by default it is the pass-key prompt of (seed, depth).

    The token count is linear in the filler size apart from a fixed part (instruction, key and question lines, BOS)
    and a token or two where the filler is cut. So: start from the fixed part and the filler's characters per token,
    then correct by the measured difference until the prompt is within 0.1% (at least 2 tokens) of the request.
    The rounds differ by a few tokens at most; the closest one wins.
    """
    prompt = prompt or _passkey_text(seed, depth)
    fixed = shortest_length(tokenizer, prompt=prompt)
    if tokens <= fixed:
        raise InputError(
            f"a prompt of {tokens} tokens is too short: without filler it already has {fixed} "
            f"tokens with this tokenizer; ask for more than {fixed}"
        )
    rate = chars_per_token(tokenizer)
    tolerance = max(2, tokens // 1000)
    n_garbage = max(1, round((tokens - fixed) * rate))
    best = (math.inf, n_garbage)
    for _ in range(max_rounds):
        miss = tokens - prompt_tokens(tokenizer, prompt(n_garbage))
        best = min(best, (abs(miss), n_garbage))
        if abs(miss) <= tolerance:
            break
        n_garbage = max(1, n_garbage + round(miss * rate))
    logger.debug("%d tokens: %d filler characters (off by %d tokens)", tokens, best[1], best[0])
    return best[1]


def check_lengths(
    tokenizer, lengths: Sequence[int], *, seed: int = 0, prompt: Callable[[int], str] | None = None
) -> None:
    """Fail before any model work when a requested length cannot hold the prompt (`prompt`: as for
    n_garbage_for_tokens)."""
    fixed = shortest_length(tokenizer, seed=seed, prompt=prompt)
    short = [length for length in lengths if length <= fixed]
    if short:
        raise InputError(
            f"length(s) {', '.join(map(str, short))} are too short: the prompt without filler "
            f"already has {fixed} tokens with this tokenizer; ask for more than {fixed}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def score_passkey(
    model,
    tokenizer,
    prompt: str,
    key: int | str,
    *,
    last_context_length: int | None = DEFAULT_LAST_CONTEXT_LENGTH,
) -> dict[str, Any]:
    """Greedy-decode as many tokens as the answer has and compare them with the answer's ids, exactly.

    The answer is str(key): the pass key, or a value string of another needle task. Its ids are taken without BOS;
    as the tokenizer adds the dummy-prefix space, they are the ids of " 15338", the text that follows "The pass key
    is" in the prompt.
    """
    return score_passkeys(model, tokenizer, [(prompt, key)], last_context_length=last_context_length)[0]


def score_passkeys(
    model,
    tokenizer,
    prompts: Sequence[tuple[str, int | str]],
    *,
    last_context_length: int | None = DEFAULT_LAST_CONTEXT_LENGTH,
) -> list[dict[str, Any]]:
    """score_passkey for several (prompt, key or answer text) pairs read as one batch: the prompts are left-padded
    to the longest (the padding is masked, in the memory too), so a shorter prompt's windows begin where its padding
    ends rather than at its first token, and its answer may differ from a lone run's. One prompt is exactly
    score_passkey."""
    if not prompts:
        raise InputError("no prompts to score; pass at least one (prompt, key) pair")
    encoded = encode_prompts(tokenizer, [prompt for prompt, _ in prompts], bos=True)  # in parallel: long prompts
    answers = [encode_prompt(tokenizer, str(key), bos=False) for _, key in prompts]
    longest = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = getattr(model, "device", None)
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    output = model.generate(
        input_ids,
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max(len(a) for a in answers),
        last_context_length=last_context_length,
    )
    eos = {tokenizer.eos_token_id} - {None}
    results = []
    for row, (ids, answer_ids) in enumerate(zip(encoded, answers)):
        generated = []
        for t in output[row, longest:].tolist()[: len(answer_ids)]:  # shorter than the answer if EOS came first
            generated.append(int(t))
            if t in eos:
                break
        results.append(
            {
                "tokens": len(ids),
                "answer_ids": answer_ids,
                "generated_ids": generated,
                "generated": tokenizer.decode(generated, skip_special_tokens=True),
                "correct": generated == answer_ids,
            }
        )
    return results


def run_passkey(
    model,
    tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float | None] | None = None,
    trials: int,
    seed0: int = 0,
    last_context_length: int | None = DEFAULT_LAST_CONTEXT_LENGTH,
    progress: bool = True,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
    batch: int = 1,
) -> list[dict[str, Any]]:
    """One record per (length, depth, trial): seeds seed0 .. seed0 + trials - 1 at every length and depth.
    `on_record` gets the records so far after every batch of trials (the CLI saves them, so a run cut short keeps
    its trials). `batch` > 1 reads up to that many trials of one length and depth together (score_passkeys: on a GPU
    the windows of several prompts cost little more than one's; a padded prompt's windows begin where its padding
    ends).

    `lengths` are prompt lengths in tokens; each gets one filler size (calibrated on the first seed), so a length's
    prompts differ only by the key and its place, and each record keeps its prompt's actual token count. `depths`
    None is the reference's random key placement only.
    """
    depths = [None] if depths is None else list(depths)
    for depth in depths:
        _check_depth(depth)
    check_trials(trials, batch)
    check_lengths(tokenizer, lengths, seed=seed0)
    sizes = {length: n_garbage_for_tokens(tokenizer, length, seed=seed0) for length in lengths}

    def score(cell: tuple[int, float | None], seeds: list[int]) -> list[dict[str, Any]]:
        length, depth = cell
        return _trials(model, tokenizer, length, sizes[length], depth, seeds, last_context_length=last_context_length)

    cells = [(length, depth) for length in lengths for depth in depths]
    return run_trials(
        cells, score, trials=trials, seed0=seed0, batch=batch, name="passkey", progress=progress, on_record=on_record
    )


def check_trials(trials: int, batch: int) -> None:
    """Fail before the length calibration (minutes at millions of tokens) on a trial count or batch that cannot run."""
    if trials < 1:
        raise InputError(f"trials={trials} must be at least 1")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch={batch!r} must be a whole number of trials read together, at least 1")


def run_trials(
    cells: Sequence[Any],
    score: Callable[[Any, list[int]], list[dict[str, Any]]],
    *,
    trials: int,
    seed0: int,
    batch: int,
    name: str,
    progress: bool,
    on_record: Callable[[list[dict[str, Any]]], None] | None,
) -> list[dict[str, Any]]:
    """The records of `score(cell, seeds)` for every cell (a length, or a length and depth: whatever `score` reads)
    and every run of at most `batch` seeds among seed0 .. seed0 + trials - 1, under a progress bar named `name`.
    `on_record` gets the records so far after every batch."""
    records: list[dict[str, Any]] = []
    with _trial_bar(len(cells) * trials, name=name, enabled=progress) as bar:
        for cell in cells:
            for first in range(0, trials, batch):
                seeds = [seed0 + t for t in range(first, min(first + batch, trials))]
                records += score(cell, seeds)
                bar.update(len(seeds))
                bar.set_postfix(
                    length=records[-1]["length"], correct=f"{sum(r['correct'] for r in records)}/{len(records)}"
                )
                if on_record is not None:
                    on_record(records)
    return records


def _trials(
    model,
    tokenizer,
    length: int,
    n_garbage: int,
    depth: float | None,
    seeds: Sequence[int],
    *,
    last_context_length: int | None,
) -> list[dict[str, Any]]:
    """One record per seed, the prompts read as one batch."""
    prompts = [passkey_prompt(n_garbage, seed, depth=depth) for seed in seeds]
    scored = score_passkeys(model, tokenizer, prompts, last_context_length=last_context_length)
    records = []
    for seed, (prompt, key), result in zip(seeds, prompts, scored):
        own = {
            "length": length,
            "tokens": result["tokens"],
            "n_garbage": n_garbage,
            "depth": depth,
            "prefix_chars": prefix_chars_of(prompt),
            "seed": seed,
            "key": key,
            "answer": str(key),
        }
        records.append(trial_record(own, result, hidden=f"depth {depth_label(depth)}, key {key}"))
    return records


def trial_record(own: dict[str, Any], result: dict[str, Any], *, hidden: str) -> dict[str, Any]:
    """A needle task's record of one trial: its `own` fields (length, tokens, seed, what was hidden...), then what
    score_passkeys found: the answer's ids, the generated ids and text, and whether they match. The trial is logged
    with `hidden`, what it asked for."""
    logger.info(
        "length %d (%d tokens) seed %d, %s: generated %r -> %s",
        own["length"],
        own["tokens"],
        own["seed"],
        hidden,
        result["generated"],
        "correct" if result["correct"] else "wrong",
    )
    return {**own, **{field: result[field] for field in ("answer_ids", "generated_ids", "generated", "correct")}}


def _trial_bar(total: int, *, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="trial", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------------
# Summaries, table, files


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per (length, depth), per length (all depths) and overall; lengths ascending, depths as first seen."""
    lengths = sorted({r["length"] for r in records})
    depths = list(dict.fromkeys(r["depth"] for r in records))
    cells = [
        _accuracy([r for r in records if r["length"] == length and r["depth"] == depth], length=length, depth=depth)
        for length in lengths
        for depth in depths
    ]
    by_length = [_accuracy([r for r in records if r["length"] == length], length=length) for length in lengths]
    return {
        "lengths": lengths,
        "depths": depths,
        "by_length_depth": [c for c in cells if c["trials"]],
        "by_length": by_length,
        "overall": _accuracy(records),
    }


def _accuracy(group: Sequence[dict[str, Any]], **labels: Any) -> dict[str, Any]:
    correct = sum(bool(r["correct"]) for r in group)
    tokens = [r["tokens"] for r in group]
    return {
        **labels,
        "trials": len(group),
        "correct": correct,
        "accuracy": correct / len(group) if group else None,
        "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
    }


def depth_label(depth: float | None) -> str:
    return "random" if depth is None else f"{depth:g}"


def format_table(summary: dict[str, Any]) -> str:
    """Accuracy as text: one row per length (with the mean actual prompt tokens), one column per depth, then all."""
    cell = {(c["length"], c["depth"]): c for c in summary["by_length_depth"]}
    header = ["length", "tokens"] + [f"depth {depth_label(d)}" for d in summary["depths"]] + ["all depths"]
    rows = []
    for total in summary["by_length"]:
        length = total["length"]
        accuracies = [_percent(cell.get((length, d))) for d in summary["depths"]]
        rows.append([str(length), f"{total['mean_tokens']:.0f}", *accuracies, _percent(total)])
    overall = summary["overall"]
    rows.append(["all", "", *[""] * len(summary["depths"]), _percent(overall)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines + [f"{overall['correct']}/{overall['trials']} correct"])


def _percent(group: dict[str, Any] | None) -> str:
    return "-" if group is None or group["accuracy"] is None else f"{100 * group['accuracy']:.1f}%"


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str], *, title: str = "passkey retrieval") -> Path:
    """Two panels: accuracy against length (log x) per depth, and a length x depth accuracy heatmap."""
    # A bare Figure rather than pyplot: no GUI backend to pick, no global figure state left behind.
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    curves, heatmap = figure.subplots(1, 2)
    _plot_curves(curves, summary, title)
    _plot_heatmap(figure, heatmap, summary)
    return _replace_atomically(Path(path), lambda tmp: figure.savefig(tmp, format=fmt, dpi=120))


def _plot_curves(ax, summary: dict[str, Any], title: str) -> None:
    lengths = summary["lengths"]
    for depth in summary["depths"]:
        points = [(c["length"], c["accuracy"]) for c in summary["by_length_depth"] if c["depth"] == depth]
        ax.plot(*zip(*points), marker="o", alpha=0.8, label=f"depth {depth_label(depth)}")
    if len(summary["depths"]) > 1:
        ax.plot(
            lengths,
            [t["accuracy"] for t in summary["by_length"]],
            color="black",
            linewidth=2.5,
            marker="s",
            label="all depths",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _plot_heatmap(figure, ax, summary: dict[str, Any]) -> None:
    lengths, depths = summary["lengths"], summary["depths"]
    grid = np.full((len(depths), len(lengths)), np.nan)  # (depth, length)
    for c in summary["by_length_depth"]:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(col, row, f"{100 * value:.0f}%", ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [depth_label(d) for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title("accuracy by length and depth")
    figure.colorbar(image, ax=ax, label="accuracy")
