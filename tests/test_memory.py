"""MemoryCache: append / reserve / views, amortised growth, copy-on-write forks, clear, index_select, atomic files,
and a model reading 4k-32k tokens whose memory is allocated once and grows exactly linearly.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

import longllama.memory as memory_module
from longllama import LongLlamaForCausalLM, MemoryCache
from longllama.config import LongLlamaConfig
from longllama.errors import CheckpointError, InputError

B, H, D = 2, 3, 4


def chunk(n: int, seed: int, *, valid: bool | None = None):
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, n, D, generator=gen), torch.randn(B, H, n, D, generator=gen)
    mask = torch.rand(B, n, generator=gen) > 0.2 if valid is None else torch.full((B, n), valid)
    return k, v, mask


def filled(n: int, seed: int = 0, dtype=torch.float32) -> tuple[MemoryCache, tuple]:
    mem = MemoryCache(B, H, D, dtype=dtype)
    data = chunk(n, seed)
    mem.append(*data)
    return mem, data


def assert_holds(mem: MemoryCache, k, v, valid) -> None:
    """Bitwise: the memory stores copies (cast once to its dtype), no arithmetic."""
    assert mem.length == k.shape[2]
    assert torch.equal(mem.keys, k.to(mem.dtype)) and torch.equal(mem.values, v.to(mem.dtype))
    assert torch.equal(mem.valid, valid)


# -- append / reserve / views ----------------------------------------------------------------------------------------
def test_append_and_views():
    mem = MemoryCache(B, H, D, dtype=torch.float32)
    assert mem.length == 0 and mem.keys.shape == (B, H, 0, D) and mem.valid.shape == (B, 0)
    parts = [chunk(n, seed) for seed, n in enumerate([3, 1, 7, 300])]
    for part in parts:
        mem.append(*part)
    k, v, valid = (torch.cat([p[i] for p in parts], dim=2 if i < 2 else 1) for i in range(3))
    assert_holds(mem, k, v, valid)
    assert mem.capacity >= mem.length
    assert not mem.all_valid() and mem.valid.dtype == torch.bool
    # the properties are views of one capacity-sized buffer, not copies
    assert mem.keys.data_ptr() == mem.keys.data_ptr()
    assert mem.keys.untyped_storage().nbytes() == B * H * mem.capacity * D * 4
    with pytest.raises(InputError):
        mem.append(torch.zeros(B, H + 1, 1, D), torch.zeros(B, H + 1, 1, D), torch.ones(B, 1, dtype=torch.bool))
    with pytest.raises(InputError):
        mem.append(torch.zeros(B, H, 2, D), torch.zeros(B, H, 1, D), torch.ones(B, 2, dtype=torch.bool))
    assert mem.length == 311


def test_append_casts_to_the_memory_dtype():
    mem, (k, v, valid) = filled(10, dtype=torch.bfloat16)
    assert mem.keys.dtype == mem.values.dtype == torch.bfloat16
    assert_holds(mem, k, v, valid)


def test_reserve_makes_capacity_exact_and_appends_free():
    mem = MemoryCache(B, H, D, dtype=torch.float32)
    mem.reserve(1000)
    assert mem.capacity == 1000 and mem.copies == 1
    ptr = mem.keys.untyped_storage().data_ptr()
    parts = [chunk(n, 10 + i) for i, n in enumerate([1, 499, 250, 250])]
    for part in parts:
        mem.append(*part)
    assert mem.length == mem.capacity == 1000 and mem.copies == 1
    assert mem.keys.untyped_storage().data_ptr() == ptr
    assert mem.nbytes() == B * H * 1000 * D * 4 * 2 + B * 1000
    mem.reserve(10)  # smaller than what it holds: no-op
    assert mem.capacity == 1000 and mem.copies == 1
    k, v, valid = (torch.cat([p[i] for p in parts], dim=2 if i < 2 else 1) for i in range(3))
    assert_holds(mem, k, v, valid)
    mem.reserve(1500)  # growth keeps the contents
    assert mem.capacity == 1500 and mem.copies == 2
    assert_holds(mem, k, v, valid)


@pytest.mark.parametrize("n", [1000, 5000])
def test_amortised_growth(n):
    """n one-token appends re-allocate O(log n) times."""
    mem = MemoryCache(1, 1, 2, dtype=torch.float32)
    for i in range(n):
        mem.append(
            torch.full((1, 1, 1, 2), float(i)), torch.full((1, 1, 1, 2), -float(i)), torch.ones(1, 1, dtype=torch.bool)
        )
    assert mem.length == n
    assert mem.copies <= math.ceil(math.log2(n)) + 1
    assert mem.copies <= math.ceil(math.log2(n / 256)) + 1  # doubling from the 256-entry minimum
    assert mem.capacity < 2 * n + 256
    assert torch.equal(mem.keys[0, 0, :, 0], torch.arange(n, dtype=torch.float32))
    assert torch.equal(mem.values[0, 0, :, 1], -torch.arange(n, dtype=torch.float32))


# -- fork (copy on write) ------------------------------------------------------------------------------------------
def test_fork_copy_on_write():
    """Two forks appending different data do not see each other's entries; the original is unchanged, and its own
    later append does not show in the forks."""
    mem, (k, v, valid) = filled(10)
    assert mem.capacity > 12  # room to append in place: the forks share the buffer
    a, b = mem.fork(), mem.fork()
    ka, kb, kc = chunk(2, 1), chunk(2, 2), chunk(2, 3)
    a.append(*ka)
    b.append(*kb)
    cat = lambda base, extra: tuple(torch.cat([x, y], dim=2 if x.dim() == 4 else 1) for x, y in zip(base, extra))
    assert_holds(a, *cat((k, v, valid), ka))
    assert_holds(b, *cat((k, v, valid), kb))
    assert_holds(mem, k, v, valid)
    mem.append(*kc)
    assert_holds(mem, *cat((k, v, valid), kc))
    assert_holds(a, *cat((k, v, valid), ka))
    assert_holds(b, *cat((k, v, valid), kb))
    # a fork of a fork, and forks that keep growing past the capacity
    c = a.fork()
    for seed in range(40):
        c.append(*chunk(20, 100 + seed))
        b.append(*chunk(20, 200 + seed))
    assert_holds(a, *cat((k, v, valid), ka))
    assert c.length == b.length == 812
    assert torch.equal(c.keys[:, :, :12], a.keys) and not torch.equal(c.keys[:, :, 12:], b.keys[:, :, 12:])


def test_fork_is_cheap():
    mem, _ = filled(300)
    twin = mem.fork()
    assert twin.keys.data_ptr() == mem.keys.data_ptr() and twin.copies == 0


# -- clear / index_select ------------------------------------------------------------------------------------------
def test_clear():
    mem, (k, v, valid) = filled(300)
    twin = mem.fork()
    mem.clear()
    assert mem.length == 0 and mem.keys.shape == (B, H, 0, D) and mem.valid.shape == (B, 0)
    assert mem.nbytes() == 0
    assert_holds(twin, k, v, valid)  # a fork still reads the old entries
    part = chunk(5, 9)
    mem.append(*part)
    assert_holds(mem, *part)
    assert_holds(twin, k, v, valid)


def test_clear_releases_the_buffer():
    """clear() promises to release the buffers: the cleared memory must not keep the old storage alive."""
    mem, _ = filled(1000)
    old = mem.keys.untyped_storage().nbytes()
    assert old >= B * H * 1000 * D * 4
    mem.clear()
    assert mem.keys.untyped_storage().nbytes() == 0, (
        "MemoryCache.clear keeps the old buffer alive through a zero-length view"
    )


def test_index_select():
    mem, (k, v, valid) = filled(20)
    twin = mem.fork()
    rows = torch.tensor([1, 0, 1])
    mem.index_select(rows)
    assert mem.batch == 3
    assert_holds(mem, k[rows], v[rows], valid[rows])
    assert_holds(twin, k, v, valid)
    extra = [torch.randn(3, H, 2, D), torch.randn(3, H, 2, D), torch.ones(3, 2, dtype=torch.bool)]
    mem.append(*extra)
    assert mem.length == 22 and torch.equal(mem.keys[:, :, 20:], extra[0])
    assert_holds(twin, k, v, valid)


# -- files ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    mem, _ = filled(37, dtype=dtype)
    mem.fork().append(*chunk(3, 5))  # the shared buffer holds more than the live part
    path = tmp_path / "memory.safetensors"
    mem.save(path)
    loaded = MemoryCache.load(path)
    assert (loaded.batch, loaded.kv_heads, loaded.head_dim, loaded.dtype) == (B, H, D, dtype)
    assert_holds(loaded, mem.keys, mem.values, mem.valid)
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch):
    """The file appears under its name only once complete; a failing save leaves no file (and an older file intact)."""
    path = tmp_path / "memory.safetensors"
    mem, _ = filled(50)
    real_save = memory_module.save_file
    seen = []

    def watching_save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        seen.append((os.fspath(filename), path.exists()))

    monkeypatch.setattr(memory_module, "save_file", watching_save)
    mem.save(path)
    assert len(seen) == 1 and seen[0][0] != os.fspath(path) and seen[0][1] is False
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    good = path.read_bytes()

    def failing_save(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial write
        raise OSError("disk full")

    monkeypatch.setattr(memory_module, "save_file", failing_save)
    other, _ = filled(60, seed=1)
    with pytest.raises(OSError):
        other.save(path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    fresh = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        other.save(fresh)
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]


def _write_good(path):
    filled(20)[0].save(path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "header-only", "missing-key"])
def test_load_corrupt_file_raises_checkpoint_error(tmp_path, kind):
    path = tmp_path / "memory.safetensors"
    if kind != "missing":
        good = _write_good(path)
        content = {
            "empty": b"",
            "garbage": b"this is not a safetensors file" * 3,
            "truncated": good[: len(good) // 2],
            "header-only": good[:8],
        }.get(kind)
        if content is not None:
            path.write_bytes(content)
        else:
            save_file({"keys": torch.zeros(B, H, 2, D), "values": torch.zeros(B, H, 2, D)}, str(path))
    with pytest.raises(CheckpointError):
        MemoryCache.load(path)


@pytest.mark.parametrize("kind", ["values-shape", "valid-shape", "3-d"])
def test_load_inconsistent_file_raises_checkpoint_error(tmp_path, kind):
    """A readable file whose tensors do not fit together is corrupt too (not an InputError / IndexError)."""
    tensors = {
        "keys": torch.zeros(B, H, 5, D),
        "values": torch.zeros(B, H, 5, D),
        "valid": torch.ones(B, 5, dtype=torch.bool),
    }
    if kind == "values-shape":
        tensors["values"] = torch.zeros(B, H, 4, D)
    elif kind == "valid-shape":
        tensors["valid"] = torch.ones(B, 4, dtype=torch.bool)
    else:
        tensors = {name: t.flatten(-2) if t.dim() == 4 else t for name, t in tensors.items()}
    path = tmp_path / "memory.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError):
        MemoryCache.load(path)


# -- a long read: memory grows linearly and is allocated once -------------------------------------------------------
LENGTHS = [4096, 16384, 32768] + ([65536] if os.environ.get("LONGLLAMA_SLOW_TESTS") else [])


@pytest.fixture(scope="module")
def small_model():
    config = LongLlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        last_context_length=128,
        mem_layers=[1],
        mem_dtype="bfloat16",
    )
    torch.manual_seed(0)
    return LongLlamaForCausalLM(config).eval()


@pytest.mark.parametrize("n", LENGTHS)
@torch.no_grad()
def test_memory_grows_linearly(small_model, n):
    """use_cache=False, logits_to_keep=1: memory bytes are exactly n * (2 * heads * head_dim * 2 bytes + 1 mask byte)
    and the buffer is allocated once (reserve in a fresh call). 64k tokens take ~25 s on 2 cores (dense memory
    attention is quadratic), so the default run stops at 32k; set LONGLLAMA_SLOW_TESTS=1 for 64k."""
    ids = torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(n))
    out = small_model(ids, use_cache=False, logits_to_keep=1)
    cache = out.past_key_values
    assert out.logits.shape == (1, 1, 320)
    assert cache.local_length == 0 and cache.memory_length == n
    per_token = 2 * 2 * 16 * 2 + 1  # K and V: 2 heads x 16 dims in bf16, plus one bool
    assert cache.memory_bytes() == n * per_token
    mem = cache.layers[1].memory
    assert mem.nbytes() == n * per_token and mem.capacity == n and mem.copies <= 1
    assert cache.layers[0].memory is None
    assert bool(torch.isfinite(out.logits).all())


def test_long_input_is_embedded_one_window_at_a_time():
    # A long input never holds the embeddings of all its tokens (1M tokens of the 3B model: 6 GiB): the embedding
    # is looked up per window, and the logits equal those of an input given as embeddings.
    from longllama.config import preset

    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", max_position_embeddings=16, last_context_length=16)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16 * 5 + 3))
    lengths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    hook.remove()
    assert sum(lengths) == ids.shape[1] and max(lengths) <= 16
    with torch.no_grad():
        embedded = model(inputs_embeds=model.model.embed_tokens(ids), use_cache=False).logits
    torch.testing.assert_close(logits, embedded, rtol=0, atol=0)  # the same embedding rows, the same windows
