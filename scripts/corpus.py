"""Build the project's own offline training corpus and tokenizer from what is installed on this machine.

Real text that exists everywhere Python runs: the source code of the standard library and of the installed
distributions. The files of one package are concatenated (a `# file: <path>` line before each) into long documents,
as FoT's code data was, and cut at file boundaries into documents of at most `max_doc_chars` characters
(`max_heldout_doc_chars` for held-out packages, whose documents are only scored, so they can hold long contexts).

* Packages. Each installed distribution is one package (its `.py` files from its RECORD, named by its canonical
  distribution name, with its version). The standard library is split into several packages so that some of it can
  be held out: each top-level stdlib package is one (`stdlib.asyncio`, `stdlib.email`, ...) and the top-level stdlib
  modules together are one more (`stdlib`). Test suites (folders named `test`, `tests`, `idle_test`) are left out:
  they are dominated by repeated assertions and data fixtures and would give a few packages most of the weight.
  Also skipped: non-UTF-8 files, files over `max_file_chars` or with a line over `max_line_chars` (embedded data,
  generated tables), setuptools' editable-install finders (machine paths), and exact duplicates of files already
  taken (vendored copies), so that no held-out file also appears in the training split.
* Split. A package is held out when sha256("{seed}:{name}") read as a fraction is below `heldout_fraction`. The
  rule looks at the name only, so a package lands in the same split on every machine that has it. Two exceptions:
  a package with more than `max_heldout_bytes` of .py files always trains (one giant package such as transformers
  would otherwise take a quarter of all the code away from training), and when the rule leaves a split empty the
  eligible package with the lowest (or highest) score is moved over.
* Synthetic retrieval documents: a pass key stated at a chosen depth and asked for at the end, or `key: value` lines
  scattered through the text and queried at the end. Their filler comes from the code of the same split (slices of
  code, shuffled lines, comment and docstring prose, random words and numbers); never the passkey evaluation's
  filler (docs/evaluation.md#passkey-retrieval): lines holding any of its sentences are dropped from the filler.
* Tokenizer: SentencePiece BPE trained on a seeded sample of the training text, LLaMA-style (unk 0, bos 1, eos 2,
  no pad, byte fallback, digits split, spaces kept as they are for code), checked against `load_tokenizer`.

Output folder (JSON lines, one document per line, the text in "text" as `longllama.documents` reads it):

* train.jsonl: training code documents and synthetic documents, in one seeded shuffled order (the training reader
  goes through a file front to back). Code: {"text", "source": "code", "package", "part"}; synthetic:
  {"text", "source": "synthetic", "task": "passkey" | "kv", "filler": style, "answer", "depth" | "pairs"}.
* heldout.jsonl: code of the held-out packages only (held-out perplexity on packages never trained on).
* heldout-synthetic.jsonl: synthetic documents whose filler comes from held-out code.
* tokenizer/tokenizer.model, and manifest.json (written last; it holds the sha256 of every other file).

Everything is seeded and written atomically; the same installed packages and the same options give byte-identical
files. Different machines have different packages (and versions) installed, so they give different corpora:
`manifest.json` lists every package with its version, split and size, and the hash of every file written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import re
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from longllama.errors import InputError
from longllama.evals import kv  # the key-value layout, shared with the evaluation (`longllama kv`)

logger = logging.getLogger(__name__)

FORMAT = "longllama-corpus/1"
TRAIN, HELDOUT = "train", "heldout"
TOKENIZER_DIR = "tokenizer"

# The passkey evaluation's filler (docs/evaluation.md#passkey-retrieval). Synthetic training documents must never
# contain it, so that the
# evaluation measures retrieval out of text the model was not drilled on.
EVAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
EVAL_FILLER_SENTENCES = (
    "the grass is green",
    "the sky is blue",
    "the sun is yellow",
    "here we go",
    "there and back again",
)
# The evaluation's prompt lines (docs/evaluation.md#passkey-retrieval). Training on the same wording is intended: only
# the filler must differ.
EVAL_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
EVAL_QUESTION = "What is the pass key? The pass key is"

SKIP_DIRS = frozenset(
    {"test", "tests", "_tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "lib-dynload"}
)
_TEST_FILE = re.compile(r"(test_.*|.*_test|conftest)\.py")
STDLIB = "stdlib"

# RNG streams of numpy.random.default_rng([seed, stream, ...]); one per independent use.
_SYNTH_TRAIN, _SYNTH_HELDOUT, _SHUFFLE, _TOKENIZER_SAMPLE, _POOL_TRAIN, _POOL_HELDOUT = range(1, 7)


@dataclass(frozen=True)
class CorpusOptions:
    """What `prepare_corpus` builds; every field is recorded in the manifest."""

    seed: int = 0
    heldout_fraction: float = 0.05
    max_heldout_bytes: int = 5_000_000  # bigger packages always train
    max_doc_chars: int = 100_000  # ~30k tokens of code: many 512-token windows per document
    # Held-out documents only score (perplexity as the memory grows): longer ones allow contexts of ~100k tokens.
    max_heldout_doc_chars: int = 400_000
    max_file_chars: int = 1_000_000
    max_line_chars: int = 4_000
    # Synthetic documents mixed into train.jsonl: ~25% of the training tokens with the installed code of a typical
    # machine, short enough (~600-2400 tokens) that a 4-window pack of 512 tokens holds both key and question.
    synthetic: int = 16_000
    heldout_synthetic: int = 64  # synthetic documents with held-out filler, in heldout-synthetic.jsonl
    synthetic_chars: tuple[int, int] = (2_000, 8_000)  # log-uniform length range
    filler_pool_chars: int = 16_000_000  # code text the synthetic filler is drawn from
    vocab_size: int = 8192
    tokenizer_sample_chars: int = 32_000_000
    limit_packages: int | None = None  # keep only the K smallest packages (quick runs, tests)
    include_stdlib: bool = True
    include_distributions: bool = True
    num_threads: int = 2
    count_tokens: bool = True

    def check(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise InputError(f"heldout_fraction is {self.heldout_fraction}; pass a fraction in [0, 1), e.g. 0.05")
        if self.max_heldout_bytes < 0:
            raise InputError(f"max_heldout_bytes is {self.max_heldout_bytes}; pass 0 or more")
        for name in ("max_doc_chars", "max_heldout_doc_chars"):
            if getattr(self, name) < 1_000:
                raise InputError(f"{name} is {getattr(self, name)}; pass at least 1000")
        low, high = self.synthetic_chars
        if not 1_000 <= low <= high:
            raise InputError(f"synthetic_chars is {low}..{high}; pass 1000 <= MIN <= MAX")
        if self.synthetic < 0 or self.heldout_synthetic < 0:
            raise InputError("the number of synthetic documents cannot be negative")
        if self.vocab_size < 300:
            raise InputError(f"vocab_size {self.vocab_size} leaves no room beyond the 259 byte/special pieces")
        if self.limit_packages is not None and self.limit_packages < 1:
            raise InputError(f"limit_packages is {self.limit_packages}; pass a positive number or leave it unset")
        if self.num_threads < 1:
            raise InputError(f"num_threads is {self.num_threads}; pass at least 1")


# --------------------------------------------------------------------------------------------------------------------
# Finding the packages
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PackageSource:
    """One package before reading: its files as (path shown in the document header, path on disk)."""

    name: str
    version: str
    origin: str  # "stdlib" or "distribution"
    files: list[tuple[str, Path]]

    def size(self) -> int:
        return sum(_file_size(path) for _, path in self.files)


@dataclass
class Package:
    """A package read and turned into documents."""

    name: str
    version: str
    origin: str
    split: str
    documents: list[str] = field(default_factory=list)
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def chars(self) -> int:
        return sum(map(len, self.documents))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _keep_path(parts: Sequence[str]) -> bool:
    """A .py file outside test suites and caches, not a setuptools editable-install finder."""
    if not parts or not parts[-1].endswith(".py") or parts[-1].startswith("__editable__"):
        return False
    if _TEST_FILE.fullmatch(parts[-1]):
        return False
    folders = parts[:-1]
    return ".." not in folders and not any(part in SKIP_DIRS or part.startswith("config-") for part in folders)


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, so that `Foo_Bar` and `foo-bar` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def stdlib_sources(stdlib_dir: str | os.PathLike[str] | None = None) -> list[PackageSource]:
    """The standard library as packages: one per top-level package, plus `stdlib` for the top-level modules."""
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        logger.warning("standard library folder %s not found; leaving the standard library out", root)
        return []
    groups: dict[str, list[tuple[str, Path]]] = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()  # os.walk visits in listing order; sorting makes the file order reproducible
        for name in sorted(names):
            relative = Path(folder, name).relative_to(root)
            if _keep_path(relative.parts):
                group = STDLIB if len(relative.parts) == 1 else f"{STDLIB}.{relative.parts[0]}"
                groups.setdefault(group, []).append((relative.as_posix(), root / relative))
    version = platform.python_version()
    return [PackageSource(name, version, STDLIB, sorted(files)) for name, files in sorted(groups.items())]


def distribution_sources(paths: Sequence[str] | None = None) -> list[PackageSource]:
    """Installed distributions (on `paths`, default sys.path), one package each, first found wins like imports."""
    found: dict[str, PackageSource] = {}
    finder = {"path": list(paths)} if paths is not None else {}
    dists = importlib.metadata.distributions(**finder)
    for dist in dists:
        raw_name = dist.metadata["Name"] if dist.metadata else None
        if not raw_name:
            continue
        name = canonical_name(raw_name)
        if name in found:  # canonical names hold no ".", so they never clash with the "stdlib.*" packages
            continue
        files = [
            (record.as_posix(), Path(dist.locate_file(record)))
            for record in (dist.files or [])
            if _keep_path(record.parts)
        ]
        found[name] = PackageSource(name, dist.version or "unknown", "distribution", sorted(files))
        if dist.files is None:
            logger.info("%s %s lists no files (no RECORD); it contributes nothing", name, dist.version)
    return [found[name] for name in sorted(found)]


def find_sources(
    options: CorpusOptions, *, stdlib_dir: str | os.PathLike[str] | None = None, site_paths: Sequence[str] | None = None
) -> list[PackageSource]:
    """Every package with at least one file, sorted by name; the K smallest only with `limit_packages`."""
    sources = stdlib_sources(stdlib_dir) if options.include_stdlib else []
    if options.include_distributions:
        sources += distribution_sources(site_paths)
    sources = [source for source in sources if source.files]
    if options.limit_packages is not None:
        by_size = sorted(sources, key=lambda source: (source.size(), source.name))
        sources = by_size[: options.limit_packages]
    if not sources:
        raise InputError("found no Python source files in the standard library or installed packages")
    return sorted(sources, key=lambda source: source.name)


# --------------------------------------------------------------------------------------------------------------------
# Train / held-out split by package
# --------------------------------------------------------------------------------------------------------------------


def heldout_score(name: str, *, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, package name) alone, the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_packages(
    sizes: dict[str, int], *, seed: int, heldout_fraction: float, max_heldout_bytes: int | None = None
) -> dict[str, str]:
    """name -> "train" or "heldout", from the package names and sizes (bytes of source); with two or more packages
    and a fraction above 0, neither split is left empty."""
    eligible = {name for name, size in sizes.items() if max_heldout_bytes is None or size <= max_heldout_bytes}
    scores = {name: heldout_score(name, seed=seed) for name in sizes}
    split = {name: HELDOUT if name in eligible and scores[name] < heldout_fraction else TRAIN for name in sizes}
    if len(split) >= 2 and heldout_fraction > 0 and eligible:
        ranked = sorted(eligible, key=lambda name: (scores[name], name))
        if HELDOUT not in split.values():
            split[ranked[0]] = HELDOUT
        if TRAIN not in split.values():
            split[ranked[-1]] = TRAIN
    return split


# --------------------------------------------------------------------------------------------------------------------
# Reading files and building documents
# --------------------------------------------------------------------------------------------------------------------


def read_source(path: Path, *, max_file_chars: int, max_line_chars: int) -> tuple[str | None, str]:
    """(text, "") for a usable source file, else (None, why it was skipped)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        return None, "binary"
    if not text.strip():
        return None, "empty"
    if len(text) > max_file_chars:
        return None, "too_large"
    if max(map(len, text.split("\n"))) > max_line_chars:
        return None, "long_line"
    return (text if text.endswith("\n") else text + "\n"), ""


def _split_long_block(relative: str, text: str, limit: int) -> list[str]:
    """A file too long for one document, cut at line ends (mid-line only for a line longer than a block)."""
    blocks: list[str] = []
    header = f"# file: {relative}\n"
    current = header
    for line in text.splitlines(keepends=True):
        if current != header and len(current) + len(line) > limit:
            blocks.append(current)
            header = current = f"# file: {relative} (continued)\n"
        while len(current) + len(line) > limit:
            room = max(limit - len(current), 1)
            blocks.append(current + line[:room])
            line = line[room:]
            header = current = f"# file: {relative} (continued)\n"
        current += line
    if current != header:
        blocks.append(current)
    return blocks


def package_documents(files: Iterable[tuple[str, str]], *, max_doc_chars: int) -> list[str]:
    """The (relative path, text) files of one package joined into documents of at most `max_doc_chars`, cut at file
    boundaries; each file starts with a `# file: <path>` line and files are separated by a blank line."""
    documents: list[str] = []
    current = ""
    for relative, text in files:
        block = f"# file: {relative}\n{text}"
        pieces = [block] if len(block) <= max_doc_chars else _split_long_block(relative, text, max_doc_chars)
        for piece in pieces:
            joined = f"{current}\n{piece}" if current else piece
            if len(joined) <= max_doc_chars:
                current = joined
            else:
                documents.append(current)
                current = piece
    if current:
        documents.append(current)
    return documents


def read_packages(sources: Sequence[PackageSource], split: dict[str, str], options: CorpusOptions) -> list[Package]:
    """Read every package (training ones first, so a file duplicated in a held-out package is dropped there)."""
    seen: set[bytes] = set()
    ordered = sorted(sources, key=lambda source: (split[source.name] != TRAIN, source.name))
    packages = [_read_package(source, split[source.name], seen, options) for source in ordered]
    return sorted(packages, key=lambda package: package.name)


def _read_package(source: PackageSource, split: str, seen: set[bytes], options: CorpusOptions) -> Package:
    package = Package(source.name, source.version, source.origin, split)
    kept: list[tuple[str, str]] = []
    for relative, path in source.files:
        text, why = read_source(path, max_file_chars=options.max_file_chars, max_line_chars=options.max_line_chars)
        if text is not None:
            digest = hashlib.sha1(text.encode()).digest()
            why = "duplicate" if digest in seen else ""
            seen.add(digest)
        if why:
            package.skipped[why] = package.skipped.get(why, 0) + 1
        else:
            kept.append((relative, text))
    package.files = len(kept)
    limit = options.max_doc_chars if split == TRAIN else options.max_heldout_doc_chars
    package.documents = package_documents(kept, max_doc_chars=limit)
    return package


# --------------------------------------------------------------------------------------------------------------------
# Synthetic retrieval documents
# --------------------------------------------------------------------------------------------------------------------


def contains_eval_filler(text: str) -> bool:
    """Whether `text` holds any sentence of the passkey evaluation's filler (case-insensitive)."""
    lowered = text.lower()
    return any(sentence in lowered for sentence in EVAL_FILLER_SENTENCES)


_WORD = re.compile(r"[A-Za-z]{3,12}")


_NOT_PROSE = re.compile(r"[^A-Za-z ]")


def _is_prose(line: str) -> bool:
    """A comment or docstring line of English: mostly letters and spaces, five words or more."""
    if len(line) < 30 or line.count(" ") < 4:
        return False
    return len(_NOT_PROSE.findall(line)) <= 0.15 * len(line)


class FillerPool:
    """Text to hide keys in, drawn from code documents in four styles (never the evaluation's filler)."""

    STYLES = ("code", "lines", "prose", "words")
    WEIGHTS = (0.4, 0.2, 0.2, 0.2)

    def __init__(self, documents: Sequence[str]) -> None:
        self.docs = [lines for lines in (self._clean_lines(doc) for doc in documents) if lines]
        self.lines = [line.strip() for lines in self.docs for line in lines if line.strip()]
        self.prose = [
            text for text in (line.lstrip("#").strip().strip("\"'").strip() for line in self.lines) if _is_prose(text)
        ]
        self.words = sorted({word.lower() for line in self.prose or self.lines for word in _WORD.findall(line)})
        if not self.lines or not self.words:
            raise InputError("the documents hold no text to make synthetic filler from; include more packages")

    @staticmethod
    def _clean_lines(document: str) -> list[str]:
        return [line for line in document.split("\n") if not contains_eval_filler(line)]

    def filler(self, rng: np.random.Generator, chars: int, *, style: str) -> str:
        """About `chars` characters (at least) of filler in one of `STYLES`."""
        make = {"code": self._code, "lines": self._lines, "prose": self._prose, "words": self._words}[style]
        parts: list[str] = []
        total = 0
        while total < chars:
            part = make(rng)
            parts.append(part)
            total += len(part) + 1
        return "\n".join(parts)

    def _code(self, rng: np.random.Generator) -> str:
        """A run of up to 200 consecutive lines of one document."""
        lines = self.docs[int(rng.integers(len(self.docs)))]
        start = int(rng.integers(len(lines)))
        return "\n".join(lines[start : start + 200])

    def _lines(self, rng: np.random.Generator) -> str:
        return self.lines[int(rng.integers(len(self.lines)))]

    def _prose(self, rng: np.random.Generator) -> str:
        """A paragraph of 3-8 comment/docstring lines from anywhere (shuffled prose)."""
        source = self.prose or self.lines
        return " ".join(source[int(i)] for i in rng.integers(len(source), size=int(rng.integers(3, 9))))

    def _words(self, rng: np.random.Generator) -> str:
        """A paragraph of random sentences of corpus words, with numbers among them."""
        sentences = []
        for _ in range(int(rng.integers(3, 8))):
            words = [
                self.words[int(i)] if rng.random() > 0.1 else str(int(rng.integers(10 ** int(rng.integers(1, 6)))))
                for i in rng.integers(len(self.words), size=int(rng.integers(4, 14)))
            ]
            sentences.append(" ".join(words).capitalize() + ".")
        return " ".join(sentences)


def _cut_at(text: str, position: int) -> int:
    """`position` moved back to just after a newline or space within 400 characters, so words stay whole."""
    position = max(0, min(position, len(text)))
    boundary = max(text.rfind("\n", 0, position), text.rfind(" ", 0, position))
    return boundary + 1 if boundary >= 0 and position - boundary <= 400 else position


def _trim(text: str, chars: int) -> str:
    return text[: _cut_at(text, chars)].rstrip() if len(text) > chars else text


def _pass_key(rng: np.random.Generator) -> str:
    """Half in the evaluation's range (1..49999), half of any length from 1 to 6 digits."""
    if rng.random() < 0.5:
        return str(int(rng.integers(1, 50_000)))
    return str(int(rng.integers(1, 10 ** int(rng.integers(1, 7)))))


_PASSKEY_INTROS = (
    EVAL_INTRO,
    "A pass key is hidden somewhere in the long text below. Find it and remember it; you will be asked for it.",
    "Read the following text carefully. Somewhere in it there is a pass key that you must recall at the end.",
)
_PASSKEY_LINES = (
    "The pass key is {key}. Remember it. {key} is the pass key.",
    "Remember this pass key: {key}. The pass key is {key}.",
    "Important: the pass key is {key}. Keep {key} in mind.",
)


def passkey_document(
    pool: FillerPool, rng: np.random.Generator, *, chars: int, depth: float, style: str = "code", key: str | None = None
) -> dict[str, Any]:
    """A pass key stated at `depth` (the fraction of the filler before it) and asked for at the very end.

    The layout is the evaluation's (intro, filler, key line, filler, question, all joined by newlines); the last
    line also gives the answer, so a language model learns to copy the key from far back.
    """
    key = key or _pass_key(rng)
    # The evaluation's own wording half of the time; the rest varies it so the skill is not tied to one phrasing.
    intro = _PASSKEY_INTROS[0] if rng.random() < 0.5 else _PASSKEY_INTROS[int(rng.integers(1, len(_PASSKEY_INTROS)))]
    statement = _PASSKEY_LINES[0 if rng.random() < 0.5 else int(rng.integers(1, len(_PASSKEY_LINES)))]
    statement = statement.format(key=key)
    question = f"{EVAL_QUESTION} {key}."
    room = max(chars - len(intro) - len(statement) - len(question) - 4, 100)
    filler = _trim(pool.filler(rng, room, style=style), room)
    cut = _cut_at(filler, round(depth * len(filler)))
    text = "\n".join([intro, filler[:cut].rstrip(), statement, filler[cut:].lstrip(), question])
    return {
        "text": text,
        "source": "synthetic",
        "task": "passkey",
        "filler": style,
        "answer": key,
        "depth": round(depth, 4),
    }


def _kv_key(pool: FillerPool, rng: np.random.Generator) -> str:
    words = [pool.words[int(i)] for i in rng.integers(len(pool.words), size=2)]
    return f"{words[0]}_{words[1]}_{int(rng.integers(100, 1000))}"


def kv_document(pool: FillerPool, rng: np.random.Generator, *, chars: int, style: str = "code") -> dict[str, Any]:
    """`key: value` lines at random depths (about one per 4000 characters), then questions about some of them."""
    count = int(np.clip(chars // 4000, 2, 24))
    pairs: dict[str, str] = {}
    while len(pairs) < count:
        pairs.setdefault(_kv_key(pool, rng), kv.draw_value(rng))
    keys = list(pairs)
    asked = [keys[int(i)] for i in rng.permutation(count)[: int(rng.integers(1, min(count, 5) + 1))]]
    questions = [f"{kv.QUESTION_LINE.format(key=key)} {pairs[key]}." for key in asked]
    room = max(chars - len(kv.INTRO_LINE) - sum(len(q) + 1 for q in questions) - sum(len(k) + 12 for k in keys), 100)
    filler = _trim(pool.filler(rng, room, style=style), room)
    cuts = sorted(_cut_at(filler, round(depth * len(filler))) for depth in rng.random(count))
    segments = [filler[start:end].strip("\n") for start, end in zip([0, *cuts], [*cuts, len(filler)], strict=True)]
    body = [segments[0]]
    for key, segment in zip(keys, segments[1:], strict=True):
        body += [f"{key}: {pairs[key]}", segment]
    text = "\n".join([kv.INTRO_LINE, *[part for part in body if part], *questions])
    return {
        "text": text,
        "source": "synthetic",
        "task": "kv",
        "filler": style,
        "pairs": count,
        "answer": " ".join(pairs[key] for key in asked),
    }


def synthetic_documents(
    pool: FillerPool, *, count: int, seed: int, stream: int = _SYNTH_TRAIN, chars: tuple[int, int] = (7_000, 100_000)
) -> list[dict[str, Any]]:
    """`count` retrieval documents, half pass keys and half key-value lookups, lengths log-uniform in `chars`.

    Document i depends only on (seed, stream, i), so a larger count extends a smaller one.
    """
    documents = []
    for index in range(count):
        rng = np.random.default_rng([seed, stream, index])
        length = round(math.exp(rng.uniform(math.log(chars[0]), math.log(chars[1]))))
        style = FillerPool.STYLES[int(rng.choice(len(FillerPool.STYLES), p=FillerPool.WEIGHTS))]
        passkey = rng.random() < 0.5
        while True:
            if passkey:
                document = passkey_document(pool, rng, chars=length, depth=float(rng.random()), style=style)
            else:
                document = kv_document(pool, rng, chars=length, style=style)
            # Filler lines never hold an evaluation sentence, but joined prose lines or random words could spell
            # one across a join (vanishingly rare): draw again from the same generator, which stays reproducible.
            if not contains_eval_filler(document["text"]):
                break
        documents.append(document)
    return documents


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def tokenizer_sentences(texts: Sequence[str], *, sample_chars: int, seed: int, sentence_chars: int = 4000) -> list[str]:
    """A seeded sample of about `sample_chars` characters: the same share of every text (a run of whole lines at a
    random place), cut into multi-line "sentences" so that newlines and indentation are learnt in context."""
    total = sum(map(len, texts))
    share = min(1.0, sample_chars / max(total, 1))
    rng = np.random.default_rng([seed, _TOKENIZER_SAMPLE])
    sentences: list[str] = []
    for text in texts:
        want = math.ceil(len(text) * share)
        start = text.rfind("\n", 0, int(rng.integers(len(text) - want + 1))) + 1  # from the start of a line
        current = ""
        for line in text[start : start + want].splitlines(keepends=True):
            if current and len(current) + len(line) > sentence_chars:
                sentences.append(current)
                current = ""
            current += line[:sentence_chars]
        if current.strip():
            sentences.append(current)
    return sentences


def train_tokenizer(
    sentences: Sequence[str], out_dir: str | os.PathLike[str], *, vocab_size: int, num_threads: int = 2
) -> Path:
    """Train a LLaMA-style SentencePiece BPE model on `sentences` into out_dir/tokenizer.model (atomically)."""
    if not any(sentence.strip() for sentence in sentences):
        raise InputError("no text to train the tokenizer on; include more packages")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        # Code: keep every space, tab and newline as written (no NFKC, no collapsing), and let runs of spaces
        # (indentation) become pieces of their own.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=16_384,
        # The sample is drawn (and capped) by tokenizer_sentences with the corpus seed; SentencePiece's own
        # sampling would use its own random generator, so it is switched off.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # A small test corpus cannot fill a large vocabulary; take fewer pieces instead of failing.
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    path = Path(out_dir) / "tokenizer.model"
    atomic_write(path, buffer.getvalue())
    return path


def check_tokenizer(folder: str | os.PathLike[str], samples: Iterable[str]) -> list[str]:
    """The samples on which `load_tokenizer` (without BOS) and SentencePiece give different ids; [] when all agree."""
    from longllama.tokenizer import load_tokenizer

    processor = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    tokenizer = load_tokenizer(folder)
    return [
        text for text in samples if list(tokenizer.encode(text, add_special_tokens=False)) != processor.encode(text)
    ]


def count_tokens(model_file: Path, texts: Sequence[str], *, num_threads: int) -> int:
    """SentencePiece tokens (no BOS/EOS) in `texts`. One text per call from a thread pool: SentencePiece's own
    batch `num_threads` did not run in parallel here, while single calls partly release the GIL."""
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    with ThreadPoolExecutor(num_threads) as pool:
        return sum(pool.map(lambda text: len(processor.encode(text)), texts))


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)  # the only way to read the umask is to set it
    os.umask(current)
    return current


def jsonl_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create `out_dir` if needed and make sure files can be written there, before any slow work."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise InputError(f"cannot write to output folder {path} ({reason}); pass a writable --out") from exc
    return path


# --------------------------------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------------------------------


def prepare_corpus(
    out_dir: str | os.PathLike[str],
    options: CorpusOptions | None = None,
    *,
    stdlib_dir: str | os.PathLike[str] | None = None,
    site_paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build train.jsonl, heldout.jsonl, heldout-synthetic.jsonl, tokenizer/tokenizer.model and manifest.json in
    `out_dir`; return the manifest plus `seconds` (wall time, not written: it would break reproducibility)."""
    options = options or CorpusOptions()
    options.check()
    started = time.perf_counter()
    out = check_out_dir(out_dir)
    sources = find_sources(options, stdlib_dir=stdlib_dir, site_paths=site_paths)
    split = split_packages(
        {source.name: source.size() for source in sources},
        seed=options.seed,
        heldout_fraction=options.heldout_fraction,
        max_heldout_bytes=options.max_heldout_bytes,
    )
    packages = read_packages(sources, split, options)
    logger.info("read %d packages in %.1fs", len(packages), time.perf_counter() - started)
    code = {name: _code_records(packages, name) for name in (TRAIN, HELDOUT)}
    synthetic = {name: _synthetic(code[name], options, name) for name in (TRAIN, HELDOUT)}
    train = _shuffled(code[TRAIN] + synthetic[TRAIN], seed=options.seed)
    outputs = {"train.jsonl": train, "heldout.jsonl": code[HELDOUT], "heldout-synthetic.jsonl": synthetic[HELDOUT]}
    files = {name: _write_records(out / name, records) for name, records in outputs.items()}
    tokenizer = _tokenizer(out, train, code[HELDOUT], options)
    manifest = _manifest(options, packages, code, synthetic, files, tokenizer)
    if options.count_tokens:
        manifest["tokens"] = _token_counts(out / TOKENIZER_DIR / "tokenizer.model", code, synthetic, options)
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return {**manifest, "seconds": round(time.perf_counter() - started, 1)}


def _code_records(packages: Sequence[Package], split: str) -> list[dict[str, Any]]:
    return [
        {"text": text, "source": "code", "package": package.name, "part": index}
        for package in packages
        if package.split == split
        for index, text in enumerate(package.documents)
    ]


def _synthetic(code: Sequence[dict[str, Any]], options: CorpusOptions, split: str) -> list[dict[str, Any]]:
    """Retrieval documents whose filler comes from the code of the same split (held-out filler stays unseen)."""
    count = options.synthetic if split == TRAIN else options.heldout_synthetic
    if count == 0:
        return []
    if not code:
        raise InputError(f"the {split} split holds no code to draw synthetic filler from; include more packages")
    pool_stream = _POOL_TRAIN if split == TRAIN else _POOL_HELDOUT
    pool = FillerPool(
        _sample_texts(
            [record["text"] for record in code],
            options.filler_pool_chars,
            np.random.default_rng([options.seed, pool_stream]),
        )
    )
    stream = _SYNTH_TRAIN if split == TRAIN else _SYNTH_HELDOUT
    return synthetic_documents(pool, count=count, seed=options.seed, stream=stream, chars=options.synthetic_chars)


def _sample_texts(texts: Sequence[str], chars: int, rng: np.random.Generator) -> list[str]:
    """Whole texts in a seeded random order until about `chars` characters are taken."""
    taken, total = [], 0
    for index in rng.permutation(len(texts)):
        if total >= chars:
            break
        taken.append(texts[int(index)])
        total += len(texts[int(index)])
    return taken


def _shuffled(records: list[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
    """A seeded order: the training reader goes through a file front to back, so packages must be interleaved."""
    order = np.random.default_rng([seed, _SHUFFLE]).permutation(len(records))
    return [records[int(index)] for index in order]


def _write_records(path: Path, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    data = jsonl_bytes(records)
    atomic_write(path, data)
    return {"documents": len(records), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tokenizer(
    out: Path, train: Sequence[dict[str, Any]], heldout: Sequence[dict[str, Any]], options: CorpusOptions
) -> dict[str, Any]:
    sentences = tokenizer_sentences(
        [record["text"] for record in train], sample_chars=options.tokenizer_sample_chars, seed=options.seed
    )
    started = time.perf_counter()
    model = train_tokenizer(
        sentences, out / TOKENIZER_DIR, vocab_size=options.vocab_size, num_threads=options.num_threads
    )
    logger.info("trained the tokenizer on %d sentences in %.1fs", len(sentences), time.perf_counter() - started)
    samples = [record["text"][:3000] for record in [*train[:20], *heldout[:20]]] + [EVAL_INTRO, "\tx = 1\n    y\n"]
    mismatches = check_tokenizer(out / TOKENIZER_DIR, samples)
    if mismatches:
        logger.error("load_tokenizer disagrees with SentencePiece on %d of %d samples", len(mismatches), len(samples))
    data = model.read_bytes()
    return {
        "path": f"{TOKENIZER_DIR}/tokenizer.model",
        "vocab_size": spm.SentencePieceProcessor(model_proto=data).get_piece_size(),
        "requested_vocab_size": options.vocab_size,
        "sample_sentences": len(sentences),
        "sample_chars": sum(map(len, sentences)),
        "load_tokenizer_matches": not mismatches,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _split_summary(
    packages: Sequence[Package], code: Sequence[dict[str, Any]], synthetic: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    tasks: dict[str, int] = {}
    for record in synthetic:
        tasks[record["task"]] = tasks.get(record["task"], 0) + 1
    return {
        "packages": len(packages),
        "code_documents": len(code),
        "code_chars": sum(len(r["text"]) for r in code),
        "files": sum(package.files for package in packages),
        "synthetic_documents": len(synthetic),
        "synthetic_chars": sum(len(r["text"]) for r in synthetic),
        "synthetic_tasks": tasks,
    }


def _manifest(
    options: CorpusOptions,
    packages: Sequence[Package],
    code: dict[str, list[dict[str, Any]]],
    synthetic: dict[str, list[dict[str, Any]]],
    files: dict[str, Any],
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "note": (
            "Built from the Python source installed where it ran: other machines (other packages or versions) "
            "give other documents. Compare the package lists before comparing runs."
        ),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "sentencepiece": spm.__version__,
        "numpy": np.__version__,
        "options": dataclasses.asdict(options),
        "split_rule": (
            "heldout iff sha256(f'{seed}:{name}')[:8] / 2**64 < heldout_fraction and the package's .py "
            "files total at most max_heldout_bytes; neither split left empty"
        ),
        "packages": [
            {
                "name": p.name,
                "version": p.version,
                "origin": p.origin,
                "split": p.split,
                "files": p.files,
                "documents": len(p.documents),
                "chars": p.chars,
                "skipped": dict(sorted(p.skipped.items())),
            }
            for p in packages
        ],
        "splits": {
            name: _split_summary([p for p in packages if p.split == name], code[name], synthetic[name])
            for name in (TRAIN, HELDOUT)
        },
        "files": files,
        "tokenizer": tokenizer,
    }


def _token_counts(
    model: Path,
    code: dict[str, list[dict[str, Any]]],
    synthetic: dict[str, list[dict[str, Any]]],
    options: CorpusOptions,
) -> dict[str, int]:
    started = time.perf_counter()
    counts = {
        f"{split}_{kind}": count_tokens(model, [r["text"] for r in records[split]], num_threads=options.num_threads)
        for kind, records in (("code", code), ("synthetic", synthetic))
        for split in (TRAIN, HELDOUT)
    }
    logger.info("counted tokens in %.1fs", time.perf_counter() - started)
    return counts


def iter_summary_lines(result: dict[str, Any]) -> Iterator[str]:
    """Human-readable lines about a `prepare_corpus` result (for the script to print)."""
    tokens = result.get("tokens", {})
    for split in (TRAIN, HELDOUT):
        info = result["splits"][split]
        yield (
            f"{split:8s} {info['packages']:5d} packages {info['files']:7d} files "
            f"{info['code_documents']:6d} code docs "
            f"{info['code_chars']:12,d} chars {tokens.get(f'{split}_code', 0):12,d} tokens | "
            f"synthetic {info['synthetic_documents']:5d} docs {info['synthetic_chars']:11,d} chars "
            f"{tokens.get(f'{split}_synthetic', 0):11,d} tokens"
        )
    tok = result["tokenizer"]
    yield (
        f"tokenizer {tok['path']}: {tok['vocab_size']} pieces, trained on {tok['sample_chars']:,d} chars; "
        f"load_tokenizer matches SentencePiece: {tok['load_tokenizer_matches']}"
    )
    if "seconds" in result:
        yield f"done in {result['seconds']}s"
