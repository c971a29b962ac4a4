"""Evaluation tasks, one module per task: `passkey` (pass key retrieval from long filler text), `kv` (one key's value
among several key-value lines in the same filler), `perplexity` (perplexity against context length), and the suites
behind `longllama eval TASK`, listed in EVAL_TASKS."""

# `longllama eval` subcommands and the modules that define them. Each module has `add_parser(tasks, common)`, which
# adds its subparser (with `common(parser)` for the options every evaluation shares) and sets `func`.
EVAL_TASKS = {
    "lm-eval": "longllama.evals.harness",
    "humaneval": "longllama.evals.humaneval",
    "icl": "longllama.evals.icl",
    "ruler": "longllama.evals.ruler",
}
