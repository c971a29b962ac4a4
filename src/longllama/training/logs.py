"""Logs of a run: log.jsonl, the progress bar and the loss curve."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


class RunLog:
    """log.jsonl (one JSON object per record) and a progress bar on stderr, on rank 0 only."""

    def __init__(self, path: Path, *, start_step: int, total: int, enabled: bool, progress: bool) -> None:
        self.path, self.enabled = path, enabled
        self.bar = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(path, start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=start_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def advance(self, record: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _truncate_log(path: Path, start_step: int) -> None:
    """A resumed run continues the log from its checkpoint: records of later steps (written by the run that was
    stopped) are dropped. A new run starts an empty log."""
    if not path.is_file():
        return
    kept = []
    if start_step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Draw training (and eval) loss against step into a PNG; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no loss plot: matplotlib is not installed (pip install matplotlib)")
        return False
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return True
