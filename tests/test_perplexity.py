"""Tests of the held-out perplexity evaluation (`longllama.evals.perplexity`) and the `longllama perplexity` command.

A tiny random LongLLaMA (window 64 tokens, final window 24 by default) with sharp weights, so that context tokens
visibly change the scores, and a SentencePiece tokenizer trained on the test's own code-like documents. Expected
scores are computed here from the model's full logits, not with the module's helpers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_errors, sharp_tiny, train_llama_spm

from longllama import LongLlamaForCausalLM
from longllama.cli import build_parser, main
from longllama.documents import iter_documents
from longllama.errors import InputError
from longllama.evals import perplexity as task
from longllama.tokenizer import load_tokenizer

VOCAB = 300
CONTEXTS = [0, 16, 40, 100]  # 100 + T spans two memory windows of 64 tokens before the final window of 24
T = 8
LCL = 24  # the tiny preset's last_context_length


def code_text(rng: random.Random, lines: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "item"]
    out = []
    for _ in range(lines):
        a, b = rng.choice(names), rng.choice(names)
        out.append(
            rng.choice(
                [
                    f"def {a}_{b}({a}, {b}):",
                    f"    {a} = {b} + {rng.randint(0, 99)}",
                    f"    return {a} * {b}",
                    f"for {a} in range({rng.randint(1, 9)}):",
                ]
            )
        )
    return "\n".join(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny/ (model and tokenizer) and docs.jsonl: long documents at indices 1, 3, 4, short ones at 0, 2, 5."""
    root = tmp_path_factory.mktemp("perplexity")
    rng = random.Random(0)
    lengths = [3, 60, 4, 60, 60, 2]
    texts = [code_text(rng, n) for n in lengths]
    train_llama_spm(
        root / "tiny",
        texts + [code_text(rng, 40)],
        vocab_size=VOCAB,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    sharp_tiny(vocab_size=VOCAB).save_pretrained(root / "tiny")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text, "package": "x"}) + "\n" for text in texts)
    return root


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    return load_tokenizer(folder / "tiny")


@pytest.fixture(scope="module")
def model(folder: Path):
    return LongLlamaForCausalLM.from_pretrained(folder / "tiny").eval()


@pytest.fixture(scope="module")
def documents(folder: Path, tokenizer) -> list[task.Document]:
    return task.load_documents(iter_documents(folder / "docs.jsonl"), tokenizer, needed_tokens=max(CONTEXTS) + T)


def full_logits(model, ids: list[int], last_context_length: int | None) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False, last_context_length=last_context_length).logits[0]


def test_documents_are_the_long_ones_cut_to_what_is_needed(folder: Path, tokenizer, documents) -> None:
    texts = [json.loads(line)["text"] for line in (folder / "docs.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    long_enough = [i for i, n in enumerate(lengths) if n >= max(CONTEXTS) + T]
    assert long_enough == [1, 3, 4], lengths  # the fixture must mix long and short documents
    assert [d.index for d in documents] == long_enough
    for d in documents:
        assert d.total_tokens == lengths[d.index]
        assert d.ids == list(tokenizer.encode(texts[d.index], add_special_tokens=False))[: max(CONTEXTS) + T]
    two = task.load_documents(iter(texts), tokenizer, needed_tokens=max(CONTEXTS) + T, max_docs=2)
    assert [d.index for d in two] == [1, 3]
    with pytest.raises(InputError, match="no document is long enough"):
        task.load_documents(iter(texts), tokenizer, needed_tokens=10_000)


@pytest.mark.parametrize("context", [16, 40, 100])
def test_scored_positions_are_exactly_the_target(model, tokenizer, documents, context: int) -> None:
    doc = documents[0]
    ids = task.context_input(doc, context, max_context=max(CONTEXTS), target_tokens=T, bos_id=tokenizer.bos_token_id)
    assert len(ids) == 1 + context + T and ids[0] == tokenizer.bos_token_id
    assert ids[-T:] == doc.ids[max(CONTEXTS) :] and ids[1:] == doc.ids[max(CONTEXTS) - context :]
    got = task.target_nll(model, ids, target_tokens=T, last_context_length=LCL)
    logits = full_logits(model, ids, LCL)
    # Input positions C .. C+T-1 predict the target ids at C+1 .. C+T.
    expected = F.cross_entropy(logits[context : context + T], torch.tensor(ids[context + 1 :]), reduction="none")
    assert got.shape == (T,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    shifted = F.cross_entropy(logits[context - 1 : context + T - 1], torch.tensor(ids[context:-1]), reduction="none")
    assert not torch.allclose(got, shifted, atol=1e-3)  # an off-by-one would be seen


def test_zero_context_is_the_plain_loss_on_the_target(model, tokenizer, documents) -> None:
    doc = documents[1]
    ids = task.context_input(doc, 0, max_context=max(CONTEXTS), target_tokens=T, bos_id=tokenizer.bos_token_id)
    assert ids == [tokenizer.bos_token_id] + doc.ids[-T:]
    got = task.target_nll(model, ids, target_tokens=T, last_context_length=LCL)
    with torch.no_grad():
        plain = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # one window, default settings
    torch.testing.assert_close(got.mean(), plain, rtol=1e-5, atol=1e-5)


class Recorder:
    """The model, recording each call's input ids and settings."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    @property
    def device(self):
        return self.model.device

    def __call__(self, ids, **settings):
        self.calls.append((ids[0].tolist(), settings))
        return self.model(ids, **settings)


def test_every_context_scores_the_same_documents_and_targets(model, tokenizer, documents) -> None:
    recorder = Recorder(model)
    records = task.run_perplexity(
        recorder,
        documents,
        contexts=[100, 0, 40, 16, 40],
        target_tokens=T,
        bos_id=tokenizer.bos_token_id,
        progress=False,
    )
    assert len(records) == len(recorder.calls) == len(documents) * len(CONTEXTS)
    for context in CONTEXTS:
        assert sorted(r["document"] for r in records if r["context"] == context) == [1, 3, 4]
    targets: dict[int, set] = {}
    for (ids, settings), record in zip(recorder.calls, records):
        assert len(ids) == 1 + record["context"] + T and ids[0] == tokenizer.bos_token_id
        assert settings == {"use_cache": False, "last_context_length": LCL, "logits_to_keep": T + 1}
        targets.setdefault(record["document"], set()).add(tuple(ids[-T:]))
    assert all(len(t) == 1 for t in targets.values())  # one target per document, whatever the context
    by_doc = {(r["document"], r["context"]): r["mean_nll"] for r in records}
    assert by_doc[(1, 0)] != pytest.approx(by_doc[(1, 100)], abs=1e-4)  # the context reaches the target
    summary = task.summarize(records)
    assert summary["contexts"] == CONTEXTS
    for row in summary["by_context"]:
        group = [r for r in records if r["context"] == row["context"]]
        mean = sum(r["mean_nll"] for r in group) / len(group)
        assert row["documents"] == 3 and row["tokens"] == 3 * T
        assert row["mean_nll"] == pytest.approx(mean) and row["perplexity"] == pytest.approx(torch.tensor(mean).exp())
        assert row["delta_nll"] == pytest.approx(mean - summary["by_context"][0]["mean_nll"])
    assert "perplexity" in task.format_table(summary).splitlines()[0]


def test_settings_are_checked(model, tokenizer, documents) -> None:
    assert task.check_settings([40, 0, 40], target_tokens=T) == [0, 40]
    for contexts, target, lcl in [([], T, None), ([-1], T, None), ([0], 0, None), ([0, 16], T, T)]:
        with pytest.raises(InputError):
            task.check_settings(contexts, target_tokens=target, last_context_length=lcl)
    with pytest.raises(InputError, match="more than"):  # the model's final window (24) cannot hold 30 targets
        task.run_perplexity(model, documents, contexts=[0], target_tokens=30, bos_id=1, progress=False)


def test_plot_has_zero_at_the_left_of_a_log2_axis(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    summary = task.summarize(
        [{"document": 0, "context": c, "tokens": 4, "nll_sum": 4.0 / (1 + c)} for c in [0, 1024, 4096]]
    )
    path = task.plot_summary(summary, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = Figure().subplots()
    ax.plot([0, 1024, 4096], [3, 2, 1])
    task._log2_axis_with_zero(ax, [0, 1024, 4096])
    assert ax.get_xscale() == "symlog" and [t.get_text() for t in ax.get_xticklabels()] == ["0", "1k", "4k"]
    left, right = ax.get_xlim()
    assert left <= 0 and right >= 4096  # 0 is on the axis, at its left end
    scale = ax.transData.transform([(0, 0), (1024, 0), (2048, 0), (4096, 0)])[:, 0]
    assert scale[2] - scale[1] == pytest.approx(scale[3] - scale[2])  # log2 above the smallest positive context


# --------------------------------------------------------------------------------------------------------------------
# The command


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["perplexity", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_end_to_end(folder: Path, model, tokenizer, documents, tmp_path: Path, capsys) -> None:
    out, plot = tmp_path / "ppl.json", tmp_path / "ppl.png"
    code, stdout, err = _run(
        capsys,
        "--model",
        str(folder / "tiny"),
        "--data",
        str(folder / "docs.jsonl"),
        "--contexts",
        "100,0,16,40",
        "--target-tokens",
        str(T),
        "--max-docs",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--plot",
        str(plot),
    )
    assert code == 0, err
    assert "perplexity" in stdout and f"wrote {out}" in stdout and f"wrote {plot}" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert saved["settings"]["contexts"] == CONTEXTS and saved["settings"]["last_context_length"] == LCL
    assert [r["context"] for r in saved["summary"]["by_context"]] == CONTEXTS
    assert all(r["documents"] == 2 and r["tokens"] == 2 * T for r in saved["summary"]["by_context"])
    records = saved["records"]
    assert len(records) == 8 and sorted({r["document"] for r in records}) == [1, 3]
    # The saved score is the model's loss on the target, from its full logits.
    record = next(r for r in records if r["document"] == 3 and r["context"] == 40)
    ids = [tokenizer.bos_token_id] + documents[1].ids[max(CONTEXTS) - 40 :]
    logits = full_logits(model, ids, LCL)
    expected = F.cross_entropy(logits[40 : 40 + T], torch.tensor(ids[41:]))
    assert record["mean_nll"] == pytest.approx(float(expected), abs=1e-5)


def test_command_errors_are_one_line(folder: Path, tmp_path: Path, capsys) -> None:
    ok = [
        "--model",
        str(folder / "tiny"),
        "--data",
        str(folder / "docs.jsonl"),
        "--device",
        "cpu",
        "--target-tokens",
        str(T),
    ]
    cases = {
        "no data": (["--model", str(folder / "tiny")], "--data"),
        "missing data file": (
            ["--model", str(folder / "tiny"), "--data", str(tmp_path / "nope.jsonl")],
            "does not exist",
        ),
        "none long enough": ([*ok, "--contexts", "0,64k"], "no document is long enough"),
        "bad contexts": ([*ok, "--contexts", "0,abc"], "whole number of tokens"),
        "negative context": ([*ok, "--contexts", "-16"], "0 or more"),
        "empty contexts": ([*ok, "--contexts", ","], "context lengths"),
        "target too long": ([*ok, "--contexts", "0,16", "--target-tokens", "24"], "more than"),  # the last one wins
        "out folder missing": ([*ok, "--contexts", "0,16", "--out", str(tmp_path / "no" / "r.json")], "does not exist"),
    }
    assert_one_line_errors(lambda *args: _run(capsys, *args), cases)


def test_contexts_parsing(capsys) -> None:
    args = build_parser().parse_args(["perplexity", "--contexts", "16k,0,1k,1024"])
    assert args.contexts == [0, 1024, 16384]
    defaults = build_parser().parse_args(["perplexity"])
    assert defaults.contexts is None and defaults.target_tokens == 512 and defaults.last_context_length is None
    assert main(["perplexity", "--help"]) == 0
    assert "--contexts" in capsys.readouterr().out
