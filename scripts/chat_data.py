"""Synthetic document-QA conversations for chat-tuning the shipped small model, and the chat evaluation.

Every conversation is one ShareGPT-style row for the `sharegpt-3b-v1.1` fine-tuning template: a first user turn
holding a document (Python source of the standard library, with a pass-key line and `key: value` lines hidden in
it), then one or two questions with short exact answers:

    "What is the pass key?"                              -> "The pass key is 71432."
    "What is the value of KEY?"                          -> "The value of KEY is VALUE."
    "Which function in this code has the docstring "S"?" -> "The function is NAME."

`longllama finetune` lays a row out as BOS, the chat system prompt, "\\nUSER: " + document, then each question as
"\\nUSER: " + question and each answer as "\\nASSISTANT: " + answer + EOS; `longllama chat` with the default template
puts the document right after the system prompt, so the two differ only by the "\\nUSER: " before the document.
Rows are sized to `tokens` ids exactly (the fine-tuning example length, so nothing is padded or cut), and the
evidence of most questions lies before the last `last_context_length` ids: in the memory windows, not in the
final window (docs/finetuning.md#memory-in-fine-tuning).

Standard-library files are split by a hash of their path: training rows use the "train" files, the evaluation's
documents the "heldout" ones (and the pass-key evaluation's own filler sentences, which training never sees).
Everything depends on the seed alone; nothing is downloaded.

    python scripts/chat_data.py data --out runs/small-chat/train.jsonl --count 3000
    python scripts/chat_data.py eval --model src/longllama/models/small --out record.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

TRAIN, HELDOUT = "train", "heldout"
HELDOUT_FRACTION = 0.2
TEMPLATE = "sharegpt-3b-v1.1"
PASSKEY_QUESTION = "What is the pass key?"
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_PASSKEY_LINES = (
    "The pass key is {key}. Remember it. {key} is the pass key.",
    "Remember this pass key: {key}. The pass key is {key}.",
    "Important: the pass key is {key}. Keep {key} in mind.",
)


# ----------------------------------------------------------------------------------------------------------------
# Filler: standard-library sources


def _split_of(relative: str) -> str:
    score = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") / 2**64
    return HELDOUT if score < HELDOUT_FRACTION else TRAIN


@lru_cache(maxsize=2)
def stdlib_files(split: str) -> tuple[Path, ...]:
    """Readable standard-library .py files of one split, sorted by path (the same on every run of one Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative or "test" in relative or "__pycache__" in relative:
            continue
        if _split_of(relative) == split and 2_000 <= path.stat().st_size <= 400_000:
            chosen.append(path)
    if not chosen:
        raise SystemExit(f"no standard-library sources found under {root}: this script needs Python's own .py files")
    return tuple(chosen)


@lru_cache(maxsize=4096)
def _read(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    # Filler must not hold a pass key or a question of ours by accident.
    return "\n".join(line for line in text.splitlines() if "pass key" not in line.lower() and line.strip() != "")


def code_filler(rng: np.random.Generator, chars: int, split: str) -> str:
    """At least `chars` characters of whole lines from randomly chosen files of `split`."""
    files = stdlib_files(split)
    parts: list[str] = []
    size = 0
    while size < chars:
        text = _read(files[int(rng.integers(len(files)))])
        lines = text.splitlines()
        start = int(rng.integers(max(1, len(lines) - 40)))
        piece = "\n".join(lines[start : start + int(rng.integers(60, 400))])
        parts.append(piece)
        size += len(piece) + 1
    return "\n".join(parts)


def grass_filler(chars: int) -> str:
    return " ".join([GRASS] * (chars // (len(GRASS) + 1) + 1))


# ----------------------------------------------------------------------------------------------------------------
# Evidence and questions


def pass_key(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1, 10 ** int(rng.integers(2, 6)))))


def kv_key(rng: np.random.Generator) -> str:
    words = ("alpha", "river", "stone", "maple", "cedar", "orbit", "delta", "ember", "frost", "lumen", "north", "pixel")
    return (
        f"{words[int(rng.integers(len(words)))]}_{words[int(rng.integers(len(words)))]}_{int(rng.integers(100, 1000))}"
    )


def kv_value(rng: np.random.Generator) -> str:
    if rng.random() < 0.6:
        return str(int(rng.integers(1, 10 ** int(rng.integers(2, 7)))))
    return f"{int(rng.integers(16**8)):08x}"


def passkey_qa(key: str) -> tuple[str, str]:
    return PASSKEY_QUESTION, f"The pass key is {key}."


def kv_qa(key: str, value: str) -> tuple[str, str]:
    return f"What is the value of {key}?", f"The value of {key} is {value}."


def kv_line(rng: np.random.Generator, key: str, value: str) -> str:
    return f"{key}: {value}" if rng.random() < 0.5 else f"The value of {key} is {value}."


_FUNCTION = re.compile(r"^\s*def ([A-Za-z_][A-Za-z0-9_]*)\(", re.MULTILINE)


def functions_with_docstrings(text: str) -> list[tuple[int, str, str]]:
    """(character offset of the `def`, name, first docstring line) of functions whose docstring starts on the
    line after the `def` with a sentence of 4-14 words; names that occur once in `text` only."""
    found = []
    for match in _FUNCTION.finditer(text):
        name = match.group(1)
        if name.startswith("_") or len(re.findall(rf"\bdef {name}\(", text)) != 1:
            continue
        after = text[match.end() :].split("\n", 3)
        if len(after) < 2:
            continue
        line = after[1].strip()
        if not line.startswith(('"""', "'''")):
            continue
        summary = line.strip("\"' ")
        if not summary.endswith(".") or not 4 <= len(summary.split()) <= 14 or '"' in summary:
            continue
        found.append((match.start(), name, summary))
    return found


def function_qa(name: str, summary: str) -> tuple[str, str]:
    return f'Which function in this code has the docstring "{summary}"?', f"The function is {name}."


# ----------------------------------------------------------------------------------------------------------------
# Token layout


class Layout:
    """Token counts of the fine-tuning example of a row (the project's ChatExample, unpadded), so rows can be sized
    to an exact length and the evidence placed relative to the final window."""

    def __init__(self, tokenizer: Any) -> None:
        from longllama.training.data.sft import ChatExample, SFTLengths

        self.tokenizer = tokenizer
        lengths = SFTLengths(max_total_length=1 << 30, always_pad=False, random_pad=False)
        self.example = ChatExample(tokenizer, template=TEMPLATE, lengths=lengths)
        self.head = len(self.example({"conversations": [{"from": "human", "markdown": "x"}]})["input_ids"]) - len(
            self.tokens("x")
        )

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def total(self, row: dict[str, Any]) -> int:
        return len(self.example(row)["input_ids"])


def _row(document: str, qas: Sequence[tuple[str, str]]) -> dict[str, Any]:
    turns = [{"from": "human", "markdown": document}]
    for question, answer in qas:
        turns += [{"from": "human", "markdown": question}, {"from": "gpt", "markdown": answer}]
    return {"conversations": turns}


def _insert_lines(filler: str, items: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """`filler` with each (fraction, line) put on its own line at that fraction of its lines; the character offset
    of each inserted line, in the order given."""
    lines = filler.split("\n")
    slots = sorted(
        (min(int(fraction * len(lines)), len(lines)), order, line) for order, (fraction, line) in enumerate(items)
    )
    out: list[str] = []
    offsets = [0] * len(items)
    previous = 0
    size = 0
    for slot, order, line in slots:
        for kept in lines[previous:slot]:
            out.append(kept)
            size += len(kept) + 1
        previous = slot
        offsets[order] = size
        out.append(line)
        size += len(line) + 1
    out += lines[previous:]
    return "\n".join(out), offsets


def build_conversation(
    layout: Layout,
    rng: np.random.Generator,
    *,
    tokens: int,
    last_context_length: int,
    in_memory: float,
    split: str = TRAIN,
) -> dict[str, Any]:
    """One training row of exactly `tokens` ids. With probability `in_memory` every asked item lies before the final
    window (at least 16 ids before its start), else the asked items lie inside it. `meta` records the answers and
    the first id of each asked item's line."""
    memory_end = tokens - last_context_length
    evidence_in_memory = bool(rng.random() < in_memory)
    key, pairs = pass_key(rng), {}
    while len(pairs) < int(rng.integers(1, 4)):
        pairs.setdefault(kv_key(rng), kv_value(rng))
    statement = _PASSKEY_LINES[int(rng.integers(len(_PASSKEY_LINES)))].format(key=key)
    pair_lines = {k: kv_line(rng, k, v) for k, v in pairs.items()}
    filler = code_filler(rng, tokens * 4, split)
    # Where the lines go, as fractions of the document's lines (about its ids): before the final window, with a
    # margin, or inside it before the questions.
    document_ids = tokens - layout.head - 40
    boundary = (memory_end - layout.head) / document_ids
    for _ in range(12):
        if evidence_in_memory:
            spots = rng.uniform(0.0, boundary - 48 / document_ids, size=1 + len(pairs))
        else:
            spots = rng.uniform(boundary + 16 / document_ids, 0.97, size=1 + len(pairs))
        items = [(float(spots[0]), statement), *((float(s), line) for s, line in zip(spots[1:], pair_lines.values()))]
        kinds = ["passkey", *(("kv", k) for k in pairs)]
        # The asked questions: one or two, drawn from the pass key, the pairs and (below) a function.
        order = rng.permutation(len(kinds))[: int(rng.integers(1, 3))]
        text, offsets = _fit(layout, filler, items, tokens, rng)
        if text is None:
            filler = code_filler(rng, tokens * 8, split)
            continue
        qas, asked = [], []
        for index in order:
            kind = kinds[index]
            qas.append(passkey_qa(key) if kind == "passkey" else kv_qa(kind[1], pairs[kind[1]]))
            asked.append(offsets[index])
        functions = [f for f in functions_with_docstrings(text) if f[0] > 0]
        if functions and rng.random() < 0.3:
            offset, name, summary = functions[int(rng.integers(len(functions)))]
            position = layout.head + len(layout.tokens(text[:offset]))
            if (position < memory_end - 16) == evidence_in_memory:
                qas[-1], asked[-1] = function_qa(name, summary), offset
        positions = [layout.head + len(layout.tokens(text[:offset])) for offset in asked]
        row = _row(text, qas)
        # Trim or pad the document so the whole row is exactly `tokens` ids (the final words may move by an id).
        row, text = _exact(layout, row, text, qas, tokens)
        if row is None:
            continue
        inside = [p < memory_end - 16 for p in positions]
        if evidence_in_memory and not all(inside) or not evidence_in_memory and any(p < memory_end for p in positions):
            continue
        row["meta"] = {
            "answers": [answer for _, answer in qas],
            "evidence_ids": positions,
            "in_memory": evidence_in_memory,
            "tokens": tokens,
            "last_context_length": last_context_length,
        }
        return row
    raise RuntimeError("could not lay out a conversation in 12 tries; raise tokens")


def _fit(layout: Layout, filler: str, items, tokens: int, rng) -> tuple[str | None, list[int]]:
    """The document (filler cut to about the right length in ids, items inserted) and the items' offsets."""
    ids = layout.tokens(filler)
    budget = tokens - layout.head - 40  # room for the questions and answers, settled exactly by _exact
    if len(ids) < budget + 64:
        return None, []
    cut = layout.tokenizer.decode(ids[: budget - sum(len(layout.tokens(line)) for _, line in items)])
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return _insert_lines(cut, items)


def _exact(layout: Layout, row, text: str, qas, tokens: int):
    for _ in range(8):
        excess = layout.total(row) - tokens
        if excess == 0:
            return row, text
        if excess > 0:
            ids = layout.tokens(text)
            text = layout.tokenizer.decode(ids[: len(ids) - excess])
        else:
            text = text + "\n#" + " x" * (-excess)
        row = _row(text, qas)
    return None, text


def training_rows(tokenizer: Any, *, count: int, seed: int, tokens: int, last_context_length: int, in_memory: float):
    layout = Layout(tokenizer)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        yield build_conversation(
            layout, rng, tokens=tokens, last_context_length=last_context_length, in_memory=in_memory
        )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation documents


def eval_document(tokenizer: Any, rng: np.random.Generator, *, tokens: int, filler: str) -> dict[str, Any]:
    """A document of about `tokens` ids (held-out code or the pass-key evaluation's sentences) with a pass key and
    one `key: value` line at random depths, the two chat questions and answers, and the plain pass-key prompt."""
    key, kv_k, kv_v = pass_key(rng), kv_key(rng), kv_value(rng)
    chars = int(tokens * (2.2 if filler == "code" else 3.6))
    for _ in range(20):
        body = code_filler(rng, chars, HELDOUT) if filler == "code" else grass_filler(chars)
        if filler == "grass":
            body = body.replace(". ", ".\n")
        ids = tokenizer.encode(body, add_special_tokens=False, verbose=False)
        if len(ids) >= tokens:
            body = tokenizer.decode(ids[:tokens])
            break
        chars = int(chars * 1.3)
    depths = rng.uniform(0.02, 0.9, size=2)
    statement = _PASSKEY_LINES[0].format(key=key)
    text, _ = _insert_lines(body, [(float(depths[0]), statement), (float(depths[1]), f"{kv_k}: {kv_v}")])
    return {
        "text": text,
        "tokens": tokens,
        "filler": filler,
        "depths": [round(float(d), 3) for d in depths],
        "questions": [
            {"task": "passkey", "question": PASSKEY_QUESTION, "expected": key},
            {"task": "kv", "question": f"What is the value of {kv_k}?", "expected": kv_v},
        ],
    }


def exact_answer(answer: str, expected: str, task: str) -> bool:
    """Whether the answer states exactly the expected item: the first word after "is" (or the first word)."""
    text = answer.strip()
    match = re.search(r"\bis\s+(\S+)", text)
    word = (match.group(1) if match else (text.split() or [""])[0]).rstrip(".,;:!?\"'")
    return word == expected


def evaluate(model_path: str, lengths: Sequence[int], docs: int, seed: int, plain_16k: int) -> dict[str, Any]:
    import torch

    from longllama.cli import LoadOptions, _tokenizer_folder, load_model
    from longllama.document_memory import DocumentMemory
    from longllama.tokenizer import load_tokenizer

    torch.manual_seed(0)
    # As the CLI loads it: an adapter folder (the chat model) is merged into its base model.
    tokenizer = load_tokenizer(_tokenizer_folder(Path(model_path)))
    model = load_model(Path(model_path), LoadOptions(dtype="float32", device="cpu"))
    results = []
    for length in lengths:
        for index in range(docs):
            rng = np.random.default_rng([seed, length, index])
            document = eval_document(tokenizer, rng, tokens=length, filler="code" if index % 2 else "grass")
            start = time.perf_counter()
            with torch.inference_mode():
                memory = DocumentMemory.build(model, tokenizer, document["text"])
                for item in document["questions"]:
                    answer = memory.ask(item["question"], max_new_tokens=24)
                    results.append(
                        {
                            "length": length,
                            "doc": index,
                            "filler": document["filler"],
                            "depths": document["depths"],
                            "task": item["task"],
                            "question": item["question"],
                            "expected": item["expected"],
                            "answer": answer,
                            "exact": exact_answer(answer, item["expected"], item["task"]),
                            "contains": bool(re.search(rf"(?<![0-9a-z]){item['expected']}(?![0-9a-z])", answer)),
                        }
                    )
            print(
                f"{length} doc {index}: {time.perf_counter() - start:.1f}s {results[-2]['answer']!r} / "
                f"{results[-1]['answer']!r}",
                file=sys.stderr,
            )
    plain = []
    if plain_16k:
        from longllama.evals import passkey

        garbage = passkey.n_garbage_for_tokens(tokenizer, 16384, seed=0)
        for trial in range(plain_16k):
            prompt, key = passkey.passkey_prompt(garbage, 1000 + trial)
            with torch.inference_mode():
                memory = DocumentMemory.build(model, tokenizer, prompt[: -len(passkey.QUESTION_LINE)], template="none")
                answer = memory.ask(passkey.QUESTION_LINE, max_new_tokens=8)
            plain.append(
                {"trial": trial, "key": str(key), "answer": answer, "exact": answer.strip().startswith(str(key))}
            )
    return {"per_question": results, "plain_passkey_16k": plain}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for row in result["per_question"]:
        cell = table.setdefault(f"{row['length']}/{row['task']}", {"exact": 0, "contains": 0, "n": 0})
        cell["n"] += 1
        cell["exact"] += row["exact"]
        cell["contains"] += row["contains"]
    plain = result["plain_passkey_16k"]
    table["plain_passkey_16k"] = {"exact": sum(p["exact"] for p in plain), "n": len(plain)}
    return table


def write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(handle.name, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write training conversations as JSONL")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--count", type=int, default=3000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--tokens", type=int, default=1024, help="ids per row: the config's max_total_length")
    data.add_argument("--last-context-length", type=int, default=256)
    data.add_argument("--in-memory", type=float, default=0.85, help="share of rows whose evidence is in memory")
    data.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "src/longllama/models/small"))
    ev = commands.add_parser("eval", help="chat-format exact-match accuracy of a model folder")
    ev.add_argument("--model", required=True)
    ev.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 16384])
    ev.add_argument("--docs", type=int, default=10, help="documents per length (two questions each)")
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--plain-16k", type=int, default=10, help="plain-prompt pass-key trials at 16k")
    ev.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from longllama.tokenizer import load_tokenizer

    if args.command == "data":
        tokenizer = load_tokenizer(args.model)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = training_rows(
            tokenizer,
            count=args.count,
            seed=args.seed,
            tokens=args.tokens,
            last_context_length=args.last_context_length,
            in_memory=args.in_memory,
        )
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        os.replace(handle.name, args.out)
        return 0
    result = evaluate(args.model, args.lengths, args.docs, args.seed, args.plain_16k)
    result["summary"] = summarize(result)
    write_json_atomically(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
