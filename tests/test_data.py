"""Data tests: the doc-aware pipelines of docs/training.md#batching-pipelines (invariant F19), resuming from a state
dict, the file readers, and
the instruction / chat examples of docs/finetuning.md#examples (invariant F20), with a tiny SentencePiece model trained
here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import train_llama_spm

from longllama.documents import ListDocuments, iter_documents
from longllama.errors import InputError
from longllama.tokenizer import load_tokenizer
from longllama.training.data.pretrain import (
    DocAwarePipeline,
    KPackingPipeline,
    LinearPipeline,
    Prefetcher,
    TokenizedDocs,
    build_pipeline,
    dataset_packing,
)
from longllama.training.data.sft import (
    IGNORE_INDEX,
    MIXTURES,
    TEMPLATES,
    ChatExample,
    ChatTemplate,
    InstructionExample,
    InstructionTemplate,
    MixedDataset,
    SFTDataset,
    SFTLengths,
    collate_sft,
    filter_rows,
    make_filter,
    parse_replace_rules,
    read_rows,
)

UNK, BOS, EOS = 0, 1, 2
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "memory",
    "layer",
    "attention",
    "context",
    "long",
    "llama",
    "token",
    "answer",
]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


def _sentence(rng: random.Random, low: int = 2, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    train_llama_spm(folder, [_sentence(rng) + " USER: ASSISTANT: 123 ?!." for _ in range(200)], vocab_size=320)
    return folder


@pytest.fixture(scope="module")
def tokenizer(spm_dir: Path):
    return load_tokenizer(spm_dir)


@pytest.fixture(scope="module")
def sp(spm_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


def _int_docs(count: int, seed: int, *, low: int = 0, high: int = 9) -> list[list[int]]:
    """Token "documents" of ids >= 10 (so they never collide with BOS/EOS); lengths from low to high."""
    rng = random.Random(seed)
    return [[rng.randint(10, 99) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _int_source(docs: list[list[int]], **options) -> TokenizedDocs:
    return TokenizedDocs(ListDocuments(docs, **options), bos_id=BOS, eos_id=EOS)


def _take(pipeline, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(pipeline) for _ in range(count)]


def _spec_doc_aware(docs: list[list[int]], batch: int, length: int, steps: int) -> list[tuple[list, list, list]]:
    """docs/training.md#batching-pipelines `doc_aware` spelled out literally, as an independent check of the
    pipeline."""
    source = iter([[BOS] + d + [EOS], [0] + [1] * (len(d) + 1)] for d in docs)
    rows = [([], []) for _ in range(batch)]
    out = []
    for _ in range(steps):
        for tokens, mask in rows:
            while len(tokens) < length + 1:
                new_tokens, new_mask = next(source)
                tokens.extend(new_tokens)
                mask.extend(new_mask)
        step = []
        for index, (tokens, mask) in enumerate(rows):
            step.append((tokens[:length], tokens[1 : length + 1], mask[1 : length + 1]))
            rows[index] = (tokens[length:], mask[length:])
        out.append(step)
    return out


# --------------------------------------------------------------------------------------------------------------------
# F19: doc-aware pipelines
# --------------------------------------------------------------------------------------------------------------------


def test_doc_aware_hand_computed_example() -> None:
    # B = 2, L = 3. Row 0 takes doc 0 (4 tokens: enough); row 1 takes docs 1 and 2; next batch row 0 takes doc 3.
    docs = [[10, 11], [20], [30, 31, 32, 33, 34], [40], [50, 51, 52]]
    first, second = _take(DocAwarePipeline(_int_source(docs), 2, 3), 2)
    assert first["input_ids"].tolist() == [[BOS, 10, 11], [BOS, 20, EOS]]
    assert first["targets"].tolist() == [[10, 11, EOS], [20, EOS, BOS]]
    assert first["loss_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert second["input_ids"].tolist() == [[EOS, BOS, 40], [BOS, 30, 31]]
    assert second["targets"].tolist() == [[BOS, 40, EOS], [30, 31, 32]]
    assert second["loss_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert first["input_ids"].dtype == torch.int64 and first["targets"].dtype == torch.int64
    assert first["loss_mask"].dtype == torch.float32


@pytest.mark.parametrize("batch, length", [(1, 4), (3, 5), (4, 16)])
def test_doc_aware_invariants(batch: int, length: int) -> None:
    docs = _int_docs(400, seed=batch * 100 + length, high=3 * length)
    batches = _take(DocAwarePipeline(_int_source(docs), batch, length), 8)
    expected = _spec_doc_aware(docs, batch, length, 8)
    for step, (out, want) in enumerate(zip(batches, expected, strict=True)):
        inputs, targets, mask = out["input_ids"], out["targets"], out["loss_mask"]
        assert inputs.shape == targets.shape == mask.shape == (batch, length)
        assert [r.tolist() for r in inputs] == [w[0] for w in want], step
        assert [r.tolist() for r in targets] == [w[1] for w in want], step
        assert [r.tolist() for r in mask] == [w[2] for w in want], step
        assert torch.equal(targets[:, :-1], inputs[:, 1:])  # target[b, t] = input[b, t+1]
        assert torch.equal(mask == 0, targets == BOS)  # no loss exactly on predicting BOS
        assert torch.equal(inputs == EOS, targets == BOS)  # documents are joined as "... EOS BOS ..."
        if step:
            assert torch.equal(inputs[:, 0], batches[step - 1]["targets"][:, -1])


def test_rows_continue_their_documents() -> None:
    # A single very long document stays in row 0 for many batches while the short ones go to row 1.
    docs = [list(range(10, 60))] + [[70 + i] for i in range(40)]
    pipeline = DocAwarePipeline(_int_source(docs), 2, 5)
    batches = _take(pipeline, 3)
    state = json.loads(json.dumps(pipeline.state_dict()))  # saved in the middle of the long document
    batches += _take(pipeline, 3)
    restored = DocAwarePipeline(_int_source(docs), 2, 5)
    restored.load_state_dict(state)
    assert _same(_take(restored, 3), batches[3:])
    row0 = torch.cat([b["input_ids"][0] for b in batches]).tolist()
    assert row0[:1] == [BOS] and row0[1:30] == list(range(10, 39))
    row1 = torch.cat([b["input_ids"][1] for b in batches]).tolist()
    assert row1[:6] == [BOS, 70, EOS, BOS, 71, EOS]


@pytest.mark.parametrize("batch, length, k", [(4, 3, 2), (8, 4, 4), (3, 5, 1), (6, 2, 3)])
def test_k_packing_equals_inner_doc_aware(batch: int, length: int, k: int) -> None:
    docs = _int_docs(300, seed=k, high=4 * length)
    packed = _take(KPackingPipeline(_int_source(docs), batch, length, k), 5)
    inner = _take(DocAwarePipeline(_int_source(docs), batch // k, k * length), 5)
    for out, ref in zip(packed, inner, strict=True):
        for name in ("input_ids", "targets", "loss_mask"):
            assert out[name].shape == (batch, length)
            for j in range(batch // k):
                assert torch.equal(torch.cat(list(out[name][j * k : (j + 1) * k])), ref[name][j]), name


def test_k_packing_rejects_indivisible_batch() -> None:
    with pytest.raises(InputError) as info:
        KPackingPipeline(_int_source([[10]]), 6, 4, 4)
    assert "divisible" in _one_line(info.value)


def test_linear_pipeline_is_one_stream() -> None:
    docs = _int_docs(200, seed=3)
    stream = [t for d in docs for t in [BOS] + d + [EOS]]
    batches = _take(LinearPipeline(_int_source(docs), 3, 4), 4)
    for step, out in enumerate(batches):
        start = step * 12
        assert out["input_ids"].flatten().tolist() == stream[start : start + 12]
        assert out["targets"].flatten().tolist() == stream[start + 1 : start + 13]
        assert torch.equal(out["loss_mask"] == 0, out["targets"] == BOS)


def test_pipeline_names() -> None:
    source = _int_source(_int_docs(50, seed=1))
    assert isinstance(build_pipeline("linear", source, batch_size=2, seq_len=4), LinearPipeline)
    assert isinstance(build_pipeline("doc_aware", source, batch_size=2, seq_len=4), DocAwarePipeline)
    packed = build_pipeline("doc_aware_k2", source, batch_size=4, seq_len=4)
    assert isinstance(packed, KPackingPipeline) and packed.k == 2
    assert [dataset_packing(n) for n in ("linear", "doc_aware", "doc_aware_k1", "doc_aware_k4")] == [1, 1, 1, 4]
    with pytest.raises(InputError):
        dataset_packing("doc_aware_kx")


def test_finite_source_stops_and_bad_sizes() -> None:
    pipeline = DocAwarePipeline(_int_source([[10, 11, 12]] * 3), 2, 4)
    assert len(list(pipeline)) == 1  # 15 tokens: one batch of 2 rows of 5, the rest cannot fill a row
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError):
            DocAwarePipeline(_int_source([[10]]), bad, 4)


# --------------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, texts: list[str], **extra) -> Path:
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    rng = random.Random(7)
    # About 600 tokens with the tiny vocabulary: an epoch is ~10 batches of 4 x 16.
    first = _write_jsonl(tmp_path / "a.jsonl", [_sentence(rng, 0, 6) for _ in range(8)])
    second = _write_jsonl(tmp_path / "b.jsonl", [_sentence(rng, 0, 6) for _ in range(5)])
    book = tmp_path / "c.txt"
    book.write_text("\n\n".join(_sentence(rng, 3, 6) for _ in range(2)), encoding="utf-8")
    return [first, second, book]


def _file_pipeline(kind: str, paths: list[Path], tokenizer, read_ahead: int = 0, **reader):
    source = TokenizedDocs(
        iter_documents(paths, loop=True, **reader), tokenizer=tokenizer, min_length=4, read_ahead=read_ahead
    )
    return build_pipeline(kind, source, batch_size=4, seq_len=16)


def _epoch(state: dict) -> int:
    """The document reader's epoch inside a (nested) pipeline state dict."""
    while "epoch" not in state:
        state = state.get("inner") or state.get("source") or state["documents"]
    return state["epoch"]


def _same(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        all(torch.equal(a[name], b[name]) for name in ("input_ids", "targets", "loss_mask"))
        for a, b in zip(first, second, strict=True)
    )


@pytest.mark.parametrize("kind", ["linear", "doc_aware", "doc_aware_k2", "doc_aware_k4"])
@pytest.mark.parametrize("shuffle_seed", [None, 5])
def test_resume_from_files(kind: str, shuffle_seed, corpus: list[Path], tokenizer) -> None:
    original = _file_pipeline(kind, corpus, tokenizer, shuffle_seed=shuffle_seed)
    _take(original, 13)
    state = json.loads(json.dumps(original.state_dict()))  # it must survive a JSON checkpoint
    expected = _take(original, 30)
    # The saved position is past the first epoch and the batches after it cross epochs (the files wrap around).
    assert _epoch(state) >= 1 and _epoch(original.state_dict()) >= _epoch(state) + 2
    restored = _file_pipeline(kind, corpus, tokenizer, shuffle_seed=shuffle_seed)
    restored.load_state_dict(state)
    assert _same(_take(restored, 30), expected)
    fresh = _file_pipeline(kind, corpus, tokenizer, shuffle_seed=shuffle_seed)
    assert not _same(_take(fresh, 30), expected)  # the state really moved the pipeline


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_prefetcher_gives_the_same_batches_and_states_as_its_pipeline(process: bool) -> None:
    docs = _int_docs(200, 3, high=40)
    plain = build_pipeline("doc_aware_k2", _int_source(docs, loop=True), batch_size=4, seq_len=8)
    prefetched = Prefetcher(
        build_pipeline("doc_aware_k2", _int_source(docs, loop=True), batch_size=4, seq_len=8),
        state_at=lambda index: index % 3 == 0,
        depth=3,
        process=process,
    )
    assert prefetched.state_dict() == plain.state_dict()  # not started: the pipeline's own state
    for index in range(1, 10):
        assert _same([next(prefetched)], [next(plain)])
        if index % 3 == 0:
            assert prefetched.state_dict() == plain.state_dict()  # after batch `index`, not after those made ahead
        else:
            with pytest.raises(RuntimeError, match=f"after batch {index}"):
                prefetched.state_dict()
    with pytest.raises(RuntimeError, match="before the first next"):
        prefetched.load_state_dict(plain.state_dict())
    # A resumed prefetcher continues the numbering and the batches.
    resumed = Prefetcher(
        build_pipeline("doc_aware_k2", _int_source(docs, loop=True), batch_size=4, seq_len=8),
        state_at=lambda index: index % 3 == 0,
        process=process,
    )
    resumed.load_state_dict(prefetched.state_dict())
    resumed.set_position(9)
    expected = _take(plain, 3)
    assert _same(_take(resumed, 3), expected) and resumed.state_dict() == plain.state_dict()
    prefetched.close()
    resumed.close()


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_prefetcher_raises_the_pipelines_error_in_the_caller(process: bool) -> None:
    finite = Prefetcher(
        build_pipeline("doc_aware", _int_source(_int_docs(3, 0, low=1, high=3)), batch_size=2, seq_len=4),
        process=process,
    )
    with pytest.raises(StopIteration):
        for _ in range(100):
            next(finite)


@pytest.mark.parametrize("read_ahead", [1, 3, 7])
def test_read_ahead_gives_the_same_batches_and_resumes_anywhere(read_ahead: int, corpus: list[Path], tokenizer) -> None:
    # Batched encoding of chunks of documents changes nothing the pipeline yields, and a state saved inside a
    # chunk restores into either setting (and another chunk size).
    expected = _take(_file_pipeline("doc_aware_k2", corpus, tokenizer, shuffle_seed=3), 40)
    ahead = _file_pipeline("doc_aware_k2", corpus, tokenizer, read_ahead=read_ahead, shuffle_seed=3)
    assert _same(_take(ahead, 40), expected)
    for cut in (1, 5, 13):
        original = _file_pipeline("doc_aware_k2", corpus, tokenizer, read_ahead=read_ahead, shuffle_seed=3)
        _take(original, cut)
        state = json.loads(json.dumps(original.state_dict()))
        for setting in (0, read_ahead, 2):
            restored = _file_pipeline("doc_aware_k2", corpus, tokenizer, read_ahead=setting, shuffle_seed=3)
            restored.load_state_dict(state)
            assert _same(_take(restored, 40 - cut), expected[cut:]), (cut, setting)


def test_read_ahead_ends_with_a_finite_source() -> None:
    docs = _int_docs(7, 2, low=1, high=5)  # 7 documents: chunks of 3, 3 and 1
    one = list(TokenizedDocs(ListDocuments(docs), bos_id=BOS, eos_id=EOS))
    ahead = list(TokenizedDocs(ListDocuments(docs), bos_id=BOS, eos_id=EOS, read_ahead=3))
    assert len(one) == 7 and ahead == one


def test_resume_from_list_with_shuffle() -> None:
    docs = _int_docs(23, seed=11, high=20)

    def make():
        return DocAwarePipeline(_int_source(docs, loop=True, shuffle_seed=9), 3, 8)

    original = make()
    _take(original, 5)
    state = json.loads(json.dumps(original.state_dict()))
    expected = _take(original, 40)
    assert state["source"]["documents"]["epoch"] < original.source.documents.epoch  # crossed epochs
    restored = make()
    restored.load_state_dict(state)
    assert _same(_take(restored, 40), expected)
    assert restored.batches == original.batches == 45


def test_shuffle_is_seeded_and_changes_per_epoch() -> None:
    def order(seed):
        return [
            next(reader) for reader in [ListDocuments(list(range(10)), loop=True, shuffle_seed=seed)] for _ in range(30)
        ]

    assert order(1) == order(1) and order(1) != order(2)
    epochs = [order(1)[i * 10 : (i + 1) * 10] for i in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs) and epochs[0] != epochs[1]


def test_restore_refuses_other_settings(corpus: list[Path], tokenizer) -> None:
    state = _file_pipeline("doc_aware", corpus, tokenizer).state_dict()
    other = TokenizedDocs(iter_documents(corpus, loop=True), tokenizer=tokenizer, min_length=4)
    with pytest.raises(InputError) as info:
        DocAwarePipeline(other, 8, 16).load_state_dict(state)
    assert "batch_size" in _one_line(info.value)
    renamed = TokenizedDocs(iter_documents(corpus[:2], loop=True), tokenizer=tokenizer, min_length=4)
    with pytest.raises(InputError) as info:
        DocAwarePipeline(renamed, 4, 16).load_state_dict(state)
    assert "files" in _one_line(info.value)
    with pytest.raises(InputError):
        build_pipeline("doc_aware_k2", other, batch_size=4, seq_len=16).load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------------
# Readers and tokenized documents
# --------------------------------------------------------------------------------------------------------------------


def test_jsonl_and_text_readers(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"title": "T1", "body": "one"}\n\n{"title": "T2", "body": "two"}\n', encoding="utf-8")
    book = tmp_path / "book.txt"
    book.write_text("para one\n\npara two\n", encoding="utf-8")
    assert list(iter_documents([data, book], field="title+body")) == ["T1 one", "T2 two", "para one\n\npara two\n"]
    assert list(iter_documents(data, field="body")) == ["one", "two"]
    reader = iter_documents(data, field="body", loop=True)
    assert [next(reader) for _ in range(5)] == ["one", "two", "one", "two", "one"] and reader.epoch == 2


def test_folder_expands_to_sorted_files(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "b.jsonl", ["second"])
    _write_jsonl(tmp_path / "a.jsonl", ["first"])
    (tmp_path / "notes.log").write_text("ignored")
    assert list(iter_documents(tmp_path)) == ["first", "second"]


@pytest.mark.parametrize(
    "content, field, words",
    [
        ('{"text": "ok"}\nnot json\n', "text", "line 2"),
        ('{"text": "ok"}\n{"other": "x"}\n', "text", "no field 'text'"),
        ('{"text": 5}\n', "text", "not text"),
        ('["a list"]\n', "text", "JSON object"),
        ('{"text": "ok"}\n', "text+", "field"),
    ],
)
def test_reader_errors(tmp_path: Path, content: str, field: str, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as info:
        list(iter_documents(path, field=field))
    message = _one_line(info.value)
    assert words in message
    if field == "text":
        assert "bad.jsonl" in message


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        iter_documents(tmp_path / "nope.jsonl")
    assert "does not exist" in _one_line(info.value)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError) as info:
        iter_documents(tmp_path / "x.csv")
    assert "unsupported" in _one_line(info.value)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(InputError) as info:
        list(iter_documents(tmp_path / "bad.txt"))
    assert "UTF-8" in _one_line(info.value)
    with pytest.raises(InputError):
        next(ListDocuments([], loop=True))


def test_parquet_reader(tmp_path: Path, tokenizer) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"doc {i} " + " ".join(WORDS[: i % 7 + 1]) for i in range(30)]
    table = pyarrow.table({"text": texts, "n": list(range(30))})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=7)
    assert list(iter_documents(path)) == texts
    reader = iter_documents(path)
    [next(reader) for _ in range(10)]
    state = json.loads(json.dumps(reader.state_dict()))
    again = iter_documents(path)
    again.load_state_dict(state)
    assert list(again) == texts[10:]
    with pytest.raises(InputError) as info:
        list(iter_documents(path, field="body"))
    assert "no column 'body'" in _one_line(info.value)
    assert read_rows(path)[3] == {"text": texts[3], "n": 3}
    pipeline = build_pipeline(
        "doc_aware", TokenizedDocs(iter_documents(path, loop=True), tokenizer=tokenizer), batch_size=2, seq_len=8
    )
    _take(pipeline, 3)
    saved = pipeline.state_dict()
    expected = _take(pipeline, 6)
    pipeline = build_pipeline(
        "doc_aware", TokenizedDocs(iter_documents(path, loop=True), tokenizer=tokenizer), batch_size=2, seq_len=8
    )
    pipeline.load_state_dict(saved)
    assert _same(_take(pipeline, 6), expected)


def test_parquet_without_pyarrow_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(InputError) as info:
        list(iter_documents(path))
    assert "pyarrow" in _one_line(info.value)


def test_tokenized_docs(tokenizer, sp: spm.SentencePieceProcessor) -> None:
    texts = ["the quick brown fox", "a", " lazy  dog ", ""]
    docs = list(TokenizedDocs(ListDocuments(texts), tokenizer=tokenizer))
    for text, (ids, mask) in zip(texts, docs, strict=True):
        assert ids == [BOS] + sp.encode(text) + [EOS]
        assert mask == [0] + [1] * (len(ids) - 1)
    kept = list(TokenizedDocs(ListDocuments(texts), tokenizer=tokenizer, min_length=4))
    assert [ids for ids, _ in kept] == [ids for ids, _ in docs if len(ids) >= 4] and len(kept) < len(docs)
    with pytest.raises(InputError):
        next(TokenizedDocs(ListDocuments(texts), bos_id=BOS, eos_id=EOS))
    with pytest.raises(InputError) as info:
        next(TokenizedDocs(ListDocuments(texts, loop=True), tokenizer=tokenizer, min_length=10_000))
    assert "min_length" in _one_line(info.value)


# --------------------------------------------------------------------------------------------------------------------
# F20: instruction and chat examples
# --------------------------------------------------------------------------------------------------------------------


def _orca_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "system_prompt": _sentence(rng, 0, 5) if i % 3 else "",
            "question": _sentence(rng, 1, 40 if i % 4 == 0 else 8),
            "response": _sentence(rng, 1, 40 if i % 5 == 0 else 8),
        }
        for i in range(count)
    ]


def _chat_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        turns = [
            {"from": "human" if t % 2 == 0 else "gpt", "markdown": _sentence(rng, 1, 10), "value": "v"}
            for t in range(rng.randint(1, 6))
        ]
        rows.append({"conversations": turns, "lang": "en"})
    return rows


def _content(example: dict[str, torch.Tensor], pad_id: int) -> tuple[list[int], list[int]]:
    """ids and labels between the left and right padding."""
    real = (example["input_ids"] != pad_id).nonzero().flatten()
    start, end = int(real[0]), int(real[-1]) + 1
    return example["input_ids"][start:end].tolist(), example["labels"][start:end].tolist()


LENGTHS = SFTLengths(max_input_length=40, max_output_length=30, max_total_length=64)


def test_instruction_examples(tokenizer, sp: spm.SentencePieceProcessor) -> None:
    build = InstructionExample(tokenizer, template="openorca-3b", lengths=LENGTHS)
    rng = np.random.default_rng(0)
    truncated = 0
    for row in _orca_rows(40, seed=1):
        out = build(row, rng=rng)
        ids, labels, attention = out["input_ids"], out["labels"], out["attention_mask"]
        assert ids.shape == labels.shape == attention.shape == (64,)
        assert attention.dtype == torch.bool and ids.dtype == labels.dtype == torch.int64
        pad = ids == UNK  # pad = unk = 0 for a tokenizer without a pad token
        assert torch.equal(attention, ~pad)
        assert (labels[pad] == IGNORE_INDEX).all()
        # Per-segment tokenization without specials (docs/finetuning.md#examples), then the length limits.
        given = ([BOS] + sp.encode(f"{row['system_prompt']}\n{row['question']}\n"))[:40]
        answer = (sp.encode(row["response"]) + [EOS])[:30]
        want_ids = (given + answer)[:64]
        want_labels = ([IGNORE_INDEX] * len(given) + answer)[:64]
        content_ids, content_labels = _content(out, UNK)
        assert content_ids == want_ids and content_labels == want_labels
        assert content_ids[0] == BOS
        labelled = labels[labels != IGNORE_INDEX]
        if len(given) + len(answer) <= 64 and answer[-1] == EOS:
            assert labelled[-1] == EOS
        else:
            truncated += 1
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])  # not shifted
    assert 0 < truncated < 40


def test_instruction_templates_of_spec() -> None:
    class Recorder:
        pad_token_id, unk_token_id, bos_token_id, eos_token_id = None, 0, 1, 2

        def encode(self, text, add_special_tokens):
            return []

    row = {"system_prompt": "", "question": "Q", "response": "R", "instruction": "I", "output": "O"}
    assert InstructionExample(Recorder(), template="openorca-3b").texts(row) == ("\nQ\n", "R")
    math = InstructionExample(Recorder(), template="code-7b-instruct-mathinstruct").texts(row)
    assert math[0].startswith("You are an AI assistant.") and math[0].endswith("\n\nI\nAnswer: ")
    assert math[1] == "O"
    assert InstructionExample(Recorder(), template="code-7b-instruct-openorca").texts(row)[0].endswith("\n\nQ ")
    custom = InstructionTemplate(
        prompt_field="system_prompt",
        pre_prompt="<",
        post_prompt=">",
        pre_question="Q:",
        post_question="|",
        pre_response="A:",
        post_response=".",
    )
    assert InstructionExample(Recorder(), template=custom).texts(row) == ("<>Q:Q|", "A:R.")
    assert isinstance(TEMPLATES["sharegpt-3b-v1.1"], ChatTemplate)
    with pytest.raises(InputError):
        InstructionExample(Recorder(), template="sharegpt-3b-v1.1")
    for mixture in MIXTURES.values():
        assert abs(sum(part.proportion for part in mixture.parts) - 1) < 1e-9
        assert all(part.template in TEMPLATES for part in mixture.parts)


def test_chat_examples(tokenizer, sp: spm.SentencePieceProcessor) -> None:
    # The tiny vocabulary spells the long initial prompt nearly letter by letter (~160 tokens).
    total = 400
    build = ChatExample(tokenizer, template="sharegpt-3b-v1.1", lengths=SFTLengths(max_total_length=total))
    template = build.template
    rng = np.random.default_rng(1)
    complete = truncated = 0
    for row in _chat_rows(30, seed=2):
        out = build(row, rng=rng)
        ids, labels, attention = out["input_ids"], out["labels"], out["attention_mask"]
        assert ids.shape == labels.shape == attention.shape == (total,)
        assert torch.equal(attention, (ids != UNK) & (ids != EOS))  # EOS hidden from attention
        assert (labels[ids == UNK] == IGNORE_INDEX).all()
        want_ids = [BOS] + sp.encode(template.initial_prompt)
        want_labels = [IGNORE_INDEX] * len(want_ids)
        for turn in row["conversations"]:
            model = turn["from"] == "gpt"
            prefix = sp.encode(template.model_prefix if model else template.human_prefix)
            body = sp.encode(turn["markdown"]) + [EOS] * model
            want_ids += prefix + body
            want_labels += [IGNORE_INDEX] * len(prefix) + (body if model else [IGNORE_INDEX] * len(body))
        content_ids, content_labels = _content(out, UNK)
        assert content_ids == want_ids[:total] and content_labels == want_labels[:total]
        if len(want_ids) > total:
            truncated += 1
        elif row["conversations"][-1]["from"] == "gpt":
            complete += 1
            assert labels[labels != IGNORE_INDEX][-1] == EOS and (ids == EOS).sum() >= 1
            assert not attention[ids == EOS].any()
    assert complete and truncated


def test_chat_replace_rules_and_errors(tokenizer, sp: spm.SentencePieceProcessor) -> None:
    rules = parse_replace_rules(r"fox<R>dog<;>\s+$<R>")
    template = ChatTemplate(text_field="markdown", initial_prompt="", replace_rules=rules)
    build = ChatExample(tokenizer, template=template, lengths=SFTLengths(max_total_length=32, random_pad=False))
    out = build({"conversations": [{"from": "gpt", "markdown": "the fox  "}]})
    assert _content(out, UNK)[0] == [BOS] + sp.encode(template.model_prefix) + sp.encode("the dog") + [EOS]
    for row, words in [
        ({"turns": []}, "conversations"),
        ({"conversations": [{"from": "gpt"}]}, "markdown"),
        ({"conversations": [{"markdown": "x"}]}, "'from'"),
    ]:
        with pytest.raises(InputError) as info:
            build(row)
        assert words in _one_line(info.value)
    with pytest.raises(InputError):
        parse_replace_rules("no marker")


def test_random_padding(tokenizer) -> None:
    row = {"system_prompt": "", "question": "the fox", "response": "a dog"}
    build = InstructionExample(tokenizer, template="openorca-3b", lengths=SFTLengths(max_total_length=48))
    content = len(_content(build(row, rng=np.random.default_rng(0)), UNK)[0])
    padding = 48 - content

    def left_pads(seed: int, count: int = 200) -> list[int]:
        rng = np.random.default_rng(seed)
        return [int((build(row, rng=rng)["input_ids"] != UNK).nonzero()[0]) for _ in range(count)]

    lefts = left_pads(3)
    assert lefts == left_pads(3)  # same seed, same padding
    assert lefts != left_pads(4)
    assert min(lefts) >= 0 and max(lefts) <= padding and len(set(lefts)) > padding // 2
    assert {0, padding} <= set(left_pads(5, 2000))  # both ends are reachable
    right = InstructionExample(
        tokenizer, template="openorca-3b", lengths=SFTLengths(max_total_length=48, random_pad=False)
    )
    out = right(row)
    assert out["input_ids"][0] == BOS and (out["input_ids"][content:] == UNK).all()
    with pytest.raises(InputError) as info:
        build(row)
    assert "rng" in _one_line(info.value)
    state = np.random.get_state()[1].copy()
    build(row, rng=np.random.default_rng(0))
    assert (np.random.get_state()[1] == state).all()  # the global numpy RNG is left alone


def test_sft_dataset_and_collate(tokenizer) -> None:
    rows = _orca_rows(6, seed=3)
    dataset = SFTDataset(rows, InstructionExample(tokenizer, template="openorca-3b", lengths=LENGTHS), seed=1)
    first = [dataset[i]["input_ids"] for i in range(6)]
    assert all(torch.equal(a, dataset[i]["input_ids"]) for i, a in enumerate(first))  # per-item, order-free
    dataset.set_epoch(1)
    assert any(not torch.equal(a, dataset[i]["input_ids"]) for i, a in enumerate(first))
    batch = collate_sft([dataset[0], dataset[1]], pad_id=UNK)
    assert batch["input_ids"].shape == (2, 64) and batch["attention_mask"].dtype == torch.bool
    short = InstructionExample(tokenizer, lengths=SFTLengths(always_pad=False, random_pad=False))
    batch = collate_sft([short(rows[0]), short(rows[1])], pad_id=UNK)
    assert batch["labels"].shape[1] == max(len(short(r)["labels"]) for r in rows[:2])
    broken = SFTDataset([{"question": "q"}], InstructionExample(tokenizer, lengths=LENGTHS))
    with pytest.raises(InputError) as info:
        broken[0]
    assert _one_line(info.value).startswith("row 0:")


def test_mixing_matches_reference_mapping() -> None:
    sizes, proportions = [7, 30, 3], [0.5, 0.3, 0.2]
    datasets = [[(d, i) for i in range(size)] for d, size in enumerate(sizes)]
    global_state = np.random.get_state()
    mixed = MixedDataset(datasets, proportions)
    after = np.random.get_state()
    assert (after[1] == global_state[1]).all() and after[2] == global_state[2]
    # The reference: seed the global RNG with 42 and draw one dataset id per index.
    np.random.seed(42)
    mapping = np.random.choice(np.arange(3, dtype=np.int32), sum(sizes), replace=True, p=proportions)
    np.random.set_state(global_state)
    assert len(mixed) == 40
    assert [mixed[i] for i in range(40)] == [(int(d), i % sizes[d]) for i, d in enumerate(mapping)]
    assert [MixedDataset([datasets[1]], [1.0])[i] for i in range(3)] == [(1, 0), (1, 1), (1, 2)]
    for bad in ([0.5, 0.5], [0.5, 0.6, -0.1], [0.5, 0.3, 0.3]):
        with pytest.raises(InputError):
            MixedDataset(datasets, bad)


def test_filters(tokenizer) -> None:
    rows = [
        {"lang": "en", "conversations": [{"value": "hello"}, {"value": "there"}]},
        {"lang": "pl", "conversations": [{"value": "czesc"}]},
        {"lang": "en", "conversations": [{"value": "ask OpenAI"}, {"value": "ok"}]},
        {"lang": "en", "conversations": [{"value": "x" * 50}]},
    ]
    assert filter_rows(rows, "lang<M>^en$") == [rows[0], rows[2], rows[3]]
    no_openai = r"conversations.<int>*^.value<M>(?i)^((?!openai).)*$"
    assert filter_rows(rows, f"lang<M>^en$<;>{no_openai}") == [rows[0], rows[3]]
    assert filter_rows(rows, "conversations.<int>*v.value<M>ok") == [rows[2]]
    assert filter_rows(rows, "conversations.<int>0.value<LENLT>10") == rows[:2]  # strict: "ask OpenAI" is 10
    # <int>* sums over the turns: 10, 5, 12, 50 characters.
    assert filter_rows(rows, "conversations.<int>*.value<LENGT>10") == rows[2:]
    assert filter_rows(rows, "conversations.<int>*.value<LENLT>11<;>conversations.<int>*.value<LENGT>9") == rows[:1]
    assert filter_rows(rows, "") == rows
    assert filter_rows(rows, "conversations.<int>0.value<TOKGT>20", tokenizer=tokenizer) == [rows[3]]
    for bad in ("lang=en", "lang<LENLT>x", "lang<M>(", "conversations.<int>0.value<TOKLT>3"):
        with pytest.raises(InputError):
            make_filter(bad)
    with pytest.raises(InputError) as info:
        filter_rows(rows, "conversations.<int>5.value<M>x")
    assert "filter" in _one_line(info.value)


def test_read_rows(tmp_path: Path) -> None:
    path = tmp_path / "orca.jsonl"
    rows = _orca_rows(5, seed=4)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_rows(path) == rows
    path.write_text(json.dumps(rows[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_rows(path)
    assert "orca.jsonl line 2" in _one_line(info.value)
    with pytest.raises(InputError):
        read_rows(tmp_path / "missing.jsonl")
