"""Held-out perplexity against context length: does a longer memory lower the loss on the same tokens?

For every document with at least max(C) + T tokens (C: the context lengths asked for, T: `target_tokens`), the
text's ids `d` (without BOS) are cut to their first max(C) + T tokens. The target is the fixed span
`d[max(C) : max(C) + T]`, the same tokens for every C. For one context length C the model reads

    [BOS] + d[max(C) - C : max(C) + T]        (1 + C + T tokens; the target is the last T of them)

in ONE forward call, `model(ids, use_cache=False, last_context_length=L)`: everything before the last L tokens goes
through the model in windows (and, in memory layers, into the memory), the last L tokens are the final window. The
scored positions are exactly the target: the logits at input positions C .. C+T-1 against the ids at C+1 .. C+T,
so every target token is scored at every C, the first one included (from BOS when C = 0). L must exceed T, so that
the target and the position predicting its first token lie in the final window, as in generation after a long
prompt. With C = 0 the input is [BOS] + target, T + 1 <= L tokens: one plain window, no memory; the score is the plain
model's loss on the target. Only the last T + 1 positions' logits are computed (`logits_to_keep`): at 64k tokens
the logits of every position would take gigabytes.

The same documents serve every C (documents too short for max(C) are skipped, not scored at the small C only), so
the curve compares like with like. Results: mean NLL per target token and perplexity per C, a table, a JSON file
and a plot of perplexity against context length.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longllama.errors import InputError
from longllama.evals.passkey import plot_format

# Shared with the passkey task: the check of a plot file's suffix and the write-then-rename of result files.
from longllama.evals.records import replace_atomically

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS = (0, 1024, 4096, 16384, 65536)
DEFAULT_TARGET_TOKENS = 512


@dataclass(frozen=True)
class Document:
    """A document long enough for the evaluation: its number in the data (0-based), its full length in tokens and
    the ids used (the first max(C) + T, without BOS)."""

    index: int
    total_tokens: int
    ids: list[int]


# --------------------------------------------------------------------------------------------------------------------
# Settings and documents


def check_settings(contexts: Sequence[int], *, target_tokens: int, last_context_length: int | None = None) -> list[int]:
    """The context lengths sorted and without repeats; fails on values the evaluation cannot use."""
    if not contexts:
        raise InputError("no context lengths given; pass e.g. contexts=[0, 1024, 4096]")
    bad = [c for c in contexts if isinstance(c, bool) or not isinstance(c, int) or c < 0]
    if bad:
        raise InputError(f"context length(s) {', '.join(map(repr, bad))} must be whole numbers of tokens, 0 or more")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise InputError(f"target_tokens={target_tokens!r} must be at least 1")
    if last_context_length is not None and last_context_length <= target_tokens:
        raise InputError(
            f"last context length {last_context_length} must be more than the {target_tokens} target "
            "tokens (the final window holds the target and the token before it): raise "
            "--last-context-length or lower --target-tokens"
        )
    return sorted(set(contexts))


def load_documents(
    texts: Iterable[str], tokenizer, *, needed_tokens: int, max_docs: int | None = None
) -> list[Document]:
    """The documents (in data order) with at least `needed_tokens` tokens, each cut to that many; at most
    `max_docs` of them. Fails when none is long enough, naming the longest one seen."""
    if max_docs is not None and max_docs < 1:
        raise InputError(f"max_docs={max_docs} must be at least 1")
    chosen: list[Document] = []
    seen = longest = 0
    for index, text in enumerate(texts):
        seen += 1
        ids = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        longest = max(longest, len(ids))
        if len(ids) >= needed_tokens:
            chosen.append(Document(index, len(ids), ids[:needed_tokens]))
            if max_docs is not None and len(chosen) == max_docs:
                break
    if not chosen:
        raise InputError(
            f"no document is long enough: the evaluation needs {needed_tokens} tokens (largest context "
            f"+ target), the longest of {seen} document(s) has {longest}; pass smaller --contexts or "
            "--target-tokens, or longer documents"
        )
    logger.info("%d of %d document(s) read have at least %d tokens", len(chosen), seen, needed_tokens)
    return chosen


def context_input(document: Document, context: int, *, max_context: int, target_tokens: int, bos_id: int) -> list[int]:
    """[BOS] + the `context` tokens before the target + the target (the target ends the input)."""
    if not 0 <= context <= max_context or len(document.ids) != max_context + target_tokens:
        raise InputError(
            f"context {context} does not fit document {document.index} cut for max context "
            f"{max_context} and {target_tokens} target tokens"
        )
    return [bos_id] + document.ids[max_context - context :]


# --------------------------------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def target_nll(
    model, input_ids: Sequence[int], *, target_tokens: int, last_context_length: int | None = None
) -> torch.Tensor:
    """NLL (float32, natural log) of each of the last `target_tokens` ids of `input_ids`, in one forward call.

    The input position before each target token predicts it; `logits_to_keep = T + 1` keeps exactly those T
    positions plus the last one (which predicts nothing here and is dropped).
    """
    if len(input_ids) <= target_tokens:
        raise InputError(
            f"an input of {len(input_ids)} tokens leaves no token before its {target_tokens} target "
            "tokens; start it with BOS"
        )
    device = getattr(model, "device", None)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    logits = model(
        ids, use_cache=False, last_context_length=last_context_length, logits_to_keep=target_tokens + 1
    ).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, -target_tokens:], reduction="none").cpu()


def run_perplexity(
    model,
    documents: Sequence[Document],
    *,
    contexts: Sequence[int],
    target_tokens: int,
    bos_id: int,
    last_context_length: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per (document, context length): the target's summed and mean NLL.

    `last_context_length` None means the model's configured one.
    """
    lcl = last_context_length if last_context_length is not None else model.config.last_context_length
    contexts = check_settings(contexts, target_tokens=target_tokens, last_context_length=lcl)
    max_context = contexts[-1]
    records = []
    with _bar(len(documents) * len(contexts), enabled=progress) as bar:
        for document in documents:
            for context in contexts:
                ids = context_input(
                    document, context, max_context=max_context, target_tokens=target_tokens, bos_id=bos_id
                )
                nll = target_nll(model, ids, target_tokens=target_tokens, last_context_length=lcl)
                records.append(
                    {
                        "document": document.index,
                        "document_tokens": document.total_tokens,
                        "context": context,
                        "tokens": target_tokens,
                        "nll_sum": float(nll.sum()),
                        "mean_nll": float(nll.mean()),
                    }
                )
                logger.info("document %d context %d: mean NLL %.4f", document.index, context, nll.mean())
                bar.update(1)
    return records


def _bar(total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", unit="run", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------------
# Summary, table, files


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per context length: documents, scored tokens, mean NLL per token, perplexity, and the change in mean NLL
    from the smallest context (negative: the longer context helps)."""
    contexts = sorted({r["context"] for r in records})
    rows = []
    for context in contexts:
        group = [r for r in records if r["context"] == context]
        tokens = sum(r["tokens"] for r in group)
        mean_nll = sum(r["nll_sum"] for r in group) / tokens
        rows.append(
            {
                "context": context,
                "documents": len({r["document"] for r in group}),
                "tokens": tokens,
                "mean_nll": mean_nll,
                "perplexity": math.exp(mean_nll),
            }
        )
    for row in rows:
        row["delta_nll"] = row["mean_nll"] - rows[0]["mean_nll"]
    return {"contexts": contexts, "by_context": rows}


def format_table(summary: dict[str, Any]) -> str:
    header = ["context", "docs", "tokens", "mean NLL", "perplexity", "dNLL"]
    rows = [
        [
            str(r["context"]),
            str(r["documents"]),
            str(r["tokens"]),
            f"{r['mean_nll']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['delta_nll']:+.4f}",
        ]
        for r in summary["by_context"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in [header, *rows])


def save_results(
    path: str | os.PathLike[str],
    records: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    *,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write {settings, summary, records} as JSON, atomically."""
    text = json.dumps({"settings": settings or {}, "summary": summary, "records": list(records)}, indent=2)
    return replace_atomically(Path(path), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Perplexity against context length, on a log2 axis whose left end shows context 0."""
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    rows = summary["by_context"]
    contexts = [r["context"] for r in rows]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(contexts, [r["perplexity"] for r in rows], marker="o")
    _log2_axis_with_zero(ax, contexts)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the target tokens")
    documents = rows[0]["documents"]
    ax.set_title(
        title
        or f"held-out perplexity ({documents} document{'s' if documents != 1 else ''}, "
        f"{rows[0]['tokens'] // documents} target tokens each)"
    )
    ax.grid(alpha=0.3)
    return replace_atomically(Path(path), lambda tmp: figure.savefig(tmp, format=fmt, dpi=120))


def _log2_axis_with_zero(ax, contexts: Sequence[int]) -> None:
    positive = [c for c in contexts if c > 0]
    if positive and 0 in contexts:
        # log2 cannot show 0: symlog is linear below the smallest positive context, so 0 sits a short stretch to
        # its left (as wide as two octaves of the log part) and everything above is log2.
        ax.set_xscale("symlog", base=2, linthresh=min(positive), linscale=1)
    elif positive:
        ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [_short(c) for c in contexts])
    ax.minorticks_off()


def _short(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)
