"""Loss of one held-out batch through every attention path and precision a trained model can run with (GPU check).

    python benchmarks/check_eval_paths.py MODEL_DIR DATA.jsonl [--batch 64] [--seq 512]

The CPU fp32 exact path is the reference; each CUDA path (eager / sdpa / fast, fp32 / bf16 weights / bf16 autocast,
model in train or eval mode) prints its loss and the difference. A path more than 0.05 nats away is reported as
FAIL (bf16 noise is ~0.01 on a trained model)."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from longllama import LongLlamaForCausalLM
from longllama.documents import iter_documents
from longllama.tokenizer import load_tokenizer
from longllama.training.cross_batch import make_cross_batch
from longllama.training.data.pretrain import TokenizedDocs, build_pipeline
from longllama.training.tasks import sequence_mean_loss


def batch_of(model_dir: str, data: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    tokens = TokenizedDocs(iter_documents([data], loop=True), tokenizer=load_tokenizer(model_dir))
    return next(build_pipeline("doc_aware", tokens, batch_size=batch, seq_len=seq))


def loss(model, batch, device, *, autocast: bool, impl: str, cross=None) -> float:
    model.config.attn_impl = impl
    no_memory = make_cross_batch(cross_batch_range=0, data_pipeline="doc_aware", stepping=False)
    cross = cross or no_memory
    context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        logits = model(input_ids=batch["input_ids"].to(device), cross_batch=cross).logits
    return float(sequence_mean_loss(logits, batch["targets"].to(device), batch["loss_mask"].to(device)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    batch = batch_of(args.model, args.data, args.batch, args.seq)
    model = LongLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference = loss(model, batch, torch.device("cpu"), autocast=False, impl="eager")
    print(f"cpu fp32 eager: {reference:.4f}")
    ok = True
    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU only to try the script
    model.to(cuda)
    for weights in ("fp32", "bf16"):
        if weights == "bf16":
            model.to(torch.bfloat16)
        for autocast in (False, True):
            for mode in ("eval", "train"):
                model.train(mode == "train")
                for impl in ("eager", "sdpa", "fast"):
                    value = loss(model, batch, cuda, autocast=autocast, impl=impl)
                    bad = abs(value - reference) > 0.05
                    ok &= not bad
                    print(
                        f"{cuda.type} {weights} weights, autocast={autocast!s:5}, {mode:5} mode, {impl:5}: "
                        f"{value:.4f} ({value - reference:+.4f}){'  FAIL' if bad else ''}"
                    )
    # Training's cross-batch memory (range 7, k = 4 packs: the small model's recipe), on the fused path ("fast",
    # fast.attention.joint_attention) and the masked one ("sdpa"), bf16 autocast over fp32 weights, against CPU fp32.
    cross = make_cross_batch(cross_batch_range=7, data_pipeline="doc_aware_k4")
    model.to("cpu", torch.float32)
    expected = loss(model, batch, torch.device("cpu"), autocast=False, impl="eager", cross=cross)
    print(f"cross-batch (range 7, k 4), cpu fp32 eager: {expected:.4f}")
    model.to(cuda)
    for impl in ("sdpa", "fast"):
        value = loss(model, batch, cuda, autocast=True, impl=impl, cross=cross)
        bad = abs(value - expected) > 0.05
        ok &= not bad
        print(
            f"cross-batch, {cuda.type} fp32 weights, autocast=True, train mode, {impl:5}: {value:.4f} "
            f"({value - expected:+.4f}){'  FAIL' if bad else ''}"
        )
    for b in (1, 2, 8):  # the same rows in smaller batches
        sub = {name: value[:b] for name, value in batch.items()}
        model.train(False)
        print(
            f"batch {b}: fast {loss(model, sub, cuda, autocast=False, impl='fast'):.4f} "
            f"eager {loss(model, sub, cuda, autocast=False, impl='eager'):.4f}"
        )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
