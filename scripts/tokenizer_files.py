"""Regenerate (or check) the transformers tokenizer files of model folders from their `tokenizer.model`.

    python scripts/tokenizer_files.py                 # every shipped folder (src/longllama/models/*/)
    python scripts/tokenizer_files.py DIR [DIR ...]   # these folders
    python scripts/tokenizer_files.py --check [DIR]   # exit 1 if a folder's files differ from a fresh build

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json next to tokenizer.model (see
longllama.tokenizer: tokenizer.model stays the source of truth; config.json supplies the pad token and context).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longllama.tokenizer import TOKENIZER_FILE, tokenizer_files, write_tokenizer_files

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "longllama" / "models"


def stale_files(folder: Path) -> list[str]:
    """Names of the tokenizer files in `folder` that are missing or differ from a fresh build."""
    fresh = tokenizer_files(folder)
    return [
        name
        for name, text in fresh.items()
        if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="model folders (default: the shipped ones)")
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    folders = args.folders or sorted(path.parent for path in SHIPPED.glob(f"*/{TOKENIZER_FILE}"))
    stale_any = False
    for folder in folders:
        if args.check:
            stale = stale_files(folder)
            stale_any |= bool(stale)
            print(f"{folder}: {'stale ' + ', '.join(stale) if stale else 'up to date'}")
        else:
            for path in write_tokenizer_files(folder):
                print(f"wrote {path}")
    return 1 if stale_any else 0


if __name__ == "__main__":
    sys.exit(main())
