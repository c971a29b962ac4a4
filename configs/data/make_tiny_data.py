"""Regenerate the tiny training data of configs/tiny-*.yaml: synthetic texts and a SentencePiece tokenizer for them.

    python3 configs/data/make_tiny_data.py

Writes, next to this file: tiny-pretrain.jsonl (short "ledger" documents: who owns what, small sums, and a closing
line that repeats a fact from the start of the document, so earlier context helps), tiny-eval.jsonl (more of the
same, other seed), tiny-instruct.jsonl (OpenOrca-style rows: system_prompt / question / response) and
tiny-tokenizer/tokenizer.model (a 320-piece BPE SentencePiece model with LLaMA's special ids: unk 0, bos 1, eos 2).
Everything is drawn from a fixed seed, so the files are the same on every run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["Mara", "Tovan", "Rhea", "Ilse", "Bram", "Odo", "Petra", "Kai", "Lena", "Sami", "Yara", "Finn"]
THINGS = ["goats", "lamps", "keys", "boats", "coins", "books", "bells", "jars"]
PLACES = ["the mill", "the harbour", "the north gate", "the old well", "the market", "the tower"]
VOCAB_SIZE = 320


def ledger(rng: random.Random) -> str:
    """One document: owners and counts, a few transfers with their sums, then a recall of the first owner."""
    owner, place = rng.choice(NAMES), rng.choice(PLACES)
    thing = rng.choice(THINGS)
    count = rng.randint(2, 9)
    lines = [f"Ledger of {place}. {owner} keeps {count} {thing} at {place}."]
    for _ in range(rng.randint(3, 8)):
        giver, taker = rng.sample(NAMES, 2)
        item = rng.choice(THINGS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append(f"{giver} gives {a} {item} to {taker}. {taker} had {b}, so {taker} now has {a + b} {item}.")
    lines.append(f"The keeper of {place} is {owner}, with {count} {thing}.")
    return " ".join(lines)


def instruction(rng: random.Random) -> dict[str, str]:
    """One OpenOrca-style row: a short ledger question or a sum."""
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return {"system_prompt": "", "question": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    owner, place, thing = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    count = rng.randint(2, 9)
    question = f"{owner} keeps {count} {thing} at {place}. Who keeps the {thing}?"
    return {"system_prompt": "Answer briefly.", "question": question, "response": f"{owner} keeps them."}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def train_tokenizer(texts: list[str], folder: Path) -> None:
    import io

    import sentencepiece as spm

    folder.mkdir(exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        # As LLaMA's: no character map (which alone would be ~240 KB) and spaces kept as they are.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def main() -> None:
    rng = random.Random(1234)
    pretrain = [{"text": ledger(rng)} for _ in range(260)]
    evaluation = [{"text": ledger(random.Random(99 + i))} for i in range(24)]
    instruct = [instruction(rng) for _ in range(300)]
    write_jsonl(HERE / "tiny-pretrain.jsonl", pretrain)
    write_jsonl(HERE / "tiny-eval.jsonl", evaluation)
    write_jsonl(HERE / "tiny-instruct.jsonl", instruct)
    texts = [row["text"] for row in pretrain] + [" ".join(row.values()) for row in instruct]
    train_tokenizer(texts, HERE / "tiny-tokenizer")


if __name__ == "__main__":
    main()
