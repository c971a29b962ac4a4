"""How often the two-level block choice (mem_super_size) picks the blocks the one-level choice picks.

The shipped model reads a pass-key prompt of --length tokens with block retrieval (--blocks per query group, blocks
of 64 keys) and superblocks of each --super-size; at every two-level choice the one-level choice is computed too
(on the same queries and summaries) and the fraction of the two-level blocks that the one-level choice also picked
is noted. Prints, per superblock size: whether the pass key was found, the number of choices, and the mean, the mean
over the second half of the prompt (larger memories) and the least overlap. Runs on the CPU (fp32) or a GPU.

    python benchmarks/two_level_recall.py --length 32768 --blocks 16 --super-size 16,64
"""

from __future__ import annotations

import argparse
import time

import torch

from longllama import LongLlamaForCausalLM, retrieval
from longllama.cli import SHIPPED_MODEL
from longllama.evals import passkey
from longllama.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--super-size", default="16,64")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    prompt, key = passkey.passkey_prompt(
        passkey.n_garbage_for_tokens(tokenizer, args.length, seed=args.seed), args.seed
    )
    overlaps: list[float] = []
    two_level = retrieval.select_two_level

    def compared(qg, kmax, kmin, any_valid, keep, real, bounds, super_size, supers):
        got = two_level(qg, kmax, kmin, any_valid, keep, real, bounds, super_size, supers)
        one = retrieval.select_blocks(qg, kmax, kmin, any_valid, keep, real, bounds)
        overlaps.append((got[..., :, None] == one[..., None, :]).any(-1).float().mean().item())
        return got

    retrieval.select_two_level = compared
    for size in [int(s) for s in args.super_size.split(",")]:
        overlaps.clear()
        model = LongLlamaForCausalLM.from_pretrained(
            SHIPPED_MODEL,
            dtype=torch.float32,
            device_map=args.device,
            mem_retrieval="blocks",
            mem_blocks=args.blocks,
            mem_super_size=size,
        ).eval()
        start = time.perf_counter()
        with torch.no_grad():
            scored = passkey.score_passkey(model, tokenizer, prompt, key, last_context_length=256)
        late = overlaps[len(overlaps) // 2 :] or [1.0]
        print(
            f"length {scored['tokens']} blocks {args.blocks} super_size {size}: found {scored['correct']}, "
            f"{len(overlaps)} two-level choices, overlap with the one-level choice: mean "
            f"{sum(overlaps) / max(1, len(overlaps)):.3f}, second half {sum(late) / len(late):.3f}, least "
            f"{min(overlaps, default=1.0):.3f} ({time.perf_counter() - start:.0f} s, both choices computed)",
            flush=True,
        )


if __name__ == "__main__":
    main()
