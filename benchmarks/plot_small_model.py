"""Plots of the small model's recorded results (README section "The shipped small model").

    python benchmarks/plot_small_model.py benchmarks/results/h200x2-2026-11-26-small-model.json \
        --logs benchmarks/results/small-model-2026-11-26 --out benchmarks/results

Writes small-model-passkey.png (accuracy against prompt length, one line per model / setting),
small-model-perplexity.png
and, from the training logs (log-fot.jsonl, log-no-negatives.jsonl), small-model-loss.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def _passkey(records: list[dict], out: Path) -> None:
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.subplots()
    lines: dict[str, list[dict]] = {}
    for r in records:
        if r["benchmark"] == "passkey":
            lines.setdefault(r["model"], []).append(r)
    for model, rows in lines.items():
        rows.sort(key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=model)
        for r in rows:
            ax.annotate(
                f"{round(r['accuracy'] * r['trials'])}/{r['trials']}",
                (r["length"], r["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("passkey retrieval, small model (window 512)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(out, dpi=110)


def _perplexity(records: list[dict], out: Path) -> None:
    rows = sorted((r for r in records if r["benchmark"] == "perplexity"), key=lambda r: r["context"])
    figure = Figure(figsize=(6, 3.8), layout="constrained")
    ax = figure.subplots()
    xs = [max(r["context"], 256) for r in rows]  # context 0 drawn at the left end of the log axis
    ax.plot(xs, [r["perplexity"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, ["0" if r["context"] == 0 else str(r["context"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("context before the scored tokens (tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    figure.savefig(out, dpi=110)


def _loss(logs: Path, out: Path) -> None:
    figure = Figure(figsize=(7, 3.8), layout="constrained")
    ax = figure.subplots()
    for name in ("fot", "no-negatives"):
        path = logs / f"log-{name}.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.open()]
        train = [r for r in rows if "loss" in r]
        ax.plot(
            [r["tokens"] / 1e6 for r in train],
            [r["loss"] for r in train],
            alpha=0.7,
            linewidth=0.8,
            label=f"{name} (train)",
        )
        evals = [r for r in rows if "eval_loss" in r]
        per_step = train[-1]["tokens"] / train[-1]["step"]
        if evals:
            ax.plot(
                [r["step"] * per_step / 1e6 for r in evals],
                [r["eval_loss"] for r in evals],
                marker="o",
                label=f"{name} (held-out)",
            )
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss")
    ax.set_ylim(1, 5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--logs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    records = json.loads(Path(args.results).read_text())
    _passkey(records, args.out / "small-model-passkey.png")
    _perplexity(records, args.out / "small-model-perplexity.png")
    if args.logs:
        _loss(args.logs, args.out / "small-model-loss.png")
    print(f"wrote plots to {args.out}")


if __name__ == "__main__":
    main()
