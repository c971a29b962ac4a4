"""Warm `longllama generate` processes alternating between variants, each its own PYTHONPATH (which `src`, which
libraries in front of the installed ones), on one model and cache folder that benchmarks/cold_start.py --keep left:
the first token after the process started (weight loading excluded), the libraries' import, the ingest's dry pass
and the process's wall time, per run and as medians. Variants alternate in ABBA order across rounds.

    python benchmarks/cold_start.py --commands generate --keep --out cold.json      # prints the kept folder
    python benchmarks/cold_start_ab.py KEPT out.json before=$PWD/old/src after=$PWD/src --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cold_start import child_env, parse_report, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kept", type=Path, help="the folder cold_start.py --keep left (model, prompt.txt, caches)")
    ap.add_argument("out", type=Path)
    ap.add_argument("variants", nargs="+", help="NAME=PYTHONPATH")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    argv = ["generate", "--model", str(args.kept / "model"), "--prompt-file", str(args.kept / "prompt.txt")]
    argv += ["--max-new-tokens", "16", "--device", args.device, "--verbose"]
    rows, names = [], list(variants)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            env = child_env(args.kept / "cache-generate")
            env["PYTHONPATH"] = variants[name]
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "longllama.cli", *argv], env=env, capture_output=True, text=True, timeout=300
            )
            wall = time.perf_counter() - start
            events = parse_report(done.stderr)
            s = summarize(events)
            lib = next((e["seconds"] for e in events if e["name"].startswith("libraries")), None)
            dry = next((e["seconds"] for e in events if e["name"].startswith("dry pass: 6")), None)
            rows.append(
                dict(
                    variant=name,
                    rc=done.returncode,
                    first_token_s=s["first_token_s"],
                    first_token_at_s=s["first_token_at_s"],
                    load_s=s["load_s"],
                    libraries_s=lib,
                    dry_pass_s=dry,
                    wall_s=round(wall, 2),
                    events=events,
                    stderr_tail=done.stderr[-600:] if done.returncode else "",
                )
            )
            print(name, done.returncode, s["first_token_s"], "libraries", lib, "ingest dry pass", dry, "wall",
                  round(wall, 2), flush=True)  # fmt: skip
    for name in names:
        ok = [r for r in rows if r["variant"] == name and r["rc"] == 0]
        if ok:
            print(
                name,
                "median first_token_s",
                statistics.median(r["first_token_s"] for r in ok),
                "median libraries_s",
                statistics.median(r["libraries_s"] for r in ok),
                "median dry pass",
                statistics.median(r["dry_pass_s"] or 0 for r in ok),
                [r["first_token_s"] for r in ok],
            )
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
