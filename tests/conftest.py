"""Shared test helpers: where the reference fixtures are; Triton's interpreter for the kernel tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton reads this when imported: its kernels then run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")


def reference_root() -> Path | None:
    """shared/fixtures/reference: $LONGLLAMA_FIXTURES, or a shared/ folder inside or beside the checkout."""
    env = os.environ.get("LONGLLAMA_FIXTURES")
    here = Path(__file__).resolve()
    candidates = ([Path(env)] if env else []) + [here.parents[1] / "shared" / "fixtures" / "reference",
                                                 here.parents[2] / "shared" / "fixtures" / "reference"]
    return next((path for path in candidates if path.is_dir()), None)


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
        sentence_iterator=iter(sentences), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, **{"model_type": "bpe", **options})
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
