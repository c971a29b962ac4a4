"""benchmarks/bench_train_fsdp.py on the CPU (gloo), tiny shape: one process, then two through torchrun with the
first run as --baseline; the JSON records and the one-line argument errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_train_fsdp.py"
ARGS = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu"]
FIELDS = {
    "benchmark",
    "impl",
    "shape",
    "gpus",
    "tokens",
    "seconds",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "mfu",
    "peak_gib",
    "device",
    "date",
}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available()
    or importlib.util.find_spec("torch.distributed.run") is None,
    reason="needs torch.distributed with gloo and torchrun",
)


def launch(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    """The script as one process, or as `procs` processes through torch's own launcher on a free port."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, *launcher, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
        check=False,
    )


def record(path: Path) -> dict:
    records = json.loads(path.read_text())
    assert isinstance(records, list) and len(records) == 1
    assert FIELDS <= records[0].keys()
    return records[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "one.json"
    done = launch(*ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout and "MFU n/a" in done.stdout
    return out


def test_one_process(baseline):
    r = record(baseline)
    assert (r["benchmark"], r["impl"], r["shape"], r["gpus"], r["device"]) == (
        "train",
        "longllama-fot-fsdp2",
        "tiny",
        1,
        "cpu",
    )
    assert r["tokens"] == 8 * 64 and r["tokens_per_s"] == r["tokens_per_s_per_gpu"] > 0
    assert r["mfu"] is None and r["peak_gib"] is None and "scaling_efficiency" not in r


def test_two_processes_with_baseline(baseline, tmp_path):
    out = tmp_path / "two.json"
    done = launch(*ARGS, "--baseline", str(baseline), "--out", str(out), procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scaling efficiency" in done.stdout
    r, base = record(out), record(baseline)
    assert r["gpus"] == 2 and r["tokens"] == 2 * 8 * 64
    assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], rel=1e-3)
    assert r["loss"] == pytest.approx(base["loss"], abs=0.1)  # same weights, other rows: the same ~log(vocab)


def test_bad_arguments_are_one_line_errors(baseline, tmp_path, capsys, monkeypatch):
    # The first through a process of its own (the exit status a shell sees), the others in this one: the script
    # checks its arguments before it starts anything.
    done = launch(*ARGS, "--batch", "6")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("bench_train_fsdp: error:")
    assert "multiple of 4" in done.stderr
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its neighbours, as when run
    spec = importlib.util.spec_from_file_location("bench_train_fsdp", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**record(baseline), "seq": 32}]))
    for args, hint in [
        (["--baseline", str(other)], "seq"),
        (["--baseline", str(tmp_path / "missing.json")], "No such file"),
    ]:
        with pytest.raises(SystemExit) as info:
            script.parse_args([*ARGS, *args])
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == "", args
        assert err.strip().splitlines()[-1].startswith("bench_train_fsdp: error:") and hint in err
