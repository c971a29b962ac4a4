"""Compiling a first call's Triton kernels side by side (fast/kernels.compile_ahead): inside a dry pass nothing is
launched and each kernel not yet compiled is compiled once on a pool of threads; the dry passes before a decoder's
first ingest and first decoding step leave no trace in what the model computes."""

import threading

import pytest
import torch
from conftest import sharp_tiny

from longllama import timings, windows
from longllama.fast import kernels


class FakeKernel:
    """A Triton JIT function's two entry points: launches (fn[grid](...)) and warmup(...)."""

    def __init__(self, fail: bool = False):
        self.launches, self.warmups, self.fail = [], [], fail

    def __getitem__(self, grid):
        return lambda *args, **constants: self.launches.append((grid, args, constants))

    def warmup(self, *args, grid, **constants):
        self.warmups.append((threading.current_thread().name, args, constants))
        if self.fail:
            raise RuntimeError("no such instruction")


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU: launches compile (not Triton's interpreter), a new process's set of launched kernels."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_launched", set())


def test_a_dry_pass_launches_nothing_and_compiles_each_kernel_once_on_the_pool(compiled_mode):
    fn = FakeKernel()
    x = torch.zeros(4)
    start = timings.mark()
    with kernels.compile_ahead(threads=2):
        assert kernels.compiling_ahead()
        for _ in range(3):
            kernels.launch_fixed("fake", fn, (1,), (x, 4), BLOCK=16)
        kernels.launch_fixed("fake", fn, (1,), (x, 4), BLOCK=32)  # another configuration: another kernel
    assert not kernels.compiling_ahead()
    assert fn.launches == []
    assert sorted(c["BLOCK"] for _, _, c in fn.warmups) == [16, 32]
    assert all(name.startswith("longllama-compile") for name, _, _ in fn.warmups)
    events = timings.since(start)
    assert sorted(e.name for e in events if e.source == "ahead") == ["triton fake BLOCK=16", "triton fake BLOCK=32"]
    assert any(e.name == "dry pass: 2 Triton kernels side by side" for e in events)
    # the real launch finds the kernel compiled: it runs, and is not reported as a compilation again
    mark = timings.mark()
    kernels.launch_fixed("fake", fn, (1,), (x, 4), BLOCK=16)
    assert len(fn.launches) == 1 and len(fn.warmups) == 2
    assert not [e for e in timings.since(mark) if e.kind == "compile"]


def test_a_kernel_that_fails_to_compile_ahead_is_left_to_its_launch(compiled_mode):
    fn = FakeKernel(fail=True)
    x = torch.zeros(4)
    with kernels.compile_ahead(threads=2):
        kernels.launch_fixed("broken", fn, (1,), (x,), BLOCK=16)
    assert len(fn.warmups) == 1 and fn.launches == []
    mark = timings.mark()
    kernels.launch_fixed("broken", fn, (1,), (x,), BLOCK=16)  # compiled (and reported) by its first launch
    assert len(fn.launches) == 1
    assert [e.name for e in timings.since(mark) if e.kind == "compile"] == ["triton broken BLOCK=16"]


def test_a_kernel_with_chosen_configurations_compiles_ahead_with_the_chosen_one(compiled_mode):
    fn = FakeKernel()
    fn.arg_names = ["x", "n"]
    kernel = kernels.Kernel("chosen", fn, [], ["n"], {}, lambda named, shipped, dtype: ({"BLOCK": 64}, 8, 3))
    x = torch.zeros(4)
    with kernels.compile_ahead(threads=2):
        kernel.run((1,), (x, 4), {})
        kernel.run((1,), (x, 4), {})
    assert fn.launches == [] and len(fn.warmups) == 1
    assert fn.warmups[0][2] == {"BLOCK": 64, "num_warps": 8, "num_stages": 3}
    kernel.run((1,), (x, 4), {})
    assert len(fn.launches) == 1 and fn.launches[0][2] == {"BLOCK": 64, "num_warps": 8, "num_stages": 3}


def _spy(monkeypatch):
    """Count the dry passes."""
    passes = []
    real = kernels.compile_ahead

    def counted(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "compile_ahead", counted)
    return passes


def test_the_dry_passes_leave_no_trace(interpreter, monkeypatch):
    """A model whose plan runs the kernels (Triton's interpreter on the CPU), with and without the dry passes: the
    same logits, tokens and caches; the dry passes ran before the model's first ingest and first decoding step."""
    ids = torch.randint(3, 320, (1, 150))
    outs = []
    for ahead in (False, True):
        model = sharp_tiny(attn_impl="fast")
        model.set_plan(interpret_kernels=True, decode_kernels=True, compile_ahead=ahead)
        passes = _spy(monkeypatch)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            out = model.generate(
                ids,
                decoder="static",
                max_new_tokens=6,
                last_context_length=61,
                output_scores=True,
                return_dict_in_generate=True,
            )  # the window of 64 flushes at the fourth new token
        outs.append((logits, out))
        # on: the model's first ingest and its decoder's first step (not again after the window flushes, nor in a
        # second generation)
        with torch.no_grad():
            model.generate(ids, decoder="static", max_new_tokens=2)
        assert len(passes) == (2 if ahead else 0)
    (plain_logits, plain), (ahead_logits, ahead) = outs
    assert torch.equal(plain_logits, ahead_logits)
    assert torch.equal(plain.sequences, ahead.sequences)
    assert torch.equal(torch.stack(plain.scores), torch.stack(ahead.scores))
    for la, lb in zip(plain.cache.to_legacy(), ahead.cache.to_legacy()):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


def test_the_ingest_dry_pass_keeps_the_calls_shapes(interpreter, monkeypatch):
    """The shorter input of the ingest's dry pass: two groups of memory windows, the partial window, the final one;
    once per model."""
    seen = []
    real = windows.run_windows

    def recorded(decoder, embeds, **kwargs):
        if kernels.compiling_ahead():
            seen.append((embeds.shape[1], kwargs["last_context_length"], kwargs["window"]))
        return real(decoder, embeds, **kwargs)

    monkeypatch.setattr(windows, "run_windows", recorded)
    model = sharp_tiny(attn_impl="fast")
    window = model.config.context_window
    model.set_plan(interpret_kernels=True, window_group_tokens=2 * window)
    n = 5 * window + 5 + 20  # five full memory windows, a partial one of 5 tokens, a final window of 20
    with torch.no_grad():
        model(torch.randint(3, 320, (1, n)), use_cache=False, last_context_length=20)
        model(torch.randint(3, 320, (1, 30)), use_cache=False)
    assert seen == [(4 * window + 5 + 20, 20, window)]


def test_no_dry_pass_where_no_kernel_runs(monkeypatch):
    """CPU tensors without the interpreter's plan: the kernels do not run, so there is nothing to compile."""
    passes = _spy(monkeypatch)
    model = sharp_tiny(attn_impl="fast")
    ids = torch.randint(3, 320, (1, 100))
    with torch.no_grad():
        model(ids, use_cache=False)
        model.generate(ids, decoder="static", max_new_tokens=3)
    assert passes == []


def test_a_dry_pass_runs_no_attention_kernel():
    """Inside a dry pass partial_attention returns zeros of the real call's shapes and dtypes without running a
    kernel (on a GPU, cuDNN would build a graph for each shape of the throwaway cache)."""
    from longllama.fast.attention import partial_attention

    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, lse = partial_attention(q, k, v, causal=False, scale=0.3)
    with kernels.compile_ahead(threads=1):
        dry_out, dry_lse = partial_attention(q, k, v, causal=False, scale=0.3)
    assert (dry_out.shape, dry_out.dtype, dry_lse.shape, dry_lse.dtype) == (out.shape, out.dtype, lse.shape, lse.dtype)
    assert not dry_out.any() and not dry_lse.any() and out.abs().sum() > 0
