"""benchmarks/passkey_curve.py: pass-key records of both kinds added up per mode, length and card; a later run of
the same seeds replaces the earlier one; other models and block settings are left out."""

from __future__ import annotations

import json

from conftest import run_benchmark


def _record(mode, length, seeds, correct, seconds, **extra):
    return dict(benchmark="passkey", model="small", mem_mode=mode, length=length, trials=len(seeds), seeds=seeds,
                accuracy=correct / len(seeds), seconds_per_trial=seconds, device="GPU A", **extra)  # fmt: skip


def test_curve_adds_runs_and_lets_a_rerun_of_the_same_seeds_replace_the_first(tmp_path):
    first = [
        _record("blocks", 1 << 20, [0, 1, 2, 3], 3, 40.0, mem_blocks=64),
        _record("blocks", 1 << 20, [9], 0, 30.0, mem_blocks=16),  # another block setting: left out
        _record("blocks-recent", 1 << 22, [1, 2], 2, 60.0, mem_blocks=64, mem_recent_blocks=16),
        _record("blocks-recent", 1 << 22, [3], 0, 60.0, mem_blocks=64, mem_recent_blocks=32),  # left out
        dict(benchmark="passkey", model="small-no-negatives", length=1 << 20, trials=5, accuracy=0.2),  # another model
        dict(benchmark="passkey", model="small", mem_top_k=128, length=1 << 17, trials=4, accuracy=1.0),
        dict(benchmark="passkey", model="small, mem_layers=[]", length=1 << 17, trials=2, accuracy=0.0),
    ]
    later = [  # seeds 2-5 again and new ones: seeds 0-3 of the first run are replaced
        _record("blocks", 1 << 20, [2, 3, 4, 5], 4, 20.0, mem_blocks=64),
        _record("blocks", 1 << 20, [6, 7], 1, 10.0, mem_blocks=64),
    ]
    cli = {  # a `longllama passkey --out` file: settings and a summary
        "settings": {"seed": 300, "device": "cpu", "mem_top_k": None, "mem_layers": None,
                     "plan": {"mem_retrieval": "blocks", "mem_blocks": 64, "mem_super_size": 64}},
        "summary": {"by_length": [{"length": 1 << 17, "trials": 3, "correct": 2}]},
    }  # fmt: skip
    for name, data in (("a.json", {"records": first}), ("b.json", later), ("c.json", cli)):
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "curve.json"
    result = run_benchmark(
        "passkey_curve.py", *(str(tmp_path / n) for n in ("a.json", "b.json", "c.json")), "--out-json", str(out),
        "--out-png", str(tmp_path / "curve.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    points = {(p["mode"], p["length"], p["device"]): p for p in json.loads(out.read_text())["points"]}
    assert set(points) == {
        ("blocks", 1 << 20, "GPU A"),
        ("knn", 1 << 17, "?"),
        ("no-memory", 1 << 17, "?"),
        ("blocks2", 1 << 17, "cpu"),
        ("blocks-recent", 1 << 22, "GPU A"),
    }
    assert points[("blocks-recent", 1 << 22, "GPU A")]["trials"] == 2
    blocks = points[("blocks", 1 << 20, "GPU A")]
    assert (blocks["trials"], blocks["correct"], blocks["seeds"]) == (6, 5, [2, 3, 4, 5, 6, 7])
    assert abs(blocks["seconds_per_trial"] - (4 * 20.0 + 2 * 10.0) / 6) < 1e-9
    assert points[("blocks2", 1 << 17, "cpu")]["accuracy"] == 2 / 3
    assert (tmp_path / "curve.png").stat().st_size > 10_000
