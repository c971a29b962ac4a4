"""lm-evaluation-harness on LongLLaMA: the harness's own `HFLM` over this package's model object and tokenizer.

The harness reads the longest input a model takes from `config.max_position_embeddings`, which here is the usable
context (docs/checkpoints.md#window-and-usable-context), so documents reach the model whole and its memory is used;
`--max-length` cuts them shorter on purpose. `longllama eval lm-eval --tasks ...` runs any harness task (its own, or
YAML files in `--include-path`). For Python users, `register()` adds the model name `longllama` to the harness
(`lm_eval.simple_evaluate(model="longllama", model_args="pretrained=DIR")`); the harness's own command finds models
only in its registry (it has no plugin entry points), so `lm_eval --model longllama` is not available.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from longllama.errors import InputError

if TYPE_CHECKING:
    from longllama.cli import LoadOptions

MODEL_NAME = "longllama"


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise InputError(f"lm-eval is not installed ({exc}): pip install 'longllama[eval]'") from None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return simple_evaluate, HFLM, TaskManager


def harness_model(model, tokenizer, *, batch_size: int = 1, max_length: int | None = None):
    """The harness's HFLM over a loaded LongLlamaForCausalLM (max_length: the model's usable context by default)."""
    _, HFLM, _ = _harness()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate(
    lm,
    tasks: list[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run harness `tasks` on `lm` (harness_model); returns the harness's result dict, JSON-safe."""
    simple_evaluate, _, TaskManager = _harness()
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or pass --include-path DIR "
            "with their YAML files"
        )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=log_samples,
        task_manager=manager,
    )
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def add_parser(tasks, common) -> None:
    p = tasks.add_parser("lm-eval", help="lm-evaluation-harness tasks, documents read whole", description=__doc__)
    common(p)
    p.add_argument("--tasks", required=True, type=_names, metavar="A,B", help="harness task names")
    p.add_argument("--include-path", metavar="DIR", help="a folder of task YAML files (tasks over local data)")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="demonstrations per question (the task's default)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="requests per model call (default 1)")
    p.add_argument("--max-length", type=int, metavar="N", help="cut inputs to N tokens (default: the usable context)")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the --out record")
    p.set_defaults(func=run)


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no task: pass e.g. --tasks hellaswag,arc_easy")
    return names


def run(
    *,
    model: str | None,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    log_samples: bool = False,
    out: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    load: LoadOptions | None = None,
) -> int:
    """`longllama eval lm-eval`: harness tasks on a checkpoint; prints the harness's table, --out keeps the record."""
    from longllama.cli import eval_model, output_file
    from longllama.evals import records

    _harness()  # a missing package fails before the model loads
    out_path = output_file(out)
    folder, lm, tokenizer = eval_model(model, load, transformers_model=True)  # HFLM takes a PreTrainedModel
    harness = harness_model(lm, tokenizer, batch_size=batch_size, max_length=max_length)
    results = evaluate(
        harness,
        tasks,
        include_path=include_path,
        num_fewshot=num_fewshot,
        limit=limit,
        seed=seed,
        log_samples=log_samples,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    if out_path is not None:
        settings = {
            **records.model_settings(folder, lm, load),
            "tasks": tasks,
            "include_path": include_path,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "max_length": harness.max_length,
            "limit": limit,
            "seed": seed,
        }
        samples = [dict(s, task=name) for name, rows in (results.get("samples") or {}).items() for s in rows]
        path = records.save_results(out_path, samples, results["results"], settings=settings)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def register() -> None:
    """Add the harness model name `longllama` (`pretrained=DIR` loads a checkpoint with this package's loader,
    `dtype` and `device` as on the command line); calling it again changes nothing."""
    _, HFLM, _ = _harness()
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME in model_registry:
        return

    @register_model(MODEL_NAME)
    class LongLlamaLM(HFLM):
        def __init__(self, pretrained, dtype: str = "auto", device: str = "auto", **kwargs):
            if isinstance(pretrained, str):
                from longllama.cli import LoadOptions, eval_model

                _, pretrained, tokenizer = eval_model(
                    pretrained, LoadOptions(dtype=dtype, device=device), transformers_model=True
                )
                kwargs.setdefault("tokenizer", tokenizer)
            super().__init__(pretrained=pretrained, **kwargs)
