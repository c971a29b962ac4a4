"""Shared test helpers: where the reference fixtures are; Triton's interpreter for the kernel tests; the threads of
each worker under pytest -n; bounds in rounding steps of a dtype; forced tokens for comparing two decoders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when imported: its kernels then run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest -n N: the cores split among the workers (and their subprocesses), none oversubscribed
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _THREADS = max(1, _CORES // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)


def reference_root() -> Path | None:
    """shared/fixtures/reference: $LONGLLAMA_FIXTURES, or a shared/ folder inside or beside the checkout."""
    env = os.environ.get("LONGLLAMA_FIXTURES")
    here = Path(__file__).resolve()
    candidates = ([Path(env)] if env else []) + [
        here.parents[1] / "shared" / "fixtures" / "reference",
        here.parents[2] / "shared" / "fixtures" / "reference",
    ]
    return next((path for path in candidates if path.is_dir()), None)


@pytest.fixture
def interpreter() -> None:
    """Triton's interpreter runs the kernels on CPU tensors (turned on above, before Triton's import); they go there
    with cpu=True, or from a model whose plan says interpret_kernels. Skips on a GPU machine."""
    from longllama.fast import kernels

    if not kernels.interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")


@pytest.fixture(scope="session")
def bf16_cpu_attention() -> None:
    """Skips a test where torch's CPU attention cannot run in bf16: on CPUs with AMX, below
    ATEN_CPU_CAPABILITY=avx512 the kernel still packs for AMX and raises "pack_vnni2 is only supported when avx512
    is supported" (torch's limitation: F.scaled_dot_product_attention itself raises)."""
    q = torch.zeros(1, 1, 256, 16, dtype=torch.bfloat16)  # short sequences take another kernel
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as error:
        if "pack_vnni2" not in str(error):
            raise
        pytest.skip(
            f"torch's CPU attention in bf16 fails here (ATEN_CPU_CAPABILITY="
            f"{os.environ.get('ATEN_CPU_CAPABILITY')}): {error}"
        )


def sharp_tiny(**overrides):
    """The tiny preset with weights drawn at std 0.15 (attention sharp enough for mistakes to show), eval mode."""
    import torch

    from longllama import LongLlamaForCausalLM
    from longllama.config import preset

    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def train_llama_spm(folder: Path, sentences, *, vocab_size: int, **options) -> Path:
    """Train a small SentencePiece model with LLaMA's conventions (unk 0, bos 1, eos 2, no pad, byte fallback,
    digits split) into folder/tokenizer.model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        **{"model_type": "bpe", **options},
    )
    return folder


def assert_one_line_errors(run, cases: dict) -> None:
    """Each case (name -> (args, hint)) run through `run(*args) -> (code, stdout, stderr)` exits 2 with one
    `longllama: error:` line naming the hint, and prints nothing on stdout."""
    for name, (args, hint) in cases.items():
        code, out, err = run(*args)
        lines = err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("longllama: error: "), (name, err)
        assert hint in lines[0], (name, lines[0])
        assert out == "", name


def rounding_step(dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
    """One rounding step (unit in the last place) of `dtype` at the magnitude of each element of `values`, in fp64:
    eps * 2**floor(log2|v|); below the smallest normal number, the subnormal spacing."""
    info = torch.finfo(dtype)
    magnitude = values.detach().double().abs().clamp_min(info.tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent with 0.5 <= m < 1
    return info.eps * torch.ldexp(torch.ones_like(magnitude), exponent - 1)


def assert_within_steps(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    dtype: torch.dtype,
    steps: float,
    atol: float | torch.Tensor = 0.0,
    magnitude: torch.Tensor | None = None,
) -> None:
    """Elementwise |got - want| <= atol + steps * rounding_step(dtype, magnitude); the magnitude is by default the
    larger of |got| and |want| per element.

    How many steps: rounding to nearest moves a value by at most half a step at its own magnitude (and never into a
    lower binade), so a result rounded once to `dtype` is within 0.5 step of the unrounded one, and two values
    rounded from results that agree to `atol` are within atol + 1 step of each other (neighbours where the two
    results straddle a rounding boundary). `atol` (a number or per-element bounds) is the bound the unrounded (fp32)
    results meet."""
    assert got.shape == want.shape, (got.shape, want.shape)
    a, b = got.detach().double(), want.detach().double()
    if magnitude is None:
        magnitude = torch.maximum(a.abs(), b.abs())
    diff = (a - b).abs()
    bound = torch.broadcast_to(atol + steps * rounding_step(dtype, torch.as_tensor(magnitude)), diff.shape)
    bad = ~(diff <= bound)  # NaN fails too
    if bool(bad.any()):
        i = int((diff - bound).nan_to_num(float("inf")).flatten().argmax())
        raise AssertionError(
            f"{int(bad.sum())} of {diff.numel()} elements differ by more than atol + {steps} "
            f"{dtype} steps; worst: {a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}, "
            f"difference {diff.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
        )


class ForcedTokens:
    """A logits processor that makes `generate` take the tokens of `sequences` (b, n): two decoders then read one token
    stream, and their raw logits (output_logits) compare at every step, also after a near-tie that rounding could
    tip either way."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.sequences[:, input_ids.shape[1]].to(scores.device)
        return torch.full_like(scores, -float("inf")).scatter_(1, token[:, None], 0.0)


def run_benchmark(script: str, *args: str, timeout: int = 300):
    """benchmarks/`script` run in a fresh process on this checkout's sources, one thread; its CompletedProcess."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(root / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
