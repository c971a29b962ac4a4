"""Tests of longllama.checkpoint: folder checks, the four weight layouts, atomic saves and conversions.

Everything runs on tiny random LLaMA models built here; the only file read from outside is the reference
fixture checkpoint (the test using it is skipped when the shared fixtures are not present).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import reference_root
from transformers import LlamaConfig, LlamaForCausalLM

from longllama.checkpoint import (
    check_model_folder,
    convert_to_safetensors,
    llama_to_longllama,
    load_state_dict,
    longllama_to_llama,
    save_state_dict,
)
from longllama.config import ConfigError, LongLlamaConfig
from longllama.errors import CheckpointError

FIXTURE_CASE = (reference_root() or Path("/nonexistent")) / "dropin_llama"
FIXTURE = FIXTURE_CASE / "checkpoint"
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
)


def _tiny_llama(folder: Path, *, seed: int, **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5e5,
        initializer_range=0.2,
        pad_token_id=0,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so a swapped norm tensor would show in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A saved tiny GQA LLaMA (4 query heads, 2 key/value heads) and the model object."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, _tiny_llama(folder, seed=0)


@pytest.fixture(scope="module")
def reference_state(llama) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in llama[1].state_dict().items()}


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name  # conversions copy tensors, no arithmetic


def _copy_config(src: Path, dst: Path, **changes) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, parts: int) -> None:
    names = list(state)
    chunks = [names[i::parts] for i in range(parts)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        shard = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        torch.save({name: state[name] for name in chunk}, folder / shard)
        weight_map.update({name: shard for name in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _make_layout(layout: str, src: Path, state: dict[str, torch.Tensor], folder: Path) -> None:
    _copy_config(src, folder)
    if layout == "safetensors":
        save_state_dict(state, folder)
    elif layout == "safetensors-sharded":
        save_state_dict(state, folder, max_shard_size="20KB")
    elif layout == "safetensors-sharded-by-transformers":
        model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size="20KB")
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        _save_bin_shards(state, folder, parts=3)


LAYOUTS = ["safetensors", "safetensors-sharded", "safetensors-sharded-by-transformers", "bin", "bin-sharded"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_state_dict(layout, llama, reference_state, tmp_path):
    _make_layout(layout, llama[0], reference_state, tmp_path)
    if "sharded" in layout:
        index = "pytorch_model.bin.index.json" if layout.startswith("bin") else "model.safetensors.index.json"
        shards = set(json.loads((tmp_path / index).read_text())["weight_map"].values())
        assert len(shards) > 1
    check_model_folder(tmp_path)
    _assert_same_tensors(load_state_dict(tmp_path), reference_state)


def test_stale_inv_freq_buffers_are_dropped(reference_state, tmp_path):
    stale = dict(reference_state)
    stale["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    stale["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    torch.save(stale, tmp_path / "pytorch_model.bin")
    assert len(torch.load(tmp_path / "pytorch_model.bin", weights_only=True)) == len(reference_state) + 2
    _assert_same_tensors(load_state_dict(tmp_path), reference_state)
    _assert_same_tensors(load_state_dict(tmp_path / "pytorch_model.bin"), reference_state)


def test_save_handles_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"tied_a": base, "tied_b": base, "slice": base[1:], "transposed": base.T}
    save_state_dict(state, tmp_path)
    loaded = load_state_dict(tmp_path)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_resave_removes_shards_that_would_shadow_the_new_weights(reference_state, tmp_path):
    save_state_dict(reference_state, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    smaller = {name: t * 2 for name, t in reference_state.items()}
    written = save_state_dict(smaller, tmp_path)
    assert [p.name for p in written] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    _assert_same_tensors(load_state_dict(tmp_path), smaller)


def _failing_writer(fail_at_call: int) -> Callable:
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def writer(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] < fail_at_call:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\x00" * 100)  # half-written output, then the "disk" fails
        raise OSError("simulated disk full")

    return writer


@pytest.mark.parametrize("shard_size,fail_at", [("5GB", 1), ("20KB", 2)])
def test_failed_save_leaves_no_partial_file(reference_state, tmp_path, monkeypatch, shard_size, fail_at):
    old = {"x": torch.ones(3)}
    save_state_dict(old, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(fail_at))
    with pytest.raises(OSError, match="simulated disk full"):
        save_state_dict(reference_state, tmp_path, max_shard_size=shard_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_failed_conversion_leaves_no_destination(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(1))
    dst = tmp_path / "out" / "converted"
    with pytest.raises(OSError, match="simulated disk full"):
        llama_to_longllama(llama[0], dst, mem_layers=[1])
    assert not dst.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_conversion_refuses_a_non_empty_destination(llama, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_to_safetensors(llama[0], dst)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------------------
# The reference fixture


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared reference fixtures are not present")
def test_reference_fixture_converts_to_safetensors(tmp_path):
    dst = tmp_path / "safe"
    check_model_folder(FIXTURE)
    convert_to_safetensors(FIXTURE, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((dst / "config.json").read_text()) == json.loads((FIXTURE / "config.json").read_text())
    original = torch.load(FIXTURE / "pytorch_model.bin", weights_only=True, map_location="cpu")
    _assert_same_tensors(load_state_dict(dst), original)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared reference fixtures are not present")
def test_reference_fixture_becomes_a_llama_with_the_reference_logits(tmp_path):
    """The dropin case (mem_layers=[]) pins down logits that plain LLaMA reproduces window by window
    (docs/inference.md#relation-to-llama)."""
    dst = tmp_path / "llama"
    longllama_to_llama(FIXTURE, dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not {"mem_layers", "last_context_length", "auto_map"} & set(config)
    model = LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    data = np.load(FIXTURE_CASE / "tensors.npz")
    ids = torch.from_numpy(data["input_ids"])
    # 59 tokens > last_context_length 24: the reference ran [0, 35) and [35, 59) as separate windows.
    split = ids.shape[1] - json.loads((FIXTURE / "config.json").read_text())["last_context_length"]
    with torch.no_grad():
        logits = torch.cat([model(ids[:, :split]).logits, model(ids[:, split:]).logits], dim=1)
    torch.testing.assert_close(logits, torch.from_numpy(data["logits"]), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# LLaMA <-> LongLLaMA


@pytest.fixture(scope="module")
def round_trip(llama, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("round_trip")
    llama_to_longllama(llama[0], root / "long", mem_layers=[1])
    longllama_to_llama(root / "long", root / "back")
    return root / "long", root / "back"


def test_llama_to_longllama_config(llama, round_trip):
    raw = json.loads((round_trip[0] / "config.json").read_text())
    assert raw["model_type"] == "longllama"
    assert raw["architectures"] == ["LongLlamaForCausalLM"]
    assert (raw["mem_layers"], raw["last_context_length"], raw["mem_dtype"]) == ([1], 32, "bfloat16")
    assert raw["num_key_value_heads"] == 2 and raw["head_dim"] == 16 and raw["rope_theta"] == 5e5
    assert "rope_parameters" not in raw and "attention_bias" not in raw
    source = llama[1].config
    config = LongLlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    for name in LLAMA_FIELDS[:-1]:
        mine = "context_window" if name == "max_position_embeddings" else name  # LLaMA's context is the window
        assert getattr(config, mine) == getattr(source, name), name
    assert config.max_position_embeddings > config.context_window  # the memory's usable context is advertised


def test_round_trip_keeps_tensors_bitwise_and_llama_fields(llama, reference_state, round_trip):
    for folder in round_trip:
        check_model_folder(folder)
        _assert_same_tensors(load_state_dict(folder), reference_state)
    back = LlamaConfig.from_pretrained(round_trip[1])
    for name in LLAMA_FIELDS:
        assert getattr(back, name) == getattr(llama[1].config, name), name
    assert back.architectures == ["LlamaForCausalLM"]


def test_converted_llama_gives_the_original_logits(llama, round_trip):
    reloaded = LlamaForCausalLM.from_pretrained(round_trip[1], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 77, 3, 99, 12, 40, 8, 127, 64]])
    with torch.no_grad():
        want = llama[1](ids).logits
        got = reloaded(ids).logits
    assert want.abs().max() > 0.1  # the comparison below is not trivially about zeros
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same weights back, the same LLaMA code


def test_tied_embeddings_survive_the_round_trip(tmp_path):
    model = _tiny_llama(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    llama_to_longllama(
        tmp_path / "tied", tmp_path / "long", mem_layers=[0, 1], last_context_length=5, mem_dtype="float32"
    )
    raw = json.loads((tmp_path / "long" / "config.json").read_text())
    assert (raw["tie_word_embeddings"], raw["last_context_length"], raw["mem_dtype"]) == (True, 5, "float32")
    longllama_to_llama(tmp_path / "long", tmp_path / "back")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)  # as above, tied


@pytest.mark.parametrize(
    "changes,error,match",
    [
        ({"model_type": "mistral"}, ConfigError, "model_type"),
        ({"attention_bias": True}, ConfigError, "attention_bias"),
        ({"mlp_bias": True}, ConfigError, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, ConfigError, "linear"),
        (
            {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            ConfigError,
            "dynamic",
        ),
        ({"num_key_value_heads": 4}, CheckpointError, "k_proj"),
    ],
)
def test_llama_to_longllama_rejects(llama, tmp_path, changes, error, match):
    src = tmp_path / "src"
    shutil.copytree(llama[0], src)
    _copy_config(llama[0], src, **changes)
    with pytest.raises(error, match=match):
        llama_to_longllama(src, tmp_path / "dst", mem_layers=[])
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "edit,match", [("add bias", "q_proj.bias is not a LLaMA tensor"), ("drop norm", "model.norm.weight is missing")]
)
def test_conversion_rejects_weights_that_do_not_match_the_config(llama, reference_state, tmp_path, edit, match):
    src = tmp_path / "src"
    _copy_config(llama[0], src)
    state = dict(reference_state)
    if edit == "add bias":
        state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    else:
        del state["model.norm.weight"]
    save_state_dict(state, src)
    with pytest.raises(CheckpointError, match=match):
        llama_to_longllama(src, tmp_path / "dst", mem_layers=[])


@pytest.mark.parametrize("mem_layers", [[2], [-1], [0, 0]])
def test_llama_to_longllama_rejects_bad_mem_layers(llama, tmp_path, mem_layers):
    with pytest.raises(ConfigError, match="mem_layers"):
        llama_to_longllama(llama[0], tmp_path / "dst", mem_layers=mem_layers)


def test_longllama_to_llama_rejects_a_llama_folder(llama, tmp_path):
    with pytest.raises(ConfigError, match="longllama"):
        longllama_to_llama(llama[0], tmp_path / "dst")


# ------------------------------------------------------------------------------------------------------------
# check_model_folder errors


def _truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(keep)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _first_shard(folder: Path, index: str) -> Path:
    return folder / sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))[0]


def _legacy_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)


def _bin(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def _truncated_bin(folder: Path, state: dict[str, torch.Tensor]) -> None:
    path = _bin(folder, state)
    _truncate(path, path.stat().st_size // 2)


def _bin_missing_a_middle_chunk(folder: Path, state: dict[str, torch.Tensor]) -> None:
    path = _bin(folder, state)
    data = path.read_bytes()
    # The zip directory at the end survives, but its offsets no longer match the file.
    path.write_bytes(data[: len(data) // 2] + data[len(data) // 2 + 20_000 :])


def _bin_with_corrupt_pickle(folder: Path, state: dict[str, torch.Tensor]) -> None:
    path = _bin(folder, state)
    with zipfile.ZipFile(path) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    start = entry.header_offset + 30 + len(entry.filename) + len(entry.extra)
    data = bytearray(path.read_bytes())
    data[start + 40] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_header_shape(folder: Path, state: dict[str, torch.Tensor]) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["model.norm.weight"]["shape"] = [65]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    path.write_bytes(data[:8] + text.ljust(size) + data[8 + size :])


def _bin_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    (folder / "model.safetensors").unlink()
    _save_bin_shards(state, folder, parts=2)


def _safe_shards(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_state_dict(state, folder, max_shard_size="20KB")


def _misplaced_tensor(folder: Path, state: dict[str, torch.Tensor]) -> None:
    _safe_shards(folder, state)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = (
        shards[0] if index["weight_map"]["model.norm.weight"] != shards[0] else shards[1]
    )
    index_path.write_text(json.dumps(index))


BREAKERS: dict[str, tuple[Callable[[Path, dict], object], str]] = {
    "missing config": (lambda f, s: (f / "config.json").unlink(), "config"),
    "config not JSON": (lambda f, s: (f / "config.json").write_text('{"vocab_size": 12,'), "not valid JSON"),
    "config not an object": (lambda f, s: (f / "config.json").write_text("[1, 2]"), "JSON object"),
    "no weights": (lambda f, s: (f / "model.safetensors").unlink(), "no weights"),
    "missing safetensors shard": (
        lambda f, s: (_safe_shards(f, s), _first_shard(f, "model.safetensors.index.json").unlink()),
        "missing",
    ),
    "missing bin shard": (
        lambda f, s: (_bin_shards(f, s), _first_shard(f, "pytorch_model.bin.index.json").unlink()),
        "missing",
    ),
    "index without weight_map": (
        lambda f, s: (_safe_shards(f, s), (f / "model.safetensors.index.json").write_text("{}")),
        "weight_map",
    ),
    "index names a tensor its shard lacks": (_misplaced_tensor, "does not hold"),
    "safetensors truncated in the data": (
        lambda f, s: _truncate(f / "model.safetensors", (f / "model.safetensors").stat().st_size - 10),
        "truncated",
    ),
    "safetensors truncated in the header": (lambda f, s: _truncate(f / "model.safetensors", 40), "header"),
    "safetensors shorter than 8 bytes": (lambda f, s: _truncate(f / "model.safetensors", 5), "truncated"),
    "safetensors header not JSON": (lambda f, s: _overwrite(f / "model.safetensors", 8, b"#!%"), "corrupt header"),
    "safetensors header length absurd": (
        lambda f, s: _overwrite(f / "model.safetensors", 0, (2**40).to_bytes(8, "little")),
        "header",
    ),
    "safetensors header shape disagrees with offsets": (_wrong_header_shape, "does not match"),
    "bin truncated": (_truncated_bin, "truncated"),
    "bin missing a middle chunk": (_bin_missing_a_middle_chunk, "corrupt zip"),
    "bin with a corrupt pickle entry": (_bin_with_corrupt_pickle, "CRC"),
    "bin not a checkpoint": (lambda f, s: _bin(f, s).write_bytes(b"hello world"), "not a torch checkpoint"),
    "legacy bin": (_legacy_bin, "legacy"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_check_model_folder_rejects_broken_folders(case, llama, reference_state, tmp_path):
    folder = tmp_path / "model"
    _copy_config(llama[0], folder)
    save_state_dict(reference_state, folder)
    check_model_folder(folder)  # intact before the damage
    breaker, match = BREAKERS[case]
    breaker(folder, reference_state)
    with pytest.raises(CheckpointError, match=match) as info:
        check_model_folder(folder)
    message = str(info.value)
    assert "\n" not in message and ":" in message
    if case != "legacy bin" and "config" not in case:
        with pytest.raises(CheckpointError):
            load_state_dict(folder)


def test_legacy_bin_still_loads_and_converts(llama, reference_state, tmp_path):
    folder = tmp_path / "legacy"
    _copy_config(llama[0], folder)
    torch.save(reference_state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same_tensors(load_state_dict(folder), reference_state)
    convert_to_safetensors(folder, tmp_path / "safe")
    check_model_folder(tmp_path / "safe")
    _assert_same_tensors(load_state_dict(tmp_path / "safe"), reference_state)


@pytest.mark.parametrize("case", ["missing", "a file"])
def test_check_model_folder_rejects_a_bad_path(tmp_path, case):
    path = tmp_path / "nothing-here"
    if case == "a file":
        path.write_text("x")
    with pytest.raises(CheckpointError, match="does not exist" if case == "missing" else "not a folder") as info:
        check_model_folder(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# The LongLLaMA model on a converted folder (passes once longllama.hf exists)


def test_longllama_model_on_converted_folder_matches_llama(llama, round_trip):
    pytest.importorskip("longllama.hf")
    import longllama

    model = longllama.LongLlamaForCausalLM.from_pretrained(round_trip[0], mem_layers=[], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 4, 99, 23, 5, 60, 2]])  # 8 tokens, below last_context_length = 32
    with torch.no_grad():
        want = llama[1](ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_meta_build_skips_only_its_own_threads_initialisation():
    """load_pretrained builds the model on the meta device with torch.nn.init's fills skipped; a model initialised
    in another thread meanwhile still gets its random weights, and the fills are torch's own again afterwards."""
    import threading

    from longllama import checkpoint

    originals = {name: getattr(torch.nn.init, name) for name in checkpoint._INIT_FUNCTIONS}
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def build():
        with checkpoint._initialisation_skipped():
            seen["here"] = torch.nn.init.normal_(torch.zeros(64)).abs().sum().item()
            inside.set()
            done.wait(timeout=30)

    builder = threading.Thread(target=build)
    builder.start()
    assert inside.wait(timeout=30)
    other = torch.nn.init.normal_(torch.zeros(64))  # this thread, while the build is under way
    done.set()
    builder.join()
    assert seen["here"] == 0  # skipped in the building thread
    assert other.abs().sum() > 0  # filled in this one
    assert {name: getattr(torch.nn.init, name) for name in checkpoint._INIT_FUNCTIONS} == originals
