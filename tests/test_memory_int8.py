"""8-bit memory (mem_dtype "int8", memory.py): storage within half a quantization step, growth, forks, files; the
attention paths reading int8 keys and values (eager, grouped, few-query, shared rows, kNN, the fast path's pieces
and the decoding kernel under Triton's interpreter) against the same maths on the dequantized memory in fp32, and
the model against its float32 memory within the quantization error; config, load-time option and CLI flag."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_tiny

from longllama import LongLlamaForCausalLM, attention
from longllama.config import preset
from longllama.errors import CheckpointError, InputError
from longllama.fast import attention as fast_attention
from longllama.memory import MemoryCache, dequantize_rows, quantize_rows
from longllama.plan import ExecutionPlan


def _memory(b=2, h=2, m=300, d=24, storage=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, m, d, generator=g) * 3, torch.randn(b, h, m, d, generator=g)
    mem = MemoryCache(b, h, d, dtype=torch.int8, storage_dim=storage)
    for start in range(0, m, 70):  # several appends: growth copies the scales too
        mem.append(keys[:, :, start : start + 70], values[:, :, start : start + 70])
    return mem, keys, values


def _half_step(x: torch.Tensor) -> torch.Tensor:
    """Half the int8 step of each row (its largest magnitude / 127), with a little room for fp32 rounding."""
    return x.abs().amax(-1, keepdim=True) / 127 / 2 * (1 + 1e-5) + 1e-7


def test_rows_within_half_a_step():
    x = torch.randn(5, 7, 33) * torch.logspace(-3, 3, 33)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 7) and q.abs().max() <= 127
    assert ((dequantize_rows(q, scale) - x).abs() <= _half_step(x)).all()
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 4))
    assert (zero_q == 0).all() and (zero_scale == 0).all()


def test_cache_stores_int8_and_scales():
    mem, keys, values = _memory(storage=32)
    assert mem.quantized and mem._k.dtype == torch.int8 and mem.copies >= 1
    assert ((mem.keys - keys).abs() <= _half_step(keys)).all()
    assert ((mem.values - values).abs() <= _half_step(values)).all()
    pk, pv = mem.padded()
    assert pk.dtype == torch.int8 and pk.shape[-1] == 32 and (pk[..., 24:] == 0).all()
    # a quarter of the bf16 bytes plus 4 bytes of scale per token and head
    assert (
        mem.nbytes() < 0.6 * MemoryCache(2, 2, 24, dtype=torch.bfloat16, capacity=mem.capacity, storage_dim=32).nbytes()
    )
    twin = mem.fork()
    twin.append(keys[:, :, :5], values[:, :, :5])
    assert mem.length == 300 and torch.equal(mem.keys, _memory(storage=32)[0].keys)
    mem.index_select(torch.tensor([1, 1, 0]))
    assert torch.equal(mem.keys[0], mem.keys[1]) and mem.scales()[0].shape == (3, 2, 300)


def test_save_load_keeps_int8(tmp_path):
    mem, _, _ = _memory()
    mem.save(tmp_path / "m.safetensors")
    again = MemoryCache.load(tmp_path / "m.safetensors", storage_dim=32)
    assert again.quantized and again.length == 300 and again.storage_dim == 32
    assert torch.equal(again.padded()[0][..., :24], mem.padded()[0]) and torch.equal(again.keys, mem.keys)
    assert all(torch.equal(a, b) for a, b in zip(again.scales(), mem.scales()))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "m.safetensors")
    assert tensors["keys"].dtype == torch.int8
    del tensors["key_scales"]
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="key_scales"):
        MemoryCache.load(tmp_path / "bad.safetensors")


def test_training_refuses_int8_memory():
    mem = MemoryCache(1, 1, 8, dtype=torch.int8)
    with pytest.raises(InputError, match="inference"):
        mem.append(torch.randn(1, 1, 3, 8, requires_grad=True), torch.randn(1, 1, 3, 8))


def _case(b=2, h=4, hkv=2, n=20, kv=30, m=300, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, t, d, generator=g) for x, t in ((h, n), (hkv, kv), (hkv, kv)))
    mem, mk, mv = _memory(b=b, h=hkv, m=m, d=d, seed=seed)
    return q, k, v, mem, mk, mv


@pytest.mark.parametrize(
    "options",
    [
        dict(impl="eager"),
        dict(impl="sdpa"),
        dict(impl="eager", grouping=(1, 7)),
        dict(impl="eager", mem_top_k=17),
        dict(impl="eager", visible=True),
    ],
)
def test_attend_reads_int8_like_its_dequantized_copy(monkeypatch, options):
    monkeypatch.setattr(attention, "_INT8_CHUNK", 64)  # several chunks
    q, k, v, mem, mk, mv = _case()
    options = dict(options)
    if options.pop("visible", False):
        options["visible"] = torch.rand(2, 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(3)) > 0.3
        options["mem_valid"] = torch.rand(2, 300, generator=torch.Generator().manual_seed(4)) > 0.2
    pk, pv = mem.padded()
    out, _ = attention.attend(q, k, v, mem_k=pk, mem_v=pv, mem_scales=mem.scales(), **options)
    same, _ = attention.attend(q, k, v, mem_k=mem.keys, mem_v=mem.values, **{**options, "impl": "eager"})
    assert (out - same).abs().max() < 1e-5
    # against the unquantized memory: keys within half a step move each score by at most
    # |q| * |step/2| * sqrt(d) / sqrt(d); the output moves by a small multiple of that
    exact, _ = attention.attend(q, k, v, mem_k=mk, mem_v=mv, **{**options, "impl": "eager"})
    bound = 4 * (
        q.abs().amax() * _half_step(mk).amax() * mk.shape[-1] / math.sqrt(mk.shape[-1]) + _half_step(mv).amax()
    )
    assert 0 < (out - exact).abs().max() < bound


def test_shared_rows_and_few_queries(monkeypatch):
    monkeypatch.setattr(attention, "_INT8_CHUNK", 64)
    q, k, v, mem, _, _ = _case(b=1, n=3)
    q, k, v = (t.repeat_interleave(3, dim=0) for t in (q, k, v))  # 3 beams share the memory row
    mem.expand(3)
    pk, pv = mem.padded()
    got = attention.few_query_attention(q, k, v, None, pk, pv, None, mem_share=3, mem_scales=mem.scales())
    ref = attention.few_query_attention(
        q, k, v, None, *(t.repeat_interleave(3, 0) for t in (mem.keys, mem.values)), None
    )
    assert (got - ref).abs().max() < 1e-5


def test_fast_path_pieces(monkeypatch):
    """The fast path's many-query read of an int8 memory (on CPUs the exact maths; the GPU's pieces are
    _over_int8_memory, checked here with the eager partial attention standing in for the kernels)."""
    monkeypatch.setattr(fast_attention, "_INT8_PIECE", 64)
    q, k, v, mem, _, _ = _case()
    pk, pv = mem.padded()
    plan = ExecutionPlan(attention="fast")
    got = fast_attention.attend(q, k, v, plan=plan, mem_k=pk, mem_v=pv, mem_scales=mem.scales(), padded_mem=(pk, pv))
    ref, _ = attention.attend(q, k, v, mem_k=mem.keys, mem_v=mem.values)
    assert (got - ref).abs().max() < 1e-5

    def partial(q, k, v, causal, scale, kernel):  # fp32 softmax partials, in place of the CUDA kernels
        s = (q @ k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, -1)
        return torch.exp(s - lse[..., None]) @ v, lse

    monkeypatch.setattr(
        fast_attention,
        "partial_attention",
        lambda q, k, v, *, causal, scale, kernel: partial(q, k, v, causal, scale, kernel),
    )
    monkeypatch.setattr(fast_attention, "resolve_memory_kernel", lambda q, plan: "flash")
    qm = q[:, ::2]  # one query head per key head
    out, lse = fast_attention._over_int8_memory(qm, pk, pv, mem.scales(), 1 / math.sqrt(24), plan, 24)
    want, want_lse = partial(qm, mem.keys, mem.values, False, 1 / math.sqrt(24), None)
    assert (out - want).abs().max() < 1e-5 and (lse - want_lse).abs().max() < 1e-5


@pytest.mark.parametrize("after_cache", [False, True])
def test_fast_path_kernel_route(monkeypatch, after_cache):
    """The GPU route of the fast path over an int8 memory (local part by its kernel or, after a local cache, under
    its mask; the memory by dequantized pieces), run on the CPU with an fp32 stand-in for the CUDA kernels, against
    the exact maths on the dequantized memory."""
    from longllama.model import window_visibility

    def partial(q, k, v, *, causal, scale, kernel):  # fp32 softmax partials with their log-sum-exp
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        return torch.exp(s - lse[..., None]) @ v.float(), lse

    monkeypatch.setattr(fast_attention, "_on_kernels", lambda q: True)
    monkeypatch.setattr(fast_attention, "partial_attention", partial)
    monkeypatch.setattr(fast_attention, "resolve_memory_kernel", lambda q, plan: "flash")
    monkeypatch.setattr(fast_attention, "_INT8_PIECE", 64)
    past = 10 if after_cache else 0
    q, k, v, mem, _, _ = _case(n=20, kv=20 + past)
    visible = window_visibility(2, 20, past, None, q.device)
    pk, pv = mem.padded()
    plan = ExecutionPlan(attention="fast")
    got = fast_attention.attend(
        q, k, v, plan=plan, visible=visible, is_causal=not after_cache, mem_k=pk, mem_v=pv, mem_scales=mem.scales()
    )
    ref, _ = attention.attend(q, k, v, visible=visible, mem_k=mem.keys, mem_v=mem.values)
    assert (got - ref).abs().max() < 1e-5


def test_decode_kernel_reads_int8_in_registers(interpreter):
    from longllama.fast import decode_attention

    b, h, hkv, d, window, slot = 2, 4, 2, 20, 40, 17
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, h, d, generator=g)
    keys, values = (F.pad(torch.randn(b, hkv, window, d, generator=g), (0, 4)) for _ in range(2))
    mem, _, _ = _memory(b=b, h=hkv, m=150, d=d, storage=32, seed=6)
    pk, pv = mem.padded()
    # many chunks for small inputs (the plan's decode_programs, decode_min_chunk)
    out = decode_attention.attend(
        q, keys, values, torch.tensor([slot]), (pk, pv), mem.scales(), programs=16, min_chunk=8
    )
    # reference: fp32 softmax over the used local slots and the dequantized memory
    k = torch.cat([keys[:, :, : slot + 1, :d], mem.keys], 2).repeat_interleave(2, 1)
    v = torch.cat([values[:, :, : slot + 1, :d], mem.values], 2).repeat_interleave(2, 1)
    ref = ((q[:, :, None] @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v)[:, :, 0]
    assert (out - ref).abs().max() < 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_model_with_int8_memory(tmp_path):
    """The tiny model reading 5 windows into an int8 memory against the same model with float32 memory: within
    the quantization error, and the int8 memory holds int8."""
    ids = torch.randint(0, 320, (2, 300), generator=torch.Generator().manual_seed(7))
    model = sharp_tiny()
    ref = _logits(model, ids)
    model.config.mem_dtype = "int8"
    out = _logits(model, ids)
    err = (out - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max()
    # through from_pretrained (load-time option) and the saved config
    model.config.mem_dtype = "float32"
    model.save_pretrained(tmp_path / "m")
    loaded = LongLlamaForCausalLM.from_pretrained(tmp_path / "m", mem_dtype="int8")
    assert loaded.config.mem_dtype == "int8"
    assert torch.equal(_logits(loaded, ids), out)
    with torch.no_grad():
        result = loaded(ids[:, :200], use_cache=True)
    memory = next(layer.memory for layer in result.cache.layers if layer.memory is not None)
    assert memory.quantized and memory.padded()[0].dtype == torch.int8
    assert preset("tiny", mem_dtype="int8").memory_dtype == torch.int8


def test_cli_mem_dtype(tmp_path, capsys):
    from longllama import cli

    model = LongLlamaForCausalLM(preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    code = cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--mem-dtype", "int4"])
    assert code == 2 and "--mem-dtype" in capsys.readouterr().err
    lm = cli.load_model(tmp_path / "m", cli.LoadOptions(device="cpu", mem_dtype="int8"))
    assert lm.config.mem_dtype == "int8"


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_static_decoding_kernels_with_int8_memory(interpreter, quantize):
    """The static decoder's Triton step (scaled int8 memory reads; with int8 weights, which this fp32 model's
    products leave to torchao: the matrix-vector kernels take bf16/fp16 activations) against the general step on
    the same model."""
    pytest.importorskip("torchao") if quantize != "none" else None
    from longllama.fast import decode_attention
    from longllama.quantize import quantize_model

    model = sharp_tiny(attn_impl="fast", mem_dtype="int8")
    quantize_model(model, quantize)
    ids = torch.randint(3, 320, (1, 150), generator=torch.Generator().manual_seed(8))
    outs = []
    for kernels_on in (False, True):
        calls = []

        def attend(*args, calls=calls, real=decode_attention.attend, **kwargs):
            calls.append(args[5] if len(args) > 5 else kwargs.get("scales"))  # the scales
            return real(*args, **kwargs)

        model.set_plan(interpret_kernels=True, decode_kernels=kernels_on)
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            patch.setattr(decode_attention, "attend", attend)
            outs.append(
                model.generate(
                    ids,
                    decoder="static",
                    output_scores=True,
                    return_dict_in_generate=True,
                    max_new_tokens=12,
                    last_context_length=40,
                )
            )
        assert bool(calls) == kernels_on and (not calls or any(scales is not None for scales in calls))
    plain, fast = outs
    assert torch.equal(plain.sequences, fast.sequences)
    assert (torch.stack(plain.scores) - torch.stack(fast.scores)).abs().max() < 1e-4


def test_document_memory_keeps_int8(tmp_path):
    """A document memory of an int8-memory model saves the int8 keys and scales and loads them unchanged."""
    import shutil

    from longllama.cli import SHIPPED_MODEL
    from longllama.document_memory import DocumentMemory
    from longllama.tokenizer import TOKENIZER_FILE, load_tokenizer, write_tokenizer_files

    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", vocab_size=8192, mem_dtype="int8")).eval()
    model.save_pretrained(folder)
    shutil.copy(SHIPPED_MODEL / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    write_tokenizer_files(folder)
    tokenizer = load_tokenizer(folder)
    text = " ".join("river stone lamp paper window garden silver music".split()[i % 8] for i in range(300))
    memory = DocumentMemory.build(model, tokenizer, text, template="none")
    stored = next(layer.memory for layer in memory.cache.layers if layer.memory is not None)
    assert stored.quantized and stored.length > 0
    memory.save(tmp_path / "doc")
    again = DocumentMemory.load(tmp_path / "doc", model, tokenizer)
    loaded = next(layer.memory for layer in again.cache.layers if layer.memory is not None)
    d = stored.head_dim
    assert loaded.quantized and torch.equal(loaded.padded()[0][..., :d], stored.padded()[0][..., :d])
    assert all(torch.equal(a, b) for a, b in zip(loaded.scales(), stored.scales()))
