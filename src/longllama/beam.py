"""Beam search over LongLLaMA's cache, with transformers' semantics (docs/inference.md#beam-search).

The prompt is read once per row; its cache is then expanded to `num_beams` rows per prompt, the local caches
repeated (one window at most) and each memory shared, never copied (LongLlamaCache.expand_rows, MemoryCache.share):
reordering beams (`index_select` within a prompt's rows) never touches the memory. Selection follows transformers'
beam search (GenerationMixin._beam_search in transformers 5.x): the best (1 + number of eos tokens) * num_beams
continuations by accumulated log-probability (or drawn without replacement when sampling), the stopping criteria
on each, finished hypotheses scored with the length penalty, the same early-stopping heuristic, so the returned
sequences, `sequences_scores`, `scores` and `beam_indices` equal transformers' on the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longllama.cache import LongLlamaCache

_NEG = -1.0e9  # the score that rules a candidate out (transformers' constant)


@dataclass
class BeamResult:
    sequences: torch.Tensor  # (b * num_return_sequences, prompt + generated)
    sequences_scores: torch.Tensor  # (b * num_return_sequences,)
    beam_indices: torch.Tensor  # (b * num_return_sequences, generated) int32, -1 past a hypothesis' end
    scores: tuple[torch.Tensor, ...]  # per step (b * num_beams, vocab): processed log-probabilities
    logits: tuple[torch.Tensor, ...]  # per step (b * num_beams, vocab): raw logits
    cache: LongLlamaCache


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (b, beams, ...) at beams `index` (b, k) of each row."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(
    step,
    state: LongLlamaCache,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    *,
    processors,
    criteria,
    num_beams: int,
    num_return_sequences: int,
    do_sample: bool,
    length_penalty: float,
    early_stopping,
    max_length: int,
    eos: torch.Tensor | None,
    pad_token_id: int | None,
    output_scores: bool,
    output_logits: bool,
) -> BeamResult:
    """Beam search from the prompt's last logits (b, vocab) and its cache (batch b; expanded here).
    `step(tokens (b*k,), beam_idx (b*k,))` reorders `state` (and whatever else follows the rows) by beam_idx,
    feeds one token per row and returns the next logits (b*k, vocab)."""
    b, prompt_len = input_ids.shape
    k = num_beams
    device = input_ids.device
    state.expand_rows(k)
    logits = logits.repeat_interleave(k, dim=0)
    keep = max(2, 1 + (0 if eos is None else eos.numel())) * k
    top_mask = torch.arange(keep, device=device) < k
    # transformers fills unused places with pad (eos[0] where pad is unset or 0) when eos is known, else -1.
    fill = (pad_token_id or int(eos[0])) if eos is not None else -1
    running = torch.full((b, k, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None]
    finished = running.clone()
    running_scores = torch.zeros(b, k, dtype=torch.float, device=device)
    running_scores[:, 1:] = _NEG  # only the first beam's tokens count at the start (the beams are one prompt)
    finished_scores = torch.full((b, k), _NEG, dtype=torch.float, device=device)
    done = torch.zeros(b, k, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    running_idx = torch.full((b, k, max_length - prompt_len), -1, dtype=torch.int32, device=device)
    finished_idx = running_idx.clone()
    flat = input_ids.repeat_interleave(k, dim=0)
    offsets = torch.arange(b, device=device)[:, None] * k
    scores, raw = [], []
    cur = prompt_len
    while True:
        logits = logits.float()
        log_probs = processors(flat, F.log_softmax(logits, dim=-1))
        if output_logits:
            raw.append(logits.clone())
        if output_scores:
            scores.append(log_probs.clone())
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(b, k, vocab) + running_scores[:, :, None]).view(b, k * vocab)
        if do_sample:
            index = torch.multinomial(F.softmax(acc, dim=-1), num_samples=keep)
            top_scores = acc.gather(1, index)
            top_scores, order = top_scores.sort(dim=-1, descending=True)
            index = index.gather(-1, order)
        else:
            top_scores, index = torch.topk(acc, k=keep)
        source = index // vocab
        cand = _take(running, source)
        cand_idx = _take(running_idx, source)
        cand[:, :, cur] = index % vocab
        cand_idx[:, :, cur - prompt_len] = (source + offsets).to(cand_idx.dtype)
        hits = criteria(cand[:, :, : cur + 1].reshape(b * keep, -1), tuple(scores) if output_scores else None)
        hits = torch.as_tensor(hits, device=device).expand(b * keep).reshape(b, keep)

        # The best num_beams candidates that did not stop continue.
        alive = top_scores + hits.to(torch.float32) * _NEG
        best = torch.topk(alive, k=k)[1]
        running, running_scores, running_idx = _take(cand, best), _take(alive, best), _take(cand_idx, best)

        # Candidates among the top num_beams that stopped join the finished hypotheses if they score better.
        just = hits & top_mask[None, :]
        final = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
        final = final + (done.all(dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * _NEG
        final = final + (~improvable).to(torch.float32) * _NEG
        final = final + (~just) * _NEG
        merged_scores = torch.cat((finished_scores, final), dim=1)
        chosen = torch.topk(merged_scores, k=k)[1]
        finished = _take(torch.cat((finished, cand), dim=1), chosen)
        finished_scores = _take(merged_scores, chosen)
        finished_idx = _take(torch.cat((finished_idx, cand_idx), dim=1), chosen)
        done = _take(torch.cat((done, just), dim=1), chosen)

        beam_idx = running_idx[..., cur - prompt_len].reshape(-1).long()
        cur += 1
        # Could a running beam still beat the worst finished one (transformers' heuristic)?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur - prompt_len
        best_possible = running_scores[:, :1] / (best_length**length_penalty)
        worst = torch.where(done, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(done.all()) and early_stopping is True) and not bool(hits.all())
        if not go_on:
            state.index_select(beam_idx)  # the returned cache follows the running beams, as transformers' does
            break
        flat = running[:, :, :cur].reshape(b * k, cur)
        logits = step(flat[:, -1], beam_idx)

    sequences = finished[:, :num_return_sequences].reshape(b * num_return_sequences, -1)
    seq_scores = finished_scores[:, :num_return_sequences].reshape(-1)
    indices = finished_idx[:, :num_return_sequences].reshape(b * num_return_sequences, -1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    return BeamResult(
        sequences=sequences[:, : prompt_len + generated],
        sequences_scores=seq_scores,
        beam_indices=indices[:, :generated],
        scores=tuple(scores),
        logits=tuple(raw),
        cache=state,
    )
