"""Decoding: read the prompt in windows, then one token at a time through the local cache (docs/inference.md,
Generation).

The prompt goes through the long-input handler (memory windows, then a final window that fills the local cache);
each new token is appended to the local cache, and when it would overflow the context window the whole old cache
moves to memory (memory layers) or is dropped (other layers). Positions follow the attention mask (cumulative sum
minus one, so left pads sit at -1) as the reference's generation did. Settings, logits processors and stopping
criteria are transformers' (generation_config.py); beam search is beam.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from longllama import generation_config as gen_config
from longllama import timings
from longllama.beam import beam_search
from longllama.cache import CacheAlias, LongLlamaCache
from longllama.errors import InputError
from longllama.fast import sampling
from longllama.fast.decode import StaticDecoder
from longllama.plan import ExecutionPlan

logger = logging.getLogger(__name__)


@dataclass
class GenerateOutput(CacheAlias, ModelOutput):
    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    cache: LongLlamaCache | None = None


def _prompt_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None, eos: torch.Tensor | None
) -> torch.Tensor:
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}: pass one mask value per prompt token"
            )
        return attention_mask.to(input_ids.device).long()
    # transformers' rule: pad tokens in the prompt (when pad != eos) are masked out.
    pad = 0 if pad_token_id is None else pad_token_id
    is_eos = eos is not None and bool((eos == pad).any())
    if not is_eos and bool((input_ids == pad).any()):
        logger.warning(
            "no attention_mask given and the prompt holds pad token %d: masking those positions; "
            "pass attention_mask to be explicit",
            pad,
        )
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def _static_decoder(model, state: LongLlamaCache, mask, mode: str, plan: ExecutionPlan):
    if mode not in ("auto", "static", "dynamic"):
        raise InputError(f"decoder={mode!r} is not supported: use 'auto', 'static' or 'dynamic'")
    if mode == "dynamic" or (mode == "auto" and not plan.on_gpu):
        return None
    if plan.memory_shard is not None:
        return None  # a sharded memory is read through the general path (its merge across processes)
    if any(layer.memory is not None and layer.memory.share > 1 for layer in state.layers):
        return None  # rows sharing a memory (several returned sequences) decode through the generic path
    if not StaticDecoder.usable(state, mask):
        return None
    # An offloaded memory is copied in every step; keep those copies out of graph capture.
    return StaticDecoder(model, state, plan=plan, graphs=plan.on_gpu and not model.config.mem_offload)


class _Ahead:
    """Static decoding, one step ahead of the host: this step's token (and which rows are unfinished) are copied
    to host memory, the next step is queued behind them, and only then does the host wait, for the copies alone."""

    def __init__(self, batch: int, device: torch.device):
        cuda = device.type == "cuda"
        self.token = torch.empty(batch, dtype=torch.long, pin_memory=cuda)
        self.unfinished = torch.empty(batch, dtype=torch.bool, pin_memory=cuda)
        self.copied = torch.cuda.Event() if cuda else None

    def step(self, static: StaticDecoder, token, unfinished, streamer, *, check: bool):
        """(logits of the next position, done): done when every row has ended, the queued step taken back."""
        if not static.can_undo():  # the next step moves the window into memory: decide first, then step
            if streamer is not None:
                streamer.put(token.cpu())
            if check and not bool(unfinished.any()):
                return None, True
            return static.step(token), False
        self.token.copy_(token, non_blocking=True)
        self.unfinished.copy_(unfinished, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        logits = static.step(token)
        if self.copied is not None:
            self.copied.synchronize()
        if streamer is not None:
            streamer.put(self.token.clone())
        if check and not bool(self.unfinished.any()):
            static.undo()
            return None, True
        return logits, False


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    last_context_length: int | None = None,
    past_key_values: LongLlamaCache | None = None,
    cache: LongLlamaCache | None = None,
    streamer=None,
    logits_processor=None,
    stopping_criteria=None,
    tokenizer=None,
    prefix_allowed_tokens_fn=None,
    progress=None,
    decoder: str = "auto",
    **settings,
):
    """Generate up to `max_new_tokens` after `input_ids` (b, n), with transformers' generation vocabulary.

    Settings are GenerationConfig fields, given as arguments or as `generation_config=` (explicit arguments win,
    then that config, then the model's generation config): max_new_tokens / max_length, min_length,
    min_new_tokens, do_sample, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff,
    repetition_penalty, encoder_repetition_penalty, no_repeat_ngram_size, bad_words_ids, sequence_bias,
    suppress_tokens, begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id, renormalize_logits,
    remove_invalid_values, exponential_decay_length_penalty, eos_token_id (int or list), pad_token_id,
    stop_strings (with `tokenizer=`), max_time, num_beams, length_penalty, early_stopping (True / False /
    "never"), num_return_sequences, output_scores, output_logits, return_dict_in_generate. Options LongLLaMA does
    not implement (contrastive search, diverse beams, constraints, assistants, watermarking, ...) are refused
    with a one-line InputError. `logits_processor` and `stopping_criteria` (transformers' lists, or lm-eval's
    criteria) join the built ones as in transformers.

    `last_context_length` sets the final prompt window kept in the local cache. `past_key_values` continues from
    an earlier call's cache (left unchanged). `streamer` gets `put(tokens)` / `end()` calls as tokens come (not
    with beam search); `progress(tokens_done)` is called after each window of the prompt.
    `decoder`: "static" decodes from fixed buffers (decode.py; replayed as a CUDA graph on GPUs), "dynamic" through
    the generic forward; "auto" (default) takes "static" on GPUs. Padded batches, beam search and several returned
    sequences per prompt decode dynamically.
    Returns the sequences (prompt included) or, with return_dict_in_generate, a GenerateOutput with `scores`
    (processed scores per step), `logits` (raw), for beam search `sequences_scores` and `beam_indices` (as
    transformers shapes them: model.compute_transition_scores reads them), and the final cache.
    """
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise InputError(f"input_ids of shape {shape}: pass a non-empty (batch, n) tensor of prompt token ids")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    n = input_ids.shape[1]
    config = gen_config.merged_config(model, generation_config, settings, n)
    plan_g = gen_config.plan_of(config, n, device)
    c = plan_g.config
    beams, n_return = int(c.num_beams), int(c.num_return_sequences)
    if beams > 1 and streamer is not None:
        raise InputError("streamer cannot be used with beam search: use num_beams=1 or drop the streamer")
    if decoder not in ("auto", "static", "dynamic"):
        raise InputError(f"decoder={decoder!r} is not supported: use 'auto', 'static' or 'dynamic'")
    criteria = gen_config.stopping_criteria(plan_g, stopping_criteria, tokenizer, with_length_and_eos=beams > 1)
    past = past_key_values if past_key_values is not None else cache
    state = model.model.resolve_cache(past, True)
    mask = _prompt_mask(input_ids, attention_mask, plan_g.pad_token_id, plan_g.eos) if past is None else attention_mask
    positions = None
    if past is None:
        positions = mask.cumsum(-1) - 1  # left pads get -1; only differences matter (relative RoPE)
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer = timings.FirstToken(streamer)  # when the first new token reaches the host (--verbose)

    out = model.model.run(
        input_ids,
        cache=state,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        last_context_length=last_context_length,
        progress=progress,
        keep_last=1,
    )
    logits = model.lm_head(out.hidden[:, -1])
    next_pos = (positions[:, -1] if positions is not None else state.next_positions() - 1) + 1
    rows = beams if beams > 1 else n_return  # decoding rows per prompt; the prompt was read once
    if mask is not None:
        mask = mask.repeat_interleave(rows, dim=0)
    next_pos = next_pos.repeat_interleave(rows, dim=0)
    prompt_rows = input_ids.repeat_interleave(rows, dim=0)
    procs = gen_config.logits_processors(plan_g, prompt_rows, mask, logits_processor, prefix_allowed_tokens_fn)

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal mask, next_pos
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_out = model.model.run(
            tokens[:, None],
            cache=state,
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            last_context_length=last_context_length,
            validate=False,
        )
        next_pos = next_pos + 1
        return model.lm_head(step_out.hidden[:, -1])

    if beams > 1:

        def step(tokens: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
            nonlocal next_pos
            state.index_select(beam_idx)  # beams of one prompt: the shared memory is not touched
            next_pos = next_pos[beam_idx]
            return forward(tokens)

        result = beam_search(
            step,
            state,
            input_ids,
            logits,
            processors=procs,
            criteria=criteria,
            num_beams=beams,
            num_return_sequences=n_return,
            do_sample=bool(c.do_sample),
            length_penalty=float(c.length_penalty),
            early_stopping=c.early_stopping,
            max_length=plan_g.max_length,
            eos=plan_g.eos,
            pad_token_id=plan_g.pad_token_id,
            output_scores=bool(c.output_scores and c.return_dict_in_generate),
            output_logits=bool(c.output_logits and c.return_dict_in_generate),
        )
        if not c.return_dict_in_generate:
            return result.sequences
        return GenerateOutput(
            sequences=result.sequences,
            sequences_scores=result.sequences_scores if c.output_scores else None,
            scores=result.scores if c.output_scores else None,
            logits=result.logits if c.output_logits else None,
            beam_indices=result.beam_indices,
            cache=result.cache,
        )

    if rows > 1:
        state.expand_rows(rows)
        logits = logits.repeat_interleave(rows, dim=0)
    output_scores, output_logits = bool(c.output_scores), bool(c.output_logits)
    plan = model.plan
    static = _static_decoder(model, state, mask, decoder, plan)
    sequences, scores, raw = prompt_rows, [], []
    unfinished = torch.ones(prompt_rows.shape[0], dtype=torch.bool, device=device)
    eos = plan_g.eos if plan_g.eos is not None else torch.empty(0, dtype=torch.long, device=device)
    # transformers pads the rows that ended only where an eos criterion exists; other criteria merely stop the
    # call once every row has met them.
    pads = len(eos) > 0 or any(hasattr(cr, "eos_token_id") for cr in criteria)
    pad_id = plan_g.pad_token_id if plan_g.pad_token_id is not None else 0
    ahead = _Ahead(prompt_rows.shape[0], device) if static is not None else None
    # Temperature, top-k and top-p alone (the common case) are one kernel on GPUs (sampling.py); any other processor,
    # or scores asked for, takes transformers' warpers.
    warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    do_sample = bool(c.do_sample)
    fused = do_sample and not output_scores and all(type(p) in warpers for p in procs)
    top_k = int(c.top_k) if c.top_k else None
    for step_i in range(plan_g.max_new_tokens):
        kernel = fused and sampling.applies(logits, cpu=plan.interpret_kernels)  # it reads any float dtype
        if output_logits or not kernel:
            logits = logits.float()
        if output_logits:
            raw.append(logits)
        if kernel:
            token = sampling.sample(logits, temperature=float(c.temperature), top_k=top_k, top_p=float(c.top_p))
        else:
            processed = procs(sequences, logits) if len(procs) else logits
            if output_scores:
                scores.append(processed)
            if do_sample:
                token = torch.multinomial(torch.softmax(processed, dim=-1), num_samples=1).squeeze(1)
            else:
                token = processed.argmax(dim=-1)
        if pads:
            token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if len(criteria):  # the caller's criteria read the sequences (on the host where they need it)
            hit = criteria(sequences, tuple(scores) if output_scores else None)
            unfinished &= ~torch.as_tensor(hit, device=device)
        check = len(eos) > 0 or len(criteria) > 0
        last = step_i == plan_g.max_new_tokens - 1
        if ahead is not None and not last:
            # The next step goes to the GPU before the host waits for this token (streamer, end of sequence), so
            # the GPU never idles on the host; a step past the end is taken back (undo).
            early = step_i == 0 and streamer is not None
            if early:  # out now: the decoder's first step below may still compile kernels and capture its graph
                streamer.put(token.cpu())
            logits, done = ahead.step(static, token, unfinished, None if early else streamer, check=check)
            if done:
                break
            continue
        if streamer is not None:
            streamer.put(token.cpu())
        if last or not bool(unfinished.any()):
            break
        logits = forward(token)
    if static is not None:
        state = static.to_cache()
    if streamer is not None:
        streamer.end()
    elif not timings.seen("token", timings.FIRST_TOKEN):  # no streamer: the first call's tokens on the host
        sequences[:, -1:].cpu()
        timings.record_once("token", timings.FIRST_TOKEN)
    if not c.return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if output_scores else None,
        logits=tuple(raw) if output_logits else None,
        cache=state,
    )
