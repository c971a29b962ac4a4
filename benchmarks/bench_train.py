"""FoT training throughput on one GPU: a ~1B-parameter LLaMA shape with 3 memory layers trained cross-batch
(range 3, dataset packing 4), against the same model with no memory layers, in one run.

bf16 autocast over fp32 weights, AdamW (b2 0.95), random tokens, batch 8 x 2048. Prints tokens/s and MFU
(model FLOPs / step time / 989 TFLOP/s, the H100 SXM dense bf16 peak, also the H200's) and writes records with --out.
--compile yes|both: torch.compile of each decoder layer, as `compile: true` in a training config."""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from longllama import LongLlamaForCausalLM
from longllama.config import LongLlamaConfig
from longllama.training.cross_batch import CrossBatch
from longllama.training.parallel import compile_layers

PEAK = 989e12


def model_flops(config: LongLlamaConfig, params: int, batch: int, seq: int, cross_range: int) -> float:
    """6 x params x tokens, plus attention: causal within each entry, and in memory layers over R other entries."""
    tokens = batch * seq
    h, layers = config.hidden_size, config.num_hidden_layers
    attention = 12 * h * seq / 2 * tokens * layers
    extra = 12 * h * cross_range * seq * tokens * len(config.mem_layers)
    return 6 * params * tokens + attention + extra


def run(
    config: LongLlamaConfig, *, batch: int, seq: int, steps: int, cross: CrossBatch | None, compile: bool = False
) -> dict:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LongLlamaForCausalLM(config)
    model.train()
    if compile:
        compile_layers(model)  # what `compile: true` in a training config does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    ids = torch.randint(3, config.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, cross_batch=cross, use_cache=False, last_context_length=seq)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in model.parameters())
    flops = model_flops(config, params, batch, seq, cross.cross_batch_range if cross else 0)
    return dict(
        params=params,
        step_s=seconds,
        tokens_per_s=batch * seq / seconds,
        mfu=flops / seconds / PEAK,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        loss=float(loss),
    )


def check_fused_cross_batch(shape: dict, *, batch: int, seq: int) -> dict:
    """One FoT step's loss and gradients on the fused cross-batch path (fast.attention.joint_attention, attn_impl
    "fast") and on the masked SDPA path ("sdpa"), bf16 autocast, each against an fp32 step (no autocast) on the
    masked path: same weights and batch. Prints and returns relative errors ||a - ref|| / ||ref||."""
    ids = torch.randint(
        3, shape["vocab_size"], (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    state, results = None, {}
    for name, impl, autocast in (("fp32", "sdpa", False), ("sdpa", "sdpa", True), ("fused", "fast", True)):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LongLlamaForCausalLM(LongLlamaConfig(**{**shape, "attn_impl": impl}, mem_layers=[5, 10, 15]))
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids, cross_batch=CrossBatch(3, 4), use_cache=False, last_context_length=seq).loss
        loss.backward()
        results[name] = (float(loss.detach()), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
        del model, loss
        torch.cuda.empty_cache()
    ref_loss, ref_grad = results.pop("fp32")
    out = {"loss_fp32": ref_loss}
    for name, (value, grad) in results.items():
        out[f"loss_{name}"] = value
        out[f"grad_rel_err_{name}"] = float((grad - ref_grad).norm() / ref_grad.norm())
        print(
            f"bf16 {name:5s} cross-batch path vs fp32: loss {value:.5f} vs {ref_loss:.5f}, gradient relative "
            f"error {out[f'grad_rel_err_{name}']:.2e}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--check",
        action="store_true",
        help="first compare the fused cross-batch path's loss and gradients with the masked SDPA path's",
    )
    ap.add_argument(
        "--masked-baseline",
        action="store_true",
        help="also time FoT on the masked SDPA path "
        "(attn_impl sdpa, the cross-batch path before the fused one), eager only",
    )
    ap.add_argument(
        "--compile",
        choices=["no", "yes", "both"],
        default="no",
        help="torch.compile each decoder layer (both: eager and compiled runs side by side)",
    )
    args = ap.parse_args()
    shape = dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        max_position_embeddings=args.seq,
        last_context_length=args.seq,
        mem_dtype="bfloat16",
        attn_impl="fast",
    )
    card, today = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    records = []
    if args.check:
        records.append(
            dict(
                benchmark="train-check",
                shape="1b",
                device=card,
                date=today,
                **check_fused_cross_batch(shape, batch=4, seq=args.seq),
            )
        )
        torch.cuda.empty_cache()
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    runs = [
        (name + ("-compiled" if c else ""), mem_layers, cross, c)
        for c in modes
        for name, mem_layers, cross in [("fot", [5, 10, 15], CrossBatch(3, 4)), ("no-memory", [], None)]
    ]
    if args.masked_baseline:
        runs.append(("fot-masked-sdpa", [5, 10, 15], CrossBatch(3, 4), False))
    for name, mem_layers, cross, compiled in runs:
        impl = "sdpa" if name == "fot-masked-sdpa" else shape["attn_impl"]
        r = run(
            LongLlamaConfig(**{**shape, "attn_impl": impl}, mem_layers=mem_layers),
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            cross=cross,
            compile=compiled,
        )
        print(
            f"{name:19s} {r['params'] / 1e9:.2f}B params  {r['step_s'] * 1e3:7.1f} ms/step  "
            f"{r['tokens_per_s']:9.0f} tokens/s  MFU {100 * r['mfu']:5.1f} %  peak {r['peak_gib']:5.1f} GiB  "
            f"loss {r['loss']:.3f}"
        )
        records.append(
            dict(
                benchmark="train",
                impl=f"longllama-{name}",
                shape="1b",
                tokens=args.batch * args.seq,
                seconds=round(r["step_s"], 4),
                tokens_per_s=round(r["tokens_per_s"]),
                mfu=round(r["mfu"], 4),
                peak_gib=round(r["peak_gib"], 2),
                device=card,
                date=today,
                mem_layers=mem_layers,
                cross_batch_range=3 if cross else 0,
                dataset_packing=4,
                compiled=compiled,
                attn_impl=impl,
            )
        )
    timed = [r for r in records if r["benchmark"] == "train" and r["attn_impl"] != "sdpa"]
    for fot, plain in zip(timed[::2], timed[1::2]):
        cost = 1 - fot["tokens_per_s"] / plain["tokens_per_s"]
        print(f"FoT costs {100 * cost:.1f} % of throughput{' (compiled)' if fot['compiled'] else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
