"""Corpus tests: packages found and grouped, split by package, documents capped at file boundaries, synthetic retrieval
documents (key placement, never the passkey evaluation's filler), the tokenizer agreeing with `load_tokenizer`,
byte-identical reruns, and one-line errors. Most run on a fake standard library and site folder built here."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from longllama.errors import InputError
from longllama.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/corpus.py: a tool, not the library

from corpus import (  # noqa: E402
    EVAL_FILLER,
    EVAL_FILLER_SENTENCES,
    EVAL_QUESTION,
    CorpusOptions,
    FillerPool,
    check_tokenizer,
    contains_eval_filler,
    find_sources,
    kv_document,
    package_documents,
    passkey_document,
    prepare_corpus,
    split_packages,
    synthetic_documents,
    tokenizer_sentences,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "value",
    "parser",
    "buffer",
    "stream",
    "token",
    "window",
    "memory",
    "layer",
    "cache",
    "config",
    "reader",
    "writer",
    "index",
    "offset",
    "length",
    "record",
    "field",
    "schema",
    "render",
    "option",
    "return",
    "result",
)


def _module(rng: random.Random, functions: int = 12) -> str:
    """Plausible Python source: functions with docstrings, comments, indentation and a tab-indented block."""
    parts = []
    for _ in range(functions):
        name = "_".join(rng.sample(WORDS, 2))
        doc = " ".join(rng.choice(WORDS) for _ in range(12)).capitalize()
        parts.append(
            f"def {name}(x, y={rng.randint(0, 999)}):\n"
            f'    """{doc}."""\n'
            f"    # {' '.join(rng.choice(WORDS) for _ in range(8))} and then some more words here\n"
            f"    if x > {rng.randint(0, 99)}:\n"
            f"        return x * y + {rng.randint(0, 9999)}\n"
            f"    return [item for item in range(x)]\n\n"
            f"class {name.title().replace('_', '')}:\n\tdef run(self):\n\t\treturn {rng.randint(0, 99)}\n\n"
        )
    return "\n".join(parts)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _distribution(site: Path, name: str, version: str, files: dict[str, str | bytes]) -> None:
    info = site / f"{name}-{version}.dist-info"
    _write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for relative, text in files.items():
        _write(site / relative, text)
    record = [f"{relative},," for relative in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    _write(info / "RECORD", "\n".join(record) + "\n")


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(stdlib folder, site folder) holding a few packages, test suites, a duplicate and a non-UTF-8 file."""
    root = tmp_path_factory.mktemp("fake_python")
    rng = random.Random(0)
    stdlib, site = root / "stdlib", root / "site"
    for relative in ("alpha.py", "beta.py", "email/__init__.py", "email/parser.py", "json/decoder.py"):
        _write(stdlib / relative, _module(rng))
    for relative in (
        "test/test_alpha.py",
        "json/tests/test_json.py",
        "site-packages/stray.py",
        "__pycache__/alpha.py",
        "email/test_thing.py",
    ):
        _write(stdlib / relative, "THIS_MUST_NOT_APPEAR = 1\n")
    shared = _module(rng)
    _distribution(
        site,
        "Foo_Bar",
        "1.2.3",
        {
            "foo_bar/__init__.py": _module(rng),
            "foo_bar/core.py": shared,
            "foo_bar/tests/test_core.py": "THIS_MUST_NOT_APPEAR = 2\n",
            "foo_bar/data.txt": "not python\n",
        },
    )
    # vendored copy of foo_bar/core.py; a non-UTF-8 file; an empty __init__
    _distribution(
        site,
        "vendoring",
        "0.1",
        {
            "vendoring/_vendor/core.py": shared,
            "vendoring/main.py": _module(rng),
            "vendoring/latin1.py": b"# caf\xe9\nx = 1\n",
            "vendoring/__init__.py": "",
        },
    )
    for index in range(12):
        _distribution(site, f"pkg{index}", f"{index}.0", {f"pkg{index}/__init__.py": _module(rng, functions=4)})
    return stdlib, site


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _small(**overrides) -> CorpusOptions:
    settings = {
        "synthetic": 6,
        "heldout_synthetic": 2,
        "synthetic_chars": (3_000, 12_000),
        "vocab_size": 400,
        "heldout_fraction": 0.2,
        "max_doc_chars": 6_000,
        "tokenizer_sample_chars": 400_000,
        "num_threads": 1,
    }
    return CorpusOptions(**{**settings, **overrides})


# --------------------------------------------------------------------------------------------------------------------
# Packages and split
# --------------------------------------------------------------------------------------------------------------------


def test_packages_are_grouped_and_test_suites_left_out(fake_python: tuple[Path, Path]) -> None:
    stdlib, site = fake_python
    sources = {
        source.name: source for source in find_sources(CorpusOptions(), stdlib_dir=stdlib, site_paths=[str(site)])
    }
    expected_pkgs = {f"pkg{index}" for index in range(12)}
    assert set(sources) == {"stdlib", "stdlib.email", "stdlib.json", "foo-bar", "vendoring"} | expected_pkgs
    assert [path for path, _ in sources["stdlib"].files] == ["alpha.py", "beta.py"]
    assert [path for path, _ in sources["stdlib.email"].files] == ["email/__init__.py", "email/parser.py"]
    assert [path for path, _ in sources["foo-bar"].files] == ["foo_bar/__init__.py", "foo_bar/core.py"]
    assert sources["foo-bar"].version == "1.2.3" and sources["stdlib"].version == sys.version.split()[0]
    limited = find_sources(CorpusOptions(limit_packages=3), stdlib_dir=stdlib, site_paths=[str(site)])
    assert len(limited) == 3 and all(source.name.startswith("pkg") for source in limited)  # the smallest ones


def test_split_is_by_package_name_seeded_and_never_empty() -> None:
    names = {f"package-{index}": 1000 for index in range(2000)}
    split = split_packages(names, seed=0, heldout_fraction=0.1)
    held = {name for name, where in split.items() if where == "heldout"}
    assert 150 < len(held) < 250
    assert split == split_packages(dict(reversed(names.items())), seed=0, heldout_fraction=0.1)
    # a package's split depends on its name only, not on which other packages are installed
    few = split_packages(dict.fromkeys(list(names)[:300], 1000), seed=0, heldout_fraction=0.1)
    assert all(few[name] == split[name] for name in few)
    assert split != split_packages(names, seed=1, heldout_fraction=0.1)
    capped = split_packages(
        {**names, **dict.fromkeys(held, 10**9)}, seed=0, heldout_fraction=0.1, max_heldout_bytes=10**6
    )
    assert all(capped[name] == "train" for name in held)
    assert set(split_packages({"a": 1, "b": 1}, seed=0, heldout_fraction=0.001).values()) == {"train", "heldout"}
    assert set(split_packages({"a": 1, "b": 1}, seed=0, heldout_fraction=0.999).values()) == {"train", "heldout"}
    assert set(split_packages({"a": 1, "b": 1}, seed=0, heldout_fraction=0.0).values()) == {"train"}


def test_documents_are_capped_at_file_boundaries() -> None:
    rng = random.Random(1)
    files = [(f"pkg/m{index}.py", _module(rng, functions=rng.randint(1, 6))) for index in range(20)]
    files.append(("pkg/huge.py", _module(rng, functions=60)))
    documents = package_documents(files, max_doc_chars=5_000)
    assert len(documents) > 5 and all(len(document) <= 5_000 for document in documents)
    assert all(document.startswith("# file: pkg/") for document in documents)
    headers = [line for document in documents for line in document.split("\n") if line.startswith("# file: ")]
    assert [h for h in headers if "(continued)" not in h] == [f"# file: {path}" for path, _ in files]
    # every line of every file is there, in order, none cut (the huge file is split between lines)
    body = [line for document in documents for line in document.split("\n") if not line.startswith("# file: ")]
    assert [line for line in body if line] == [line for _, text in files for line in text.split("\n") if line]


# --------------------------------------------------------------------------------------------------------------------
# Synthetic retrieval documents
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> FillerPool:
    rng = random.Random(2)
    # The evaluation's filler inside the source text: the pool must not hand it out, in any style.
    poisoned = "\n".join(
        [
            _module(rng),
            f"# {EVAL_FILLER}",
            "# Here we go, said the parser, and off it went",
            f'HINT = "{EVAL_FILLER_SENTENCES[1].capitalize()} and the buffer is full of tokens"',
        ]
    )
    return FillerPool([_module(rng) for _ in range(20)] + [poisoned] * 5)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("style", FillerPool.STYLES)
def test_passkey_document_places_the_key_at_the_depth(pool: FillerPool, depth: float, style: str) -> None:
    rng = np.random.default_rng(3)
    record = passkey_document(pool, rng, chars=30_000, depth=depth, style=style, key="48213")
    text = record["text"]
    assert record["answer"] == "48213" and 29_000 < len(text) < 31_000
    assert text.endswith(f"{EVAL_QUESTION} 48213.")
    statement = next(line for line in text.split("\n") if "48213" in line and "?" not in line)
    assert abs(text.index(statement) / len(text) - depth) < 0.03
    assert text.count("48213") >= 3  # stated (twice) and answered
    assert not contains_eval_filler(text)


def test_kv_document_states_every_asked_pair_before_the_questions(pool: FillerPool) -> None:
    record = kv_document(pool, np.random.default_rng(4), chars=40_000, style="code")
    lines = record["text"].split("\n")
    questions = [line for line in lines if line.startswith("What is the value of ")]
    assert questions and lines[-len(questions) :] == questions
    first_question = len(lines) - len(questions)
    for question in questions:
        key, value = question[len("What is the value of ") :].split("? The value of ")[1].rsplit(" is ", 1)
        assert f"{key}: {value[:-1]}" in lines[1:first_question]
    stated = [line for line in lines[1:first_question] if re.fullmatch(r"[a-z]+_[a-z]+_\d{3}: [0-9a-f]+", line)]
    assert len(stated) == record["pairs"] == len({line.split(":")[0] for line in stated})


def test_synthetic_documents_never_hold_the_evaluation_filler(pool: FillerPool) -> None:
    documents = synthetic_documents(pool, count=40, seed=0, chars=(2_000, 20_000))
    assert {document["task"] for document in documents} == {"passkey", "kv"}
    assert {document["filler"] for document in documents} == set(FillerPool.STYLES)
    for document in documents:
        lowered = document["text"].lower()
        assert EVAL_FILLER.lower() not in lowered
        assert not any(sentence in lowered for sentence in EVAL_FILLER_SENTENCES)
        assert document["answer"].split()[-1] in document["text"].rsplit("\n", 1)[-1]
    assert documents[:10] == synthetic_documents(pool, count=10, seed=0, chars=(2_000, 20_000))
    assert documents[:10] != synthetic_documents(pool, count=10, seed=1, chars=(2_000, 20_000))


def test_contains_eval_filler_is_case_insensitive() -> None:
    assert contains_eval_filler("x THE SKY IS BLUE y") and not contains_eval_filler("the sky is green")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_is_llama_style_and_matches_load_tokenizer(tmp_path: Path) -> None:
    rng = random.Random(5)
    texts = [_module(rng) for _ in range(40)]
    sentences = tokenizer_sentences(texts, sample_chars=200_000, seed=0)
    model = train_tokenizer(sentences, tmp_path, vocab_size=500, num_threads=1)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    assert processor.get_piece_size() == 500
    assert any(
        set(processor.id_to_piece(i)) == {"\u2581"} and len(processor.id_to_piece(i)) >= 4
        for i in range(processor.get_piece_size())
    )  # indentation runs are pieces
    code = [
        "def f(x):\n    if x:\n        return 1\n\treturn 2\n",
        "\tclass A:\n\t\tpass\n",
        "    leading indentation\n  \n\n\n  x  =  1  ",
        "x = 12345  # 🦙 café\r\n",
        " ",
        "\n\n\tz",
    ]
    tokenizer = load_tokenizer(tmp_path)
    for text in code:
        assert tokenizer.encode(text) == [1] + processor.encode(text)
        assert processor.decode(processor.encode(text)) == text  # spaces, tabs, newlines kept exactly
    assert check_tokenizer(tmp_path, code + texts[:3]) == []
    assert processor.encode("12345", out_type=str)[-5:] == list("12345")  # digits split
    assert "<0xF0>" in processor.encode("🦙", out_type=str)  # byte fallback


# --------------------------------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------------------------------


def test_prepare_corpus_splits_by_package_and_records_versions(fake_python: tuple[Path, Path], tmp_path: Path) -> None:
    stdlib, site = fake_python
    (tmp_path / "keep.txt").write_text("unrelated")  # an existing folder with other files is fine
    result = prepare_corpus(tmp_path, _small(max_heldout_doc_chars=2_000), stdlib_dir=stdlib, site_paths=[str(site)])
    train, heldout = _read_jsonl(tmp_path / "train.jsonl"), _read_jsonl(tmp_path / "heldout.jsonl")
    # Each split has its own document cap (6000 for training here, 2000 for held-out).
    code_lengths = [len(r["text"]) for r in train if r["source"] == "code"]
    assert max(code_lengths) <= 6_000 and max(code_lengths) > 2_000
    assert max(len(r["text"]) for r in heldout) <= 2_000
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (tmp_path / "keep.txt").read_text() == "unrelated"
    train_packages = {r["package"] for r in train if r["source"] == "code"}
    heldout_packages = {r["package"] for r in heldout}
    assert train_packages and heldout_packages and not train_packages & heldout_packages
    assert {r["source"] for r in heldout} == {"code"} and len(heldout) >= 1
    assert sum(r["source"] == "synthetic" for r in train) == 6
    assert len(_read_jsonl(tmp_path / "heldout-synthetic.jsonl")) == 2
    listed = {p["name"]: p for p in manifest["packages"]}
    assert listed["foo-bar"]["version"] == "1.2.3" and listed["vendoring"]["version"] == "0.1"
    assert {name for name, p in listed.items() if p["split"] == "heldout"} == heldout_packages
    assert listed["vendoring"]["skipped"] == {"duplicate": 1, "empty": 1, "not_utf8": 1}
    everything = "".join(r["text"] for r in train + heldout)
    assert "THIS_MUST_NOT_APPEAR" not in everything and "not python" not in everything
    assert manifest["tokenizer"]["load_tokenizer_matches"] and result["tokens"]["train_code"] > 0
    assert manifest["splits"]["train"]["code_documents"] == sum(r["source"] == "code" for r in train)
    assert load_tokenizer(tmp_path / "tokenizer").bos_token_id == 1


def test_same_packages_and_seed_give_identical_files(tmp_path: Path) -> None:
    """Two runs on a few of the really installed packages write byte-identical files; another seed does not."""
    options = _small(limit_packages=8, heldout_fraction=0.1, count_tokens=False)
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare_corpus(first, options)
    prepare_corpus(second, options)
    prepare_corpus(other, _small(limit_packages=8, heldout_fraction=0.1, count_tokens=False, seed=1))
    names = sorted(str(path.relative_to(first)) for path in first.rglob("*") if path.is_file())
    assert names == [
        "heldout-synthetic.jsonl",
        "heldout.jsonl",
        "manifest.json",
        "tokenizer/tokenizer.model",
        "train.jsonl",
    ]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()
    assert not list(first.rglob("*.tmp"))


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def test_unwritable_output_is_a_one_line_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as caught:
        prepare_corpus(blocker / "out", _small())
    assert "\n" not in str(caught.value) and "--out" in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"heldout_fraction": 1.0},
        {"heldout_fraction": -0.1},
        {"vocab_size": 100},
        {"synthetic_chars": (5_000, 2_000)},
        {"limit_packages": 0},
        {"synthetic": -1},
        {"max_heldout_doc_chars": 10},
    ],
)
def test_bad_options_are_input_errors(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(InputError):
        prepare_corpus(tmp_path, _small(**bad))
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_script_prints_one_line_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_corpus.py"), "--out", str(blocker / "x")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot write to output folder") and done.stderr.count("\n") == 1
