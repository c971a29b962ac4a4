"""Correctness on the GPU (bf16): longllama equals transformers LLaMA on a short input, and the attention paths agree
on a long one. Prints relative errors ||a - b|| / ||b|| of logits; exits non-zero if a bound is missed.

Random-weight models attend almost uniformly, so their bf16 outputs are ill-conditioned (two correct bf16 LLaMAs can
differ by several %): each bf16 result is judged against an fp32 run, and must be no worse than 1.5x the error of
transformers' own bf16 LLaMA against that fp32 run."""

from __future__ import annotations

import sys

import torch

from longllama import LongLlamaForCausalLM
from longllama.config import preset


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = preset("3b", num_hidden_layers=6, mem_layers=[2, 4])
    with torch.device("cuda"):
        ours = LongLlamaForCausalLM(cfg).eval()
    llama_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, max_position_embeddings=2048)
    llama_cfg._attn_implementation = "eager"
    with torch.device("cuda"):
        llama = LlamaForCausalLM(llama_cfg).eval()
    llama.load_state_dict(ours.state_dict())
    ok = True
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        short = torch.randint(3, cfg.vocab_size, (2, 1000), device="cuda")
        long = torch.randint(3, cfg.vocab_size, (1, 9000), device="cuda")
        ref_short = llama(short).logits
        ours_fp32 = ours(short, use_cache=False).logits
        ref_long = ours(long, use_cache=False).logits  # fp32 eager: the executable spec
        e = rel(ours_fp32, ref_short)
        print(f"fp32, short input, ours vs LLaMA: rel {e:.2e}")
        ok &= e < 1e-4
        ours.to(torch.bfloat16)
        llama.to(torch.bfloat16)
        base = rel(llama(short).logits, ref_short)
        e = rel(ours(short, use_cache=False).logits, ref_short)
        print(f"bf16, short input vs fp32: ours {e:.2e}, transformers LLaMA {base:.2e}")
        ok &= e <= 1.5 * base + 1e-3
        for name, kw in [("eager", {}), ("sdpa", dict(torch_attention=True)),
                         ("grouped", dict(mem_attention_grouping=(4, 512)))]:
            for k, v in kw.items():
                setattr(ours.config, k, v)
            e = rel(ours(long, use_cache=False).logits, ref_long)
            print(f"bf16, long input, {name} vs fp32 eager: rel {e:.2e}")
            ok &= e <= 1.5 * base + 1e-3
            ours.config.torch_attention, ours.config.mem_attention_grouping = False, None
        out = ours.generate(long[:, :3000], max_new_tokens=40, do_sample=False)
        print("generate ok", tuple(out.shape))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
