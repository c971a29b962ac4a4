"""What a fresh process pays before its first token: the cache directory the compilers are pointed at (only where
the user set nothing), weights loaded straight to the device (equal to transformers' loading), the event log and
`--verbose` report, and benchmarks/cold_start.py's records parsed from that report."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from longllama import LongLlamaForCausalLM, caches, timings
from longllama.checkpoint import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "longllama" / "models" / "small"


@pytest.fixture
def restored_env():
    """os.environ as it was before the test (caches.configure writes into it directly)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def clean_env(monkeypatch, restored_env):
    for name in (caches.ENV, "XDG_CACHE_HOME", *caches.settings()):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_cache_directory_follows_longllama_cache_then_xdg_then_home(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    assert caches.directory() == tmp_path / "home" / ".cache" / "longllama"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caches.directory() == tmp_path / "xdg" / "longllama"
    clean_env.setenv(caches.ENV, str(tmp_path / "mine"))
    assert caches.directory() == tmp_path / "mine"


def test_the_compilers_cache_variables_are_set_only_where_unset(clean_env, tmp_path):
    clean_env.setenv(caches.ENV, str(tmp_path / "c"))
    clean_env.setenv("TRITON_CACHE_DIR", "/somewhere/else")  # the user's own choice wins
    changed = caches.configure()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else" and "TRITON_CACHE_DIR" not in changed
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path / "c" / "flash-attn4")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert caches.configure() == {}  # idempotent
    # Inductor's own default, written into the variable when some package asked for the folder, counts as unset
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    clean_env.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    assert caches.configure() == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c" / "inductor")}
    # Inductor reads its folder when it compiles (torch 2.11+), so setting it before the first compile is in time.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "c" / "inductor")


def test_weights_go_straight_to_the_device_and_equal_transformers_loading(monkeypatch):
    import safetensors.torch

    assigned = []
    original = torch.nn.Module.load_state_dict

    def spy(self, state_dict, strict=True, assign=False):
        assigned.append(assign)
        return original(self, state_dict, strict=strict, assign=assign)

    reference = LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy)
    monkeypatch.setattr(safetensors.torch, "load_file", None)  # no whole file read into a CPU dict
    model = load_pretrained(LongLlamaForCausalLM, SHIPPED, dtype=torch.float32, device="cpu")
    assert assigned == [True]  # the meta-device model took the read tensors as its parameters, no copy into others
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == torch.float32 for k in ours)
    assert model.config.to_dict() == reference.config.to_dict()
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert not model.training and model.plan.device == "cpu"
    # "auto": the checkpoint's dtype (bf16), as from_pretrained reads it
    auto = load_pretrained(LongLlamaForCausalLM, SHIPPED, dtype="auto", device="cpu")
    assert auto.dtype == LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype="auto").dtype == torch.bfloat16


def test_the_event_log_is_read_only_and_reports_each_kind():
    mark = timings.mark()
    timings.record("compile", "torch.compile rms_norm", 1.25, "built")
    with timings.timed("load", "weights", "safetensors") as info:
        info["source"] = "safetensors straight to cpu"
    got = timings.since(mark)
    assert [(e.kind, e.name, e.source) for e in got] == [
        ("compile", "torch.compile rms_norm", "built"),
        ("load", "weights", "safetensors straight to cpu"),
    ]
    assert isinstance(timings.events(), tuple)  # a copy: nothing a caller does changes the log
    with pytest.raises(ValueError, match="event kind"):
        timings.record("nap", "x", 1.0)
    text = timings.report(got)
    assert "torch.compile rms_norm  [built]" in text and "total compile: 1 in 1.250 s" in text


def test_the_event_log_is_bounded(monkeypatch):
    monkeypatch.setattr(timings, "_MAX_EVENTS", timings.mark() + 2)
    mark = timings.mark()
    for i in range(5):  # a server capturing a graph at every flush
        timings.record("capture", f"decoding step {i}", 0.01)
    assert [e.name for e in timings.since(mark)] == ["decoding step 0", "decoding step 1"]


def _cold_start_module():
    spec = importlib.util.spec_from_file_location("cold_start", ROOT / "benchmarks" / "cold_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_verbose_reports_the_load_and_first_token_and_cold_start_parses_it(
    capsys, monkeypatch, tmp_path, restored_env
):
    from longllama import cli

    monkeypatch.setenv(caches.ENV, str(tmp_path / "cache"))
    status = cli.main(["generate", "--prompt", "Once upon", "--max-new-tokens", "2", "--device", "cpu", "--verbose"])
    assert status == 0
    err = capsys.readouterr().err
    assert "timings (seconds since the process started" in err
    cold = _cold_start_module()
    events = cold.parse_report(err)
    kinds = [e["kind"] for e in events]
    assert "load" in kinds and "token" in kinds
    assert any(e["kind"] == "load" and e["source"] == "safetensors straight to cpu" for e in events)
    # what came before the weights, in three parts: the interpreter and arguments, the libraries, then the tokenizer
    # and prompt
    setup = {e["name"]: e for e in events if e["kind"] == "setup"}
    start, libraries = setup["interpreter and arguments"], setup["libraries (torch, transformers)"]
    prompt = setup["tokenizer and prompt"]
    assert start["seconds"] > 0 and abs(start["seconds"] - start["at"]) < 0.01  # measured from the process start
    assert libraries["at"] >= start["at"] + libraries["seconds"] - 0.01
    assert prompt["at"] >= libraries["at"] + prompt["seconds"] - 0.01
    summary = cold.summarize(events)
    assert summary["load_s"] > 0 and summary["first_token_s"] is not None and summary["first_token_s"] > 0
    assert summary["first_token_at_s"] >= summary["first_token_s"]  # the load is taken out


def test_cold_start_records_have_the_results_format(tmp_path):
    cold = _cold_start_module()
    report = "\n".join(
        [
            "longllama: timings (seconds since the process started; kind; seconds; what)",
            "    3.000  load        1.500 s  weights of model  [safetensors straight to cuda]",
            "    4.100  compile     0.900 s  torch.compile rms_norm  [inductor cache]",
            "    4.200  config      0.000 s  gemv N=9600 K=3200 M=1 NORM=True  [rule]",
            "    5.000  token       0.000 s  first new token",
            "total load: 1 in 1.500 s",
        ]
    )
    events = cold.parse_report("noise before\n" + report)
    assert [e["kind"] for e in events] == ["load", "compile", "config", "token"]
    summary = cold.summarize(events)
    assert summary["first_token_s"] == pytest.approx(3.5) and summary["load_s"] == pytest.approx(1.5)
    assert summary["sources"] == {"compile: inductor cache": 1, "config: rule": 1}
    body = {"device": "cpu", "date": "2026-01-01", "records": [dict(benchmark="cold_start", **summary)]}
    cold.write_atomically(tmp_path / "out.json", body)
    assert json.loads((tmp_path / "out.json").read_text()) == body


def test_sharded_weights_load_straight_too(tmp_path):
    model = LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype="auto")
    model.save_pretrained(tmp_path, max_shard_size="5MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = load_pretrained(LongLlamaForCausalLM, tmp_path, dtype="auto", device="cpu")
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_other_layouts_are_left_to_from_pretrained(tmp_path):
    import shutil

    shutil.copy(SHIPPED / "config.json", tmp_path / "config.json")
    model = LongLlamaForCausalLM.from_pretrained(SHIPPED, dtype="auto")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert load_pretrained(LongLlamaForCausalLM, tmp_path, dtype="auto", device="cpu") is None
