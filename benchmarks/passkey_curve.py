"""The shipped model's pass-key curve: accuracy and seconds per trial against prompt length, one line per memory
mode (dense, kNN, block retrieval one- and two-level and with recent blocks kept, no memory), from the recorded
pass-key results.

Reads `benchmarks/results` records of two kinds: the benchmarks' (`"benchmark": "passkey"` records, as
bench_retrieval.py and the small model's runs write them) and `longllama passkey --out` files (settings, summary,
one record per trial). Trials of one mode, length and card from several files are added up, except that a later
file's run of the same seeds replaces the earlier one (a re-run of the same prompts with newer code); other models
(the trained-without-negatives control) and block settings other than the defaults are left out; trials read in
batches (bench_retrieval.py --batch) count for accuracy, not for seconds per trial. Writes the curve
as JSON (points with trials, correct, accuracy, seconds per trial, card, seeds and sources) and a plot of both
panels.

    python benchmarks/passkey_curve.py --out-json benchmarks/results/passkey-curve.json \
        --out-png benchmarks/results/passkey-curve.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"
# The records of the shipped model as it is now (trained 2026-11-26); earlier files measured an earlier model.
SOURCES = (
    "h200x2-2026-11-26-small-model.json",
    "h100-2026-12-05-retrieval.json",
    "h100-2026-12-05-retrieval-passkey-1m.json",
    "cpu-2026-12-05-passkey-128k-two-level",
    "cpu-2026-12-05-passkey-4m-two-level",
    "h100-2026-12-06-kv-recompute/passkey-1m.json",
    "cpu-2026-12-07-recent-blocks/passkey-128k-r16-b64.json",
    "h100-2026-12-07-recent-blocks/passkey-1m-b64-r16.json",
    "h100-2026-12-07-recent-blocks/passkey-1m-b256-r32.json",  # its no-memory control (256 blocks: left out)
    "h100-2026-12-07-recent-blocks/passkey-4m-b64-r16.json",
    "h100-2026-12-07-recent-blocks/passkey-10m-b64-r16.json",
    "h100-2026-12-07-batched-passkey",  # trials read in batches: their accuracy counts, not their seconds
    "h100-2026-12-07-passkey-10m",  # 10M tokens, batches of three (the same)
)
MODES = ("dense", "knn", "blocks", "blocks2", "blocks-recent", "no-memory")
DEFAULT_BLOCKS = 64  # mem_blocks of the curve's block retrieval (other settings are left out)
CURVE_RECENT = 16  # mem_recent_blocks of its "blocks-recent" line (0 for the other block lines)
LABELS = {
    "dense": "dense memory",
    "knn": "kNN memory (top 128)",
    "blocks": "block retrieval",
    "blocks2": "block retrieval, two-level",
    "blocks-recent": f"block retrieval, {CURVE_RECENT} recent blocks kept",
    "no-memory": "no memory layers (control)",
}


def _mode_of_record(r: dict) -> str | None:
    """The memory mode of a benchmark record, or None for another model."""
    if r.get("mem_mode"):
        return r["mem_mode"]
    model = r.get("model", "small")
    if model == "small, mem_layers=[]":
        return "no-memory"
    if model in ("small", "small, --mem-top-k 128"):
        return "knn" if r.get("mem_top_k") is not None else "dense"
    return None


def _on_curve(mode: str, blocks: int | None, recent: int) -> bool:
    """Whether a block-retrieval mode's settings are the curve's: DEFAULT_BLOCKS blocks a group, CURVE_RECENT of them
    recent on the "blocks-recent" line and none on the others."""
    return blocks == DEFAULT_BLOCKS and recent == (CURVE_RECENT if mode == "blocks-recent" else 0)


def _mode_of_settings(settings: dict) -> str | None:
    """The memory mode of a `longllama passkey --out` run, or None for block settings other than the defaults."""
    plan = settings.get("plan", {})
    if settings.get("mem_layers") == "none":
        return "no-memory"
    if settings.get("mem_top_k") is not None:
        return "knn"
    if plan.get("mem_retrieval") == "blocks":
        recent, two_level = plan.get("mem_recent_blocks", 0), plan.get("mem_super_size")
        if recent and two_level:
            return None
        mode = "blocks-recent" if recent else "blocks2" if two_level else "blocks"
        return mode if _on_curve(mode, plan.get("mem_blocks"), recent) else None
    return "dense"


def points_of(path: Path) -> list[dict]:
    """Per (mode, length) the trials, correct answers and seconds of one file; files of a folder each."""
    if path.is_dir():
        return [p for child in sorted(path.glob("*.json")) for p in points_of(child)]
    data = json.loads(path.read_text())
    points = []
    if isinstance(data, dict) and "settings" in data:  # longllama passkey --out
        settings = data["settings"]
        mode = _mode_of_settings(settings)
        if mode is None:
            return []
        for row in data["summary"]["by_length"]:
            seeds = list(range(settings["seed"], settings["seed"] + row["trials"]))
            points.append(
                dict(mode=mode, length=row["length"], trials=row["trials"], correct=row["correct"],
                     device=settings.get("device", "?"), seconds=None, seeds=seeds, source=path.name)
            )  # fmt: skip
        return points
    records = data["records"] if isinstance(data, dict) else data
    for r in records:
        if r.get("benchmark") != "passkey" or r.get("skipped") or not r.get("trials"):
            continue
        mode = _mode_of_record(r)
        if mode is None or (
            mode.startswith("blocks")
            and not _on_curve(mode, r.get("mem_blocks", DEFAULT_BLOCKS), r.get("mem_recent_blocks") or 0)
        ):
            continue
        # a batch's seconds shared by its trials are not a trial's seconds: the curve's times are lone trials'
        seconds = r.get("seconds_per_trial") if r.get("batch", 1) == 1 else None
        points.append(
            dict(mode=mode, length=r["length"], trials=r["trials"], correct=round(r["accuracy"] * r["trials"]),
                 device=r.get("device", "?"), seconds=seconds, seeds=r.get("seeds"), source=path.name)
        )  # fmt: skip
    return points


def curve(paths: list[Path]) -> list[dict]:
    """Points of one mode, length and card added up over the files (in order: a run of seeds that an earlier one
    also ran replaces it), sorted by mode and length."""
    runs: dict[tuple, list[dict]] = {}
    for path in paths:
        for p in points_of(path):
            key = (p["mode"], p["length"], p["device"])
            seeds = set(p["seeds"] or ())
            runs[key] = [q for q in runs.get(key, []) if not seeds & set(q["seeds"] or ())] + [p]
    out = []
    for key in sorted(runs, key=lambda k: (MODES.index(k[0]) if k[0] in MODES else len(MODES), k[1], k[2])):
        group = runs[key]
        trials = sum(p["trials"] for p in group)
        correct = sum(p["correct"] for p in group)
        timed = [p for p in group if p["seconds"] is not None]
        seconds = sum(p["seconds"] * p["trials"] for p in timed) / sum(p["trials"] for p in timed) if timed else None
        seeds = sorted(s for p in group for s in p["seeds"] or ()) or None
        out.append(dict(mode=key[0], length=key[1], device=key[2], trials=trials, correct=correct,
                        accuracy=correct / trials, seconds_per_trial=seconds, seeds=seeds,
                        sources=sorted({p["source"] for p in group})))  # fmt: skip
    return out


def plot(points: list[dict], out: Path) -> None:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    accuracy, seconds = figure.subplots(1, 2)
    for index, mode in enumerate(MODES):
        rows = [p for p in points if p["mode"] == mode]
        if not rows:
            continue
        by_length: dict[int, list[dict]] = {}
        for p in rows:
            by_length.setdefault(p["length"], []).append(p)
        lengths = sorted(by_length)
        trials = [sum(p["trials"] for p in by_length[n]) for n in lengths]
        correct = [sum(p["correct"] for p in by_length[n]) for n in lengths]
        line = accuracy.plot(lengths, [c / t for c, t in zip(correct, trials)], marker="o", label=LABELS[mode])[0]
        for n, c, t in zip(lengths, correct, trials):
            accuracy.annotate(f"{c}/{t}", (n, c / t), textcoords="offset points", xytext=(4, 3 - 9 * index),
                              fontsize=7, color=line.get_color())  # fmt: skip
        for device in sorted({p["device"] for p in rows if p["seconds_per_trial"] is not None}):
            timed = sorted((p["length"], p["seconds_per_trial"]) for p in rows if p["device"] == device and
                           p["seconds_per_trial"] is not None)  # fmt: skip
            style = "-" if "H200" in device else "--"
            seconds.plot(*zip(*timed), marker="o", linestyle=style, color=line.get_color(),
                         label=f"{LABELS[mode]}, {device.removeprefix('NVIDIA ')}")  # fmt: skip
    for ax in (accuracy, seconds):
        ax.set_xscale("log", base=2)
        ax.set_xlim(2**14.5, 2**23.6)  # 32k to 10M, the lengths the curve is for
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
    accuracy.set_ylim(-0.05, 1.12)
    accuracy.set_ylabel("pass keys found")
    accuracy.set_title("Shipped small model: pass-key retrieval (all cards)")
    accuracy.legend(fontsize=7, loc="center left")
    seconds.set_yscale("log")
    seconds.set_ylabel("seconds per trial")
    seconds.set_title("Seconds per trial (reading and answering)")
    seconds.legend(fontsize=6)
    temp = out.with_name(f".{out.name}.tmp")
    figure.savefig(temp, format="png", dpi=110)
    os.replace(temp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, help=f"files or folders (default: {', '.join(SOURCES)})")
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--out-png", type=Path)
    args = parser.parse_args(argv)
    paths = args.inputs or [RESULTS / name for name in SOURCES]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    points = curve(paths)
    temp = args.out_json.with_name(f".{args.out_json.name}.tmp")
    temp.write_text(json.dumps({"benchmark": "passkey_curve", "model": "small", "points": points}, indent=1) + "\n")
    os.replace(temp, args.out_json)
    for p in points:
        secs = "" if p["seconds_per_trial"] is None else f"  {p['seconds_per_trial']:7.1f} s a trial"
        print(f"{p['mode']:10s} {p['length']:>9,d}  {p['correct']:>2d}/{p['trials']:<2d}  {p['device']}{secs}")
    if args.out_png:
        plot(points, args.out_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
