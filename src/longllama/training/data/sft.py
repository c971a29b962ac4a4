"""Instruction / chat fine-tuning data (docs/finetuning.md#examples, D.2): templates, mixtures, padded examples,
filters, collation.

`InstructionExample` (OpenOrca-style rows) and `ChatExample` (ShareGPT-style rows) build one padded example of
`max_total_length` tokens with labels only on answers; `TEMPLATES` / `MIXTURES` hold the released recipes as data;
`SFTDataset`, `MixedDataset` and `filter_rows` cover datasets, mixing and the filter mini-language.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longllama.documents import JSONL_SUFFIXES, PARQUET_SUFFIXES, expand_paths, open_parquet, parse_json_line
from longllama.errors import InputError
from longllama.training.data.pretrain import check_positive

IGNORE_INDEX = -100  # label value torch's cross-entropy skips


# --------------------------------------------------------------------------------------------------------------------
# Instruction and chat fine-tuning (docs/finetuning.md)
# --------------------------------------------------------------------------------------------------------------------

AI_TASK_PROMPT = (
    "You are an AI assistant. User will you give you a task. "
    "Your goal is to complete the task as faithfully as you can.\n\n"
)
CHAT_PROMPT = (
    "A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted as ASSISTANT:). "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
)


@dataclass(frozen=True)
class InstructionTemplate:
    """How an OpenOrca-style row becomes texts: input = [pre_prompt + row[prompt_field] + post_prompt] (only with a
    prompt_field) + pre_question + row[question_field] + post_question; response = pre_response +
    row[response_field] + post_response. Defaults are the reference trainer's."""

    question_field: str = "question"
    response_field: str = "response"
    prompt_field: str | None = None
    pre_prompt: str = ""
    post_prompt: str = "\n"
    pre_question: str = ""
    post_question: str = "\n"
    pre_response: str = ""
    post_response: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """How a ShareGPT-style row becomes a conversation: `initial_prompt`, then per turn in row[conversations_field]
    the model or human prefix and turn[text_field]; turns whose turn[source_field] == model_source are learned.
    `replace_rules` are (regex, replacement) pairs applied in order to each turn text (re.DOTALL)."""

    conversations_field: str = "conversations"
    text_field: str = "value"
    source_field: str = "from"
    model_source: str = "gpt"
    initial_prompt: str = "You are a helpful ASSISTANT.\n\n"
    model_prefix: str = "\nASSISTANT: "
    human_prefix: str = "\nUSER: "
    replace_rules: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SFTLengths:
    """Truncation and padding (docs/finetuning.md#examples). max_input_length / max_output_length apply to instruction
    data only."""

    max_input_length: int = 2048
    max_output_length: int = 2048
    max_total_length: int = 2048
    always_pad: bool = True
    random_pad: bool = True

    def __post_init__(self) -> None:
        check_positive(
            max_input_length=self.max_input_length,
            max_output_length=self.max_output_length,
            max_total_length=self.max_total_length,
        )


# The templates of docs/finetuning.md#templates-and-mixtures, by name.
TEMPLATES: dict[str, InstructionTemplate | ChatTemplate] = {
    "openorca-3b": InstructionTemplate(
        prompt_field="system_prompt",
        post_prompt="\n",
        question_field="question",
        post_question="\n",
        response_field="response",
    ),
    "sharegpt-3b-v1.1": ChatTemplate(text_field="markdown", initial_prompt=CHAT_PROMPT),
    "code-7b-instruct-mathinstruct": InstructionTemplate(
        pre_question=AI_TASK_PROMPT,
        question_field="instruction",
        post_question="\nAnswer: ",
        response_field="output",
    ),
    "code-7b-instruct-openorca": InstructionTemplate(
        pre_question=AI_TASK_PROMPT,
        question_field="question",
        post_question=" ",
        response_field="response",
    ),
    "code-7b-instruct-sharegpt": ChatTemplate(text_field="markdown", initial_prompt=CHAT_PROMPT),
}

_NO_OPENAI_DAN = r"conversations.<int>*^.value<M>(?i)^((?!openai).)*$<;>conversations.<int>*^.value<M>^((?!DAN).)*$"
_CODE_CHAT_CLEAN = (
    r"conversations.<int>*^.value<M>(?i)^((?!((as a|I am).{0,32}language model)|(openai)|(against my guidelines)"
    r"|(I apologize)).)*$<;>conversations.<int>*^.value<M>^((?!DAN).)*$"
)
_ORCA_NON_ANSWERS = (
    r"response<M>(?i)^((?!(does not mention)|(it is not possible to)|(no answer\.$)"
    r"|(Insufficient information to provide an answer\.$)).)*$"
)


@dataclass(frozen=True)
class MixturePart:
    """One dataset of a fine-tuning mixture: its template, sampling proportion, filter rules and where it came from
    (a Hugging Face dataset id and revision, to export to a local file)."""

    template: str
    proportion: float
    filter: str = ""
    dataset: str = ""


@dataclass(frozen=True)
class Mixture:
    parts: tuple[MixturePart, ...]
    lengths: SFTLengths = dataclass_field(default_factory=SFTLengths)


_ORCA = "Open-Orca/OpenOrca@f0823c7ffc48c9d33a42f16cf0b885fed4a7d0a1"
_SHAREGPT = "zetavg/ShareGPT-Processed@15968d6dfa02529988da12e382af3ab7c857ebcd"
_MATH = "TIGER-Lab/MathInstruct@95969ba885cf13d89c1fc0990c1a246a46e388d6"

# The fine-tuning runs of docs/finetuning.md#templates-and-mixtures / D.3.
MIXTURES: dict[str, Mixture] = {
    "inst-3b-low-budget": Mixture(
        (MixturePart("openorca-3b", 1.0, dataset=_ORCA),),
        SFTLengths(max_input_length=1024, max_output_length=1024, max_total_length=1024),
    ),
    "instchat-3b-v1.1": Mixture(
        (
            MixturePart("openorca-3b", 0.99, dataset=_ORCA),
            MixturePart(
                "sharegpt-3b-v1.1",
                0.01,
                f"lang<M>^en$<;>{_NO_OPENAI_DAN}<;>conversations.<int>0.value<LENLT>8000",
                _SHAREGPT,
            ),
        ),
        SFTLengths(max_input_length=2048, max_output_length=2048, max_total_length=2048),
    ),
    "code-7b-instruct": Mixture(
        (
            MixturePart("code-7b-instruct-mathinstruct", 0.71, dataset=_MATH),
            MixturePart("code-7b-instruct-openorca", 0.16, "question<LENLT>5000", _ORCA),
            MixturePart(
                "code-7b-instruct-openorca",
                0.10,
                f"question<LENGT>5000<;>question<LENLT>12000<;>{_ORCA_NON_ANSWERS}",
                _ORCA,
            ),
            MixturePart(
                "code-7b-instruct-sharegpt",
                0.02,
                f"lang<M>^en$<;>conversations.<int>*.value<LENLT>6000<;>{_CODE_CHAT_CLEAN}",
                _SHAREGPT,
            ),
            MixturePart(
                "code-7b-instruct-sharegpt",
                0.01,
                f"lang<M>^en$<;>conversations.<int>*.value<LENGT>6000<;>conversations.<int>*.value<LENLT>12000"
                f"<;>{_CODE_CHAT_CLEAN}",
                _SHAREGPT,
            ),
        ),
        SFTLengths(max_input_length=3072, max_output_length=3072, max_total_length=3072),
    ),
}


def pad_id_of(tokenizer: Any) -> int:
    """The padding id of docs/finetuning.md#examples: the tokenizer's pad token, else its unk token (0 for LLaMA)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "unk_token_id", None)
    if pad is None:
        raise InputError("the tokenizer has neither a pad nor an unk token; set tokenizer.pad_token")
    return int(pad)


def _template(value: str | InstructionTemplate | ChatTemplate, kind: type) -> Any:
    template = TEMPLATES.get(value) if isinstance(value, str) else value
    if not isinstance(template, kind):
        names = ", ".join(name for name, t in TEMPLATES.items() if isinstance(t, kind))
        raise InputError(f"{value!r} is not a {kind.__name__}; use one of {names} or a {kind.__name__}(...)")
    return template


def _text_of(record: Any, name: str, what: str) -> str:
    if not isinstance(record, Mapping) or name not in record:
        raise InputError(f"{what} has no field {name!r}; set the template's field names to this data's")
    value = record[name]
    if not isinstance(value, str):
        raise InputError(f"{what} field {name!r} is {type(value).__name__}, not text")
    return value


class _ExampleBuilder:
    """Tokenizing, truncation, padding and masks shared by the instruction and chat builders."""

    mask_eos = False  # chat hides EOS tokens from attention (they stay targets)

    def __init__(self, tokenizer: Any, lengths: SFTLengths) -> None:
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.pad_id = pad_id_of(tokenizer)
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise InputError("the tokenizer has no BOS or EOS token; fine-tuning examples need both")

    def tokens(self, text: str) -> list[int]:
        # Each segment separately and without specials, so SentencePiece gives each its own dummy-prefix space.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def finish(self, ids: list[int], labels: list[int], rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        total = self.lengths.max_total_length
        ids, labels = ids[:total], labels[:total]
        padding = total - len(ids) if self.lengths.always_pad else 0
        left = 0
        if padding > 0 and self.lengths.random_pad:
            if rng is None:
                raise InputError("random_pad needs rng=np.random.default_rng(seed); or set random_pad=False")
            # How much padding goes left decides how much of the example lands in memory
            # (docs/finetuning.md#memory-in-fine-tuning).
            left = int(rng.integers(0, padding + 1))
        right = padding - left
        ids = [self.pad_id] * left + ids + [self.pad_id] * right
        labels = [IGNORE_INDEX] * left + labels + [IGNORE_INDEX] * right
        input_ids = torch.tensor(ids, dtype=torch.int64)
        attention_mask = input_ids != self.pad_id
        if self.mask_eos:
            attention_mask &= input_ids != self.eos_id
        return {
            "input_ids": input_ids,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "attention_mask": attention_mask,
        }


class InstructionExample(_ExampleBuilder):
    """Builds an instruction example (docs/finetuning.md#examples): in = [BOS] + tok(input text), cut to
    max_input_length; out =
    tok(response text) + [EOS], cut to max_output_length (which may drop the EOS); labels IGNORE on `in`; the
    whole cut to max_total_length and padded to it. Call with a row (dict) and, for random_pad, a numpy Generator.
    The reference drew random padding from the global numpy RNG; here the caller's Generator is used, so results
    are reproducible and independent of other code using numpy."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | InstructionTemplate = "openorca-3b",
        lengths: SFTLengths = SFTLengths(),
    ) -> None:
        super().__init__(tokenizer, lengths)
        self.template: InstructionTemplate = _template(template, InstructionTemplate)

    def texts(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """(input text, response text) of a row."""
        t = self.template
        prompt = ""
        if t.prompt_field is not None:
            prompt = t.pre_prompt + _text_of(row, t.prompt_field, "row") + t.post_prompt
        question = t.pre_question + _text_of(row, t.question_field, "row") + t.post_question
        response = t.pre_response + _text_of(row, t.response_field, "row") + t.post_response
        return prompt + question, response

    def __call__(self, row: Mapping[str, Any], *, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        question, response = self.texts(row)
        given = ([self.bos_id] + self.tokens(question))[: self.lengths.max_input_length]
        answer = (self.tokens(response) + [self.eos_id])[: self.lengths.max_output_length]
        return self.finish(given + answer, [IGNORE_INDEX] * len(given) + answer, rng)


class ChatExample(_ExampleBuilder):
    """Builds a chat example (docs/finetuning.md#examples): [BOS] + tok(initial prompt), then per turn tok(prefix) +
    tok(text), plus
    [EOS] after model turns; labels only on model texts and their EOS; cut to max_total_length and padded to it;
    attention_mask is also False on EOS tokens. See `InstructionExample` about `rng`."""

    mask_eos = True

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | ChatTemplate = "sharegpt-3b-v1.1",
        lengths: SFTLengths = SFTLengths(),
    ) -> None:
        super().__init__(tokenizer, lengths)
        self.template: ChatTemplate = _template(template, ChatTemplate)
        try:
            self._rules = [(re.compile(rule, re.DOTALL), new) for rule, new in self.template.replace_rules]
        except re.error as exc:
            raise InputError(f"chat replace rule is not a valid regex ({exc})") from exc
        self._model_prefix = self.tokens(self.template.model_prefix)
        self._human_prefix = self.tokens(self.template.human_prefix)

    def __call__(self, row: Mapping[str, Any], *, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        t = self.template
        ids = [self.bos_id] + self.tokens(t.initial_prompt)
        labels = [IGNORE_INDEX] * len(ids)
        turns = row.get(t.conversations_field) if isinstance(row, Mapping) else None
        if not isinstance(turns, list):
            raise InputError(f"row has no list field {t.conversations_field!r}; set conversations_field")
        for number, turn in enumerate(turns):
            text = _text_of(turn, t.text_field, f"turn {number}")
            for rule, new in self._rules:
                text = rule.sub(new, text)
            if t.source_field not in turn:
                raise InputError(f"turn {number} has no field {t.source_field!r}; set the template's source_field")
            learned = turn[t.source_field] == t.model_source
            prefix = self._model_prefix if learned else self._human_prefix
            body = self.tokens(text) + [self.eos_id] * learned
            ids += prefix + body
            labels += [IGNORE_INDEX] * len(prefix) + (body if learned else [IGNORE_INDEX] * len(body))
        return self.finish(ids, labels, rng)


def parse_replace_rules(text: str) -> tuple[tuple[str, str], ...]:
    """The reference's command-line form "regex<R>replacement<;>regex<R>replacement" as ChatTemplate.replace_rules."""
    rules = []
    for rule in filter(None, text.split("<;>")):
        if rule.count("<R>") != 1:
            raise InputError(f"replace rule {rule!r} needs exactly one '<R>' between regex and replacement")
        rules.append(tuple(rule.split("<R>")))
    return tuple(rules)


def collate_sft(examples: Sequence[Mapping[str, torch.Tensor]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padding any that are shorter (only when always_pad is off)."""
    pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": False}
    return {
        name: torch.nn.utils.rnn.pad_sequence([e[name] for e in examples], batch_first=True, padding_value=value)
        for name, value in pad_values.items()
    }


class SFTDataset(torch.utils.data.Dataset):
    """Rows (dicts) and an example builder as a map-style dataset of padded examples.

    Random padding of item i uses a Generator seeded with (seed, epoch, i): the same item gets the same padding in
    any DataLoader worker or order, and `set_epoch` gives it new padding in a new epoch.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], build: _ExampleBuilder, *, seed: int = 42) -> None:
        self.rows, self.build, self.seed, self.epoch = rows, build, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            return self.build(self.rows[index], rng=rng)
        except InputError as exc:
            raise InputError(f"row {index}: {exc}") from exc


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets mixed with given proportions (docs/finetuning.md#examples): the length is the sum of the
    lengths; a fixed
    mapping, drawn once with numpy seed 42 as the reference did, picks a dataset for each index, and item i is that
    dataset's item i mod its length. (The reference seeded the global numpy RNG and restored it; a private
    RandomState with the same seed gives the same mapping without touching global state.)"""

    def __init__(self, datasets: Sequence[Any], proportions: Sequence[float], *, seed: int = 42) -> None:
        if not datasets or len(datasets) != len(proportions):
            raise InputError(f"got {len(datasets)} datasets and {len(proportions)} proportions; give one per dataset")
        weights = np.asarray(proportions, dtype=np.float64)
        if (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-6:
            raise InputError(f"proportions {list(proportions)} must be non-negative and sum to 1")
        if any(len(dataset) == 0 for dataset in datasets):
            raise InputError("a dataset of the mixture is empty (all rows filtered out?); drop it or fix its filter")
        self.datasets = list(datasets)
        total = sum(len(dataset) for dataset in self.datasets)
        if len(self.datasets) == 1:
            self.mapping = np.zeros(total, dtype=np.int64)
        else:
            self.mapping = np.random.RandomState(seed).choice(len(self.datasets), total, replace=True, p=weights)

    def __len__(self) -> int:
        return len(self.mapping)

    def __getitem__(self, index: int) -> Any:
        dataset = self.datasets[int(self.mapping[index])]
        return dataset[index % len(dataset)]


def read_rows(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """All records of .jsonl (one JSON object per line) or .parquet files, in order, for fine-tuning datasets."""
    rows: list[dict[str, Any]] = []
    for path in expand_paths(paths):
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            rows.extend(open_parquet(path, ()).read().to_pylist())
        elif suffix in JSONL_SUFFIXES:
            rows.extend(_jsonl_records(path))
        else:
            raise InputError(f"{path}: fine-tuning rows must come from .jsonl or .parquet files")
    return rows


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if raw.strip():
                where = f"{path} line {line}"
                record = parse_json_line(raw, where)
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield record


# --------------------------------------------------------------------------------------------------------------------
# Row filters (docs/finetuning.md#examples): "path<MODE>arg" rules joined by "<;>"
# --------------------------------------------------------------------------------------------------------------------

_MODES = ("<M>", "<LENLT>", "<LENGT>", "<TOKLT>", "<TOKGT>")
_INT = "<int>"


@dataclass(frozen=True)
class _Rule:
    path: tuple[str, ...]
    mode: str
    pattern: re.Pattern[str] | None
    bound: int


def _parse_rule(text: str) -> _Rule:
    found = [(text.find(mode), mode) for mode in _MODES if mode in text]
    if not found:
        raise InputError(f"filter rule {text!r} has no mode; use one of {', '.join(_MODES)}")
    at, mode = min(found)  # the first marker separates the field path from its argument
    path, arg = tuple(text[:at].split(".")), text[at + len(mode) :]
    if mode == "<M>":
        try:
            return _Rule(path, mode, re.compile(arg, re.DOTALL), 0)
        except re.error as exc:
            raise InputError(f"filter rule {text!r}: bad regex ({exc})") from exc
    try:
        return _Rule(path, mode, None, int(arg))
    except ValueError as exc:
        raise InputError(f"filter rule {text!r}: {mode} needs an integer, got {arg!r}") from exc


def _step(value: Any, key: str, where: str) -> Any:
    try:
        return value[int(key[len(_INT) :])] if key.startswith(_INT) else value[key]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: cannot follow {key!r} of the filter path") from exc


def _matches(value: Any, path: Sequence[str], pattern: re.Pattern[str], where: str) -> bool:
    if not path:
        if not isinstance(value, str):
            raise InputError(f"{where}: filter path ends at {type(value).__name__}, not text")
        return pattern.match(value) is not None
    head, rest = path[0], path[1:]
    if head in (f"{_INT}*^", f"{_INT}*v"):  # all / any list element
        results = (_matches(item, rest, pattern, where) for item in value)
        return all(results) if head.endswith("^") else any(results)
    return _matches(_step(value, head, where), rest, pattern, where)


def _measure(value: Any, path: Sequence[str], size: Callable[[str], int], where: str) -> int:
    if not path:
        if not isinstance(value, str):
            raise InputError(f"{where}: filter path ends at {type(value).__name__}, not text")
        return size(value)
    head, rest = path[0], path[1:]
    if head == f"{_INT}*":  # summed over list elements
        return sum(_measure(item, rest, size, where) for item in value)
    return _measure(_step(value, head, where), rest, size, where)


def make_filter(spec: str, *, tokenizer: Any = None) -> Callable[[Mapping[str, Any]], bool]:
    """A row predicate from rules "path<MODE>arg" joined by "<;>": <M> regex match from the start (re.DOTALL);
    <LENLT>/<LENGT> character length strictly below/above; <TOKLT>/<TOKGT> token count (needs `tokenizer`).
    Path parts are dict keys or `<int>N` (index N), `<int>*^` (all elements match), `<int>*v` (any element
    matches), `<int>*` (lengths summed over elements). An empty spec keeps every row."""
    rules = [_parse_rule(text) for text in spec.split("<;>") if text]
    if tokenizer is None and any(rule.mode.startswith("<TOK") for rule in rules):
        raise InputError("token-count filters (<TOKLT>/<TOKGT>) need tokenizer=")

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def keep(row: Mapping[str, Any]) -> bool:
        for rule in rules:
            where = "filter " + ".".join(rule.path)
            if rule.pattern is not None:
                if not _matches(row, rule.path, rule.pattern, where):
                    return False
                continue
            size = len if rule.mode.startswith("<LEN") else count_tokens
            amount = _measure(row, rule.path, size, where)
            if (amount >= rule.bound) if rule.mode.endswith("LT>") else (amount <= rule.bound):
                return False
        return True

    return keep


def filter_rows(rows: Iterable[Mapping[str, Any]], spec: str, *, tokenizer: Any = None) -> list[Mapping[str, Any]]:
    """The rows that pass `make_filter(spec)`."""
    keep = make_filter(spec, tokenizer=tokenizer)
    return [row for row in rows if keep(row)]
