"""Write the synthetic in-context classification set (`longllama.evals.icl.synthetic_examples`) as train/test .jsonl.

Each text is four filler words and one keyword; each class owns a few keywords, and the class names are drawn at
random per task, unrelated to the keywords, so a model can only learn the mapping from the demonstrations.
Usage: python scripts/icl_synthetic.py OUT_DIR [--train N] [--test N] [--classes C] [--task-seed S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longllama.evals.icl import synthetic_examples
from longllama.evals.records import replace_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="test examples (default 200)")
    parser.add_argument("--classes", type=int, default=4, help="number of labels (default 4)")
    parser.add_argument("--task-seed", type=int, default=1234, help="which keywords and names make the task")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # Different draw seeds for the two files, the same task.
    for name, count, seed in (("train", args.train, 1), ("test", args.test, 2)):
        rows = synthetic_examples(count, seed=seed, classes=args.classes, task_seed=args.task_seed)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path = replace_atomically(args.out_dir / f"icl-synthetic-{name}.jsonl", lambda tmp, t=text: tmp.write_text(t))
        print(f"wrote {path} ({count} examples)")


if __name__ == "__main__":
    main()
