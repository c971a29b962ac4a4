#!/usr/bin/env python3
"""Prepare the offline corpus and tokenizer (see corpus.py beside this file) from the Python source installed here.

python scripts/prepare_corpus.py --out data/corpus
python scripts/prepare_corpus.py --out /tmp/quick --limit-packages 20 --synthetic 50 --vocab-size 2048
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from longllama.errors import LongLlamaError
except ImportError:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from longllama.errors import LongLlamaError

# scripts/ is not a package: run as a script, this file's folder is on sys.path (corpus.py is a tool, not the library).
import corpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = corpus.CorpusOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if missing; its corpus files replaced)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=defaults.heldout_fraction,
        help="expected fraction of packages held out (chosen by a hash of the name)",
    )
    parser.add_argument(
        "--max-heldout-bytes",
        type=int,
        default=defaults.max_heldout_bytes,
        help="packages with more bytes of .py files always go to train",
    )
    parser.add_argument("--max-doc-chars", type=int, default=defaults.max_doc_chars)
    parser.add_argument(
        "--max-heldout-doc-chars",
        type=int,
        default=defaults.max_heldout_doc_chars,
        help="held-out documents may be longer (they are only scored)",
    )
    parser.add_argument(
        "--synthetic", type=int, default=defaults.synthetic, help="synthetic retrieval documents mixed into train.jsonl"
    )
    parser.add_argument(
        "--heldout-synthetic",
        type=int,
        default=defaults.heldout_synthetic,
        help="synthetic documents with held-out filler, in heldout-synthetic.jsonl",
    )
    parser.add_argument(
        "--synthetic-chars", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(defaults.synthetic_chars)
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--tokenizer-sample-chars", type=int, default=defaults.tokenizer_sample_chars)
    parser.add_argument("--limit-packages", type=int, default=None, help="only the K smallest packages (quick run)")
    parser.add_argument("--no-stdlib", action="store_true", help="leave the standard library out")
    parser.add_argument("--no-token-count", action="store_true", help="skip counting tokens per split")
    parser.add_argument("--threads", type=int, default=defaults.num_threads)
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    options = corpus.CorpusOptions(
        seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        max_heldout_bytes=args.max_heldout_bytes,
        max_doc_chars=args.max_doc_chars,
        max_heldout_doc_chars=args.max_heldout_doc_chars,
        synthetic=args.synthetic,
        heldout_synthetic=args.heldout_synthetic,
        synthetic_chars=tuple(args.synthetic_chars),
        vocab_size=args.vocab_size,
        tokenizer_sample_chars=args.tokenizer_sample_chars,
        limit_packages=args.limit_packages,
        include_stdlib=not args.no_stdlib,
        num_threads=args.threads,
        count_tokens=not args.no_token_count,
    )
    try:
        result = corpus.prepare_corpus(args.out, options)
    except LongLlamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in corpus.iter_summary_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
