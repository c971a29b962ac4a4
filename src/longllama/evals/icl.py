"""Many-shot in-context classification: accuracy against the number of demonstrations in the context.

The LongLLaMA authors showed that TREC and WebQS accuracy rises as more demonstrations fit in the context, most of
them in memory. Here the demonstrations come from a training .jsonl of {"text", "label"} lines and the questions
from a test .jsonl of the same form; the labels the model chooses from are those of the training file.

Protocol, for each number of demonstrations S (`--shots`) and each seed (`--seeds`):

- Seed s shuffles the training examples once (Python's `random.Random(s)`); the first S of that order are the
  demonstrations, in that order, so a larger S extends a smaller one. Each demonstration is the line
  `TEXT -> LABEL` plus a newline, tokenized on its own (no BOS); the context is BOS followed by those lines.
- The question is the line `TEXT ->`, last; each label's continuation is the tokens that follow the question's in
  the encoding of `TEXT -> LABEL`. The prediction is the label whose continuation has the highest log-likelihood
  (summed over its tokens), the harness's multiple-choice accuracy; a generated answer would need matching rules
  and can fall outside the label set.
- `memory` mode reads the whole context once (memory windows, then a final window of `last_context_length`
  tokens that stays in the local cache) and continues that cache with the question and a label, once per label
  and question: the cache is never modified by a call, so every question reads the demonstrations only once per
  seed. `truncated` mode keeps only the last whole demonstrations that fit in the final window together with BOS,
  the question and the longest label: what a model without memory would see.

`synthetic_examples` makes a task whose labels can only be learnt from the demonstrations: each text carries one
keyword among a few per class, and the class names are drawn at random per task, unrelated to the keywords.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longllama.errors import InputError

if TYPE_CHECKING:
    from longllama.cli import LoadOptions

MODES = ("memory", "truncated")
SEPARATOR = " ->"


# ---------------------------------------------------------------------------------------------------------- data


def read_examples(path: str | os.PathLike[str], option: str) -> list[dict[str, str]]:
    """{"text", "label"} examples of a .jsonl file; a bad line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path} does not exist; pass a .jsonl file of {{'text', 'label'}} lines")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {number} is not JSON ({exc.msg}); write one object per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {number} is not an object; write {{'text': ..., 'label': ...}}")
            missing = [key for key in ("text", "label") if key not in row]
            if missing:
                raise InputError(f"{path} line {number} lacks {' and '.join(missing)}; each line needs text and label")
            text, label = row["text"], row["label"]
            if not isinstance(text, str) or not text.strip() or "\n" in text:
                raise InputError(f"{path} line {number}: text must be a non-empty one-line string")
            if not isinstance(label, str | int) or not str(label).strip() or "\n" in str(label):
                raise InputError(f"{path} line {number}: label must be a non-empty one-line string")
            examples.append({"text": text.strip(), "label": str(label).strip()})
    if not examples:
        raise InputError(f"{option} {path} holds no examples; write one {{'text', 'label'}} object per line")
    return examples


def check_labels(train: Sequence[dict[str, str]], test: Sequence[dict[str, str]], test_path: Any) -> list[str]:
    """The label set (train's labels, sorted); a test label outside it is an error."""
    labels = sorted({e["label"] for e in train})
    if len(labels) < 2:
        raise InputError(f"the training file has {len(labels)} label(s); classification needs at least 2")
    unknown = sorted({e["label"] for e in test} - set(labels))
    if unknown:
        raise InputError(
            f"{test_path} has label(s) {', '.join(map(repr, unknown[:5]))} that no training example has; "
            "the model can only choose among the training labels"
        )
    return labels


def synthetic_examples(
    count: int, *, seed: int = 0, classes: int = 4, keywords_per_class: int = 3, task_seed: int = 1234
) -> list[dict[str, str]]:
    """A classification set learnable only in context: each text has one class keyword among filler words.

    The task (keywords per class, and the class names, drawn from words unrelated to the keywords) depends on
    `task_seed` alone, so a training and a test file drawn with different `seed`s share it.
    """
    task = random.Random(task_seed)
    keywords = task.sample(_KEYWORDS, classes * keywords_per_class)
    names = task.sample(_CLASS_NAMES, classes)
    draw = random.Random(seed)
    examples = []
    for _ in range(count):
        label = draw.randrange(classes)
        keyword = keywords[label * keywords_per_class + draw.randrange(keywords_per_class)]
        words = draw.sample(_FILLER, 4)
        words.insert(draw.randrange(5), keyword)
        examples.append({"text": " ".join(words), "label": names[label]})
    return examples


_KEYWORDS = (
    "apple river candle engine forest guitar harbor island jacket kettle ladder magnet needle orange pencil "
    "rabbit saddle tunnel violin wallet"
).split()
_CLASS_NAMES = "foo bar baz qux spam eggs ham zap".split()
_FILLER = "the a one some with from near under about over this that my our their".split()


# ------------------------------------------------------------------------------------------------------- packing


def demonstration_order(count: int, seed: int) -> list[int]:
    """The order seed `seed` puts `count` training examples in; the first S are the S demonstrations."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def demonstration_line(example: dict[str, str]) -> str:
    return f"{example['text']}{SEPARATOR} {example['label']}\n"


def question_line(example: dict[str, str]) -> str:
    return f"{example['text']}{SEPARATOR}"


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def label_continuations(tokenizer, question: str, labels: Sequence[str]) -> list[list[int]]:
    """Each label's tokens as they follow the question's in the encoding of `question + " " + label`."""
    head = encode_text(tokenizer, question)
    continuations = []
    for label in labels:
        whole = encode_text(tokenizer, f"{question} {label}")
        tail = whole[len(head) :] if whole[: len(head)] == head else encode_text(tokenizer, f" {label}")
        if not tail:
            raise InputError(f"label {label!r} encodes to no tokens; use visible label names")
        continuations.append(tail)
    return continuations


def pack(
    demo_ids: Sequence[Sequence[int]],
    *,
    mode: str,
    window: int,
    question_tokens: int,
    label_tokens: int,
    bos: int | None,
) -> tuple[list[int], int]:
    """(context ids, demonstrations kept): BOS then the demonstrations, in memory mode all of them, in truncated
    mode the last ones that fit in `window` together with BOS, the longest question and the longest label."""
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    head = [bos] if bos is not None else []
    kept = len(demo_ids)
    if mode == "truncated":
        room = window - len(head) - question_tokens - label_tokens
        if room < 0:
            raise InputError(
                f"a question and label ({question_tokens + label_tokens} tokens) do not fit in the final window of "
                f"{window} tokens; use shorter texts or a larger --last-context-length"
            )
        used, kept = 0, 0
        for ids in reversed(demo_ids):
            if used + len(ids) > room:
                break
            used += len(ids)
            kept += 1
    context = list(head)
    for ids in demo_ids[len(demo_ids) - kept :]:
        context.extend(ids)
    return context, kept


# ------------------------------------------------------------------------------------------------------- scoring


def read_context(model, context: Sequence[int], *, last_context_length: int):
    """The cache after reading `context` once (memory windows, then the final window in the local cache)."""
    import torch

    ids = torch.tensor([list(context)], dtype=torch.long, device=getattr(model, "device", None))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, last_context_length=last_context_length, logits_to_keep=1)
    return out.past_key_values


def label_log_likelihoods(
    model, cache, question: Sequence[int], continuations: Sequence[Sequence[int]], *, last_context_length: int
) -> list[float]:
    """Sum of log-probabilities of each continuation after the cached context and the question."""
    import torch

    scores = []
    for tail in continuations:
        ids = torch.tensor([list(question) + list(tail)], dtype=torch.long, device=getattr(model, "device", None))
        with torch.no_grad():
            out = model(
                input_ids=ids,
                past_key_values=cache,
                use_cache=True,
                last_context_length=last_context_length,
                logits_to_keep=len(tail) + 1,
            )
        logprobs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        target = torch.tensor(list(tail), device=logprobs.device)
        scores.append(float(logprobs.gather(-1, target[:, None]).sum()))
    return scores


def evaluate(
    model,
    tokenizer,
    train: Sequence[dict[str, str]],
    test: Sequence[dict[str, str]],
    *,
    shots: Sequence[int],
    seeds: int = 3,
    modes: Sequence[str] = ("memory",),
    last_context_length: int | None = None,
    seed_offset: int = 0,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Accuracy per mode, number of demonstrations and seed; returns (per-question records, summary)."""
    labels = sorted({e["label"] for e in train})
    too_many = [s for s in shots if s > len(train)]
    if too_many:
        raise InputError(f"--shots {max(too_many)} exceeds the {len(train)} training examples; pass fewer shots")
    window = int(last_context_length or model.config.last_context_length)
    demo_ids = [encode_text(tokenizer, demonstration_line(e)) for e in train]
    questions = [encode_text(tokenizer, question_line(e)) for e in test]
    continuations = [label_continuations(tokenizer, question_line(e), labels) for e in test]
    longest_question = max(len(q) for q in questions)
    longest_label = max(len(t) for c in continuations for t in c)
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"labels": labels, "chance": 1 / len(labels), "modes": {}}
    for mode in modes:
        by_shots: dict[str, Any] = {}
        for s in shots:
            per_seed = []
            kept_per_seed, tokens_per_seed = [], []
            for seed in range(seed_offset, seed_offset + seeds):
                chosen = [demo_ids[i] for i in demonstration_order(len(train), seed)[:s]]
                context, kept = pack(
                    chosen,
                    mode=mode,
                    window=window,
                    question_tokens=longest_question,
                    label_tokens=longest_label,
                    bos=tokenizer.bos_token_id,
                )
                cache = read_context(model, context, last_context_length=window)
                correct = 0
                for example, question, tails in zip(test, questions, continuations):
                    scores = label_log_likelihoods(model, cache, question, tails, last_context_length=window)
                    predicted = labels[max(range(len(labels)), key=scores.__getitem__)]
                    correct += predicted == example["label"]
                    records.append(
                        {
                            "mode": mode,
                            "shots": s,
                            "seed": seed,
                            "demonstrations": kept,
                            "context_tokens": len(context),
                            "text": example["text"],
                            "label": example["label"],
                            "predicted": predicted,
                            "correct": predicted == example["label"],
                            "scores": dict(zip(labels, (round(v, 4) for v in scores))),
                        }
                    )
                per_seed.append(correct / len(test))
                kept_per_seed.append(kept)
                tokens_per_seed.append(len(context))
                if progress:
                    print(
                        f"{mode} shots={s} seed={seed}: accuracy {per_seed[-1]:.3f} ({kept} demonstrations, "
                        f"{len(context)} context tokens)",
                        file=sys.stderr,
                        flush=True,
                    )
            by_shots[str(s)] = {
                "accuracy": sum(per_seed) / len(per_seed),
                "accuracy_per_seed": per_seed,
                "demonstrations_per_seed": kept_per_seed,
                "context_tokens_per_seed": tokens_per_seed,
            }
        summary["modes"][mode] = by_shots
    return records, summary


# ---------------------------------------------------------------------------------------------------- command


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Accuracy against the number of demonstrations asked for, one line per mode (bars: the seeds' range)."""
    from matplotlib.figure import Figure

    from longllama.evals.records import plot_format, replace_atomically

    fmt = plot_format(path)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for mode, by_shots in summary["modes"].items():
        xs = [int(s) for s in by_shots]
        ys = [v["accuracy"] for v in by_shots.values()]
        low = [y - min(v["accuracy_per_seed"]) for y, v in zip(ys, by_shots.values())]
        high = [max(v["accuracy_per_seed"]) - y for y, v in zip(ys, by_shots.values())]
        ax.errorbar([max(x, 0.5) for x in xs], ys, yerr=[low, high], marker="o", capsize=3, label=mode)
    ax.axhline(summary["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("demonstrations asked for (0 drawn at 0.5)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    return replace_atomically(Path(path), lambda tmp: figure.savefig(tmp, format=fmt))


def add_parser(tasks, common) -> None:
    from longllama.cli import _positive_int

    p = tasks.add_parser(
        "icl", help="many-shot in-context classification (accuracy against demonstrations)", description=__doc__
    )
    common(p)
    p.add_argument("--train", required=True, metavar="FILE", help='demonstrations: .jsonl of {"text", "label"}')
    p.add_argument("--test", required=True, metavar="FILE", help='questions: .jsonl of {"text", "label"}')
    p.add_argument(
        "--shots",
        type=_shots,
        default=[0, 32, 256, 1500],
        metavar="A,B",
        help="numbers of demonstrations (default 0,32,256,1500)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        metavar="N",
        help="demonstration draws per number of shots (default 3)",
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=["memory"],
        metavar="A,B",
        help="memory (demonstrations in memory, default) and/or truncated (the final window only)",
    )
    p.add_argument(
        "--last-context-length",
        type=_positive_int,
        metavar="N",
        help="tokens of the final window (default: the model's config)",
    )
    p.add_argument("--plot", metavar="FILE", help="draw accuracy against demonstrations (.png)")
    p.set_defaults(func=run)


def _shots(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: pass whole numbers >= 0, e.g. 0,32,256")
    return sorted(set(values))


def _modes(text: str) -> list[str]:
    import argparse

    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in MODES for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: pass memory, truncated or memory,truncated")
    return list(dict.fromkeys(values))


def run(
    *,
    model: str | None,
    train: str,
    test: str,
    shots: Sequence[int] = (0, 32, 256, 1500),
    seeds: int = 3,
    modes: Sequence[str] = ("memory",),
    last_context_length: int | None = None,
    plot: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    load: LoadOptions | None = None,
) -> int:
    """`longllama eval icl`: accuracy per mode and number of demonstrations; --out keeps the record."""
    from longllama.cli import eval_model, output_file
    from longllama.evals import records as saving

    out_path = output_file(out)
    plot_path = output_file(plot, "--plot")
    if plot_path is not None:
        saving.plot_format(plot_path)
    train_rows = read_examples(train, "--train")
    test_rows = read_examples(test, "--test")
    labels = check_labels(train_rows, test_rows, test)
    if max(shots) > len(train_rows):  # before the model loads
        raise InputError(f"--shots {max(shots)} exceeds the {len(train_rows)} training examples; pass fewer shots")
    if limit is not None:
        test_rows = test_rows[:limit]
    folder, lm, tokenizer = eval_model(model, load)
    # Seeds --seed .. --seed + N - 1: each is one draw of demonstrations.
    results, summary = evaluate(
        lm,
        tokenizer,
        train_rows,
        test_rows,
        shots=shots,
        seeds=seeds,
        modes=modes,
        last_context_length=last_context_length,
        progress=True,
        seed_offset=seed,
    )
    print(f"{'mode':<10} {'shots':>6} {'demos':>8} {'accuracy':>9}  (chance {summary['chance']:.3f})")
    for mode, by_shots in summary["modes"].items():
        for s, row in by_shots.items():
            demos = sum(row["demonstrations_per_seed"]) / len(row["demonstrations_per_seed"])
            print(f"{mode:<10} {s:>6} {demos:>8.1f} {row['accuracy']:>9.3f}")
    if out_path is not None:
        settings = {
            **saving.model_settings(folder, lm, load),
            "train": str(train),
            "test": str(test),
            "train_examples": len(train_rows),
            "test_questions": len(test_rows),
            "labels": labels,
            "shots": list(shots),
            "seeds": [seed + i for i in range(seeds)],
            "modes": list(modes),
            "last_context_length": int(last_context_length or lm.config.last_context_length),
            "context_window": int(lm.config.context_window),
            "format": f"demonstration 'TEXT{SEPARATOR} LABEL\\n', question 'TEXT{SEPARATOR}', context BOS + lines",
            "prediction": "label with the highest summed log-likelihood",
            "limit": limit,
        }
        saving.save_results(out_path, results, summary, settings=settings)
        print(f"wrote {out_path}", file=sys.stderr)
    if plot_path is not None:
        plot_summary(summary, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    return 0
