"""How a query group of block retrieval ranks the memory's blocks, measured by held-out perplexity: the library's
ranking (each block's largest bound over the group's queries) against alternatives, in this process only (the
ranking function of longllama.retrieval is replaced here; the library's stays as it is).

Rankings (--ranking):
  max        the library's: a block's largest bound over the group's queries
  softmass   each query's softmax over its bounds (scaled by 1/sqrt(d)), summed over the group
  mean       the mean bound over the group's queries
  vote[N]    each query's N best blocks by its own bound (N: the budget if omitted) count one vote each; ties by max
  recent     only the most recent blocks (a sliding window over the memory)
+recentR (suffix) the R most recent blocks are always kept, the ranking fills the rest of the budget;
+firstF  (suffix) the F first blocks of the memory are always kept (as attention sinks are), the same way.

    python benchmarks/retrieval_rankings.py vote+recent16 --data heldout.jsonl --contexts 64k --out vote.json

The other options are `longllama perplexity`'s (CPU, fp32, 4 documents, 255 targets by default here); the PyTorch
ranking path only (the block kernels compute the max).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import longllama.retrieval as retrieval
from longllama import cli


def ranking_function(name: str):
    """A replacement for retrieval.select_blocks that ranks by `name` (the module docstring's rankings)."""
    library = retrieval.select_blocks
    base, *suffixes = name.split("+")
    kept = {"recent": 0, "first": 0}
    for suffix in suffixes:
        kind = suffix.rstrip("0123456789")
        if kind not in kept or kind == suffix:
            raise SystemExit(f"unknown suffix {suffix!r}: use +recentR or +firstF")
        kept[kind] = int(suffix[len(kind) :])
    recent, first = kept["recent"], kept["first"]
    votes = base.startswith("vote") and (base[4:] == "" or base[4:].isdigit())
    if base not in ("max", "softmass", "mean", "recent") and not votes:
        raise SystemExit(f"unknown ranking {base!r}: use max, softmass, mean, vote[N] or recent")

    def select(qg, kmax, kmin, any_valid, blocks, real, bounds=None, super_size=0, supers=None, recent_kept=0):
        if recent_kept:
            raise SystemExit("the library's mem_recent_blocks is not combined with this study's +recentR")
        b, hkv, groups, rows, d = qg.shape
        n_blocks = kmax.shape[2]
        keep = min(blocks, n_blocks)
        if (base == "max" and not recent and not first) or keep >= n_blocks:
            return library(qg, kmax, kmin, any_valid, blocks, real, bounds, super_size, supers)
        kmax_t, kmin_t = kmax.transpose(-1, -2)[:, :, None], kmin.transpose(-1, -2)[:, :, None]
        hidden = ~any_valid[:, None, None, :]
        filled = int(any_valid.sum(-1).max())  # blocks holding keys come first, in memory order
        step = max(1, retrieval._BOUND_ELEMENTS // max(1, b * hkv * rows * n_blocks))  # chunks as the library's
        chosen = []
        for g0 in range(0, groups, step):
            q = qg[:, :, g0 : g0 + step].float()
            bound = q.clamp(min=0) @ kmax_t + q.clamp(max=0) @ kmin_t  # (b, hkv, c, rows, B)
            bound = bound.masked_fill(hidden.unsqueeze(3), float("-inf"))
            is_real = real[g0 : g0 + step, :, None]
            largest = bound.masked_fill(~is_real, float("-inf")).amax(dim=-2)
            if base == "max":
                score = largest
            elif base == "softmass":
                score = torch.softmax(bound / math.sqrt(d), dim=-1).masked_fill(~is_real, 0.0).sum(dim=-2)
            elif base == "mean":
                score = bound.masked_fill(~is_real, 0.0).sum(-2) / is_real.sum(-2).clamp(min=1)
            elif base.startswith("vote"):
                top = bound.topk(min(int(base[4:] or keep), n_blocks), dim=-1).indices
                score = torch.zeros(largest.shape)
                score.scatter_add_(-1, top.flatten(-2), is_real.float().expand(top.shape).flatten(-2))
                score = score + 1e-3 * torch.sigmoid(largest / 100)  # ties: the larger bound
            else:  # recent
                score = torch.zeros(largest.shape)
                score[..., max(0, filled - keep) : filled] = 1.0
            if recent:
                score[..., max(0, filled - recent) : filled] = float("inf")
            if first:
                score[..., :first] = float("inf")
            score = score.masked_fill(hidden, float("-inf"))
            chosen.append(score.topk(keep, dim=-1, sorted=False).indices)
        return torch.cat(chosen, dim=2).sort(dim=-1).values

    return select


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ranking")
    ap.add_argument("--data", required=True, help="JSON lines of {'text': ...}, as longllama perplexity reads")
    ap.add_argument("--contexts", default="64k")
    ap.add_argument("--max-docs", default="4")
    ap.add_argument("--target-tokens", default="255")
    ap.add_argument("--mem-blocks", default="64", help="blocks read per query group (the budget)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    retrieval.select_blocks = ranking_function(args.ranking)  # this process only: the study's instrument
    argv = ["perplexity", "--device", "cpu", "--dtype", "float32", "--data", args.data, "--contexts", args.contexts]
    argv += ["--target-tokens", args.target_tokens, "--max-docs", args.max_docs, "--mem-retrieval", "blocks"]
    argv += ["--mem-blocks", args.mem_blocks]
    return cli.main([*argv, "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
