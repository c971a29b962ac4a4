"""Logits and generations of tiny random models on every attention path, saved to one file: run it under two code
versions (PYTHONPATH pointing at each version's src/) and compare the files bitwise with --compare. A refactor that
claims "same maths" shows it here: float32 paths must be equal bit for bit on one machine.

    PYTHONPATH=old/src python scripts/same_outputs.py old.pt
    PYTHONPATH=src python scripts/same_outputs.py new.pt
    python scripts/same_outputs.py --compare old.pt new.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

CASES = {
    "eager32": dict(mem_dtype="float32"),
    "fast32": dict(mem_dtype="float32", attn_impl="fast"),
    "eager-bf16-memory": dict(mem_dtype="bfloat16"),
    "sdpa": dict(torch_attention=True, mem_dtype="float32"),
    "fast-gqa": dict(num_key_value_heads=2, attn_impl="fast", mem_dtype="float32"),
    "fast-top-k": dict(mem_top_k=8, attn_impl="fast", mem_dtype="float32"),
    "grouping": dict(mem_attention_grouping=(2, 16), mem_dtype="float32"),
}


def outputs() -> dict[str, torch.Tensor]:
    from longllama import LongLlamaForCausalLM
    from longllama.config import preset

    out = {}
    for name, overrides in CASES.items():
        torch.manual_seed(1)
        model = LongLlamaForCausalLM(preset("tiny", **overrides)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.15)
            ids = torch.randint(3, 320, (2, 300))  # several windows: memory, overflow, the final window
            out[f"{name}/logits"] = model(ids).logits
            mask = torch.ones_like(ids)
            mask[1, :7] = 0
            out[f"{name}/left-padded"] = model(ids, attention_mask=mask).logits
            for decoder in ("dynamic", "static"):
                gen = model.generate(
                    ids[:1], max_new_tokens=40, return_dict_in_generate=True, output_logits=True, decoder=decoder
                )
                out[f"{name}/{decoder}-tokens"] = gen.sequences
                out[f"{name}/{decoder}-logits"] = torch.stack(gen.logits)
    return out


def compare(a: str, b: str) -> int:
    left, right = torch.load(a), torch.load(b)
    differ = 0
    for key in sorted(set(left) | set(right)):
        if key not in left or key not in right:
            print(f"{key}: only in {'the first' if key in left else 'the second'}")
            differ += 1
        elif torch.equal(left[key], right[key]):
            print(f"{key}: equal")
        else:
            diff = (left[key].float() - right[key].float()).abs().max().item()
            print(f"{key}: DIFFERENT (max |diff| {diff:.3g})")
            differ += 1
    print(f"{len(left) - differ} of {len(left)} equal bit for bit")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="file to write the outputs of the importable longllama to")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two such files")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give a file to write, or --compare A B")
    torch.save(outputs(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
