"""Decoding: read the prompt in windows, then one token at a time through the local cache (docs/inference.md,
Generation).

The prompt goes through the long-input handler (memory windows, then a final window that fills the local cache);
each new token is appended to the local cache, and when it would overflow the context window the whole old cache
moves to memory (memory layers) or is dropped (other layers). Positions follow the attention mask (cumulative sum
minus one, so left pads sit at -1) as the reference's generation did. Logits processors come from transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from longllama.cache import CacheAlias, LongLlamaCache
from longllama.errors import InputError
from longllama.fast import sampling
from longllama.fast.decode import StaticDecoder
from longllama.plan import ExecutionPlan

logger = logging.getLogger(__name__)


@dataclass
class GenerateOutput(ModelOutput, CacheAlias):
    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    cache: LongLlamaCache | None = None


@dataclass
class Settings:
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


_SETTING_NAMES = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
    "num_beams",
)


def _settings(model, prompt_len: int, generation_config, overrides: dict) -> Settings:
    """Merge explicit arguments over the generation config (the model's, from generation_config.json)."""
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    values = {name: getattr(base, name, None) for name in _SETTING_NAMES}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if (values.get("num_beams") or 1) != 1:
        raise InputError(f"num_beams={values['num_beams']} is not supported: use num_beams=1 (greedy or sampling)")
    max_new = values.get("max_new_tokens")
    if max_new is None:
        max_new = (values.get("max_length") or 20) - prompt_len
    if max_new < 1:
        raise InputError(f"max_new_tokens={max_new} must be at least 1")
    eos = values.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    pad = values.get("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    top_k = values.get("top_k")
    return Settings(
        max_new_tokens=int(max_new),
        min_new_tokens=int(values.get("min_new_tokens") or 0),
        do_sample=bool(values.get("do_sample")),
        temperature=float(values["temperature"]) if values.get("temperature") is not None else 1.0,
        top_k=int(top_k) if top_k else None,
        top_p=float(values["top_p"]) if values.get("top_p") is not None else 1.0,
        repetition_penalty=float(values.get("repetition_penalty") or 1.0),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
    )


def _processors(s: Settings, prompt_len: int, extra) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
    if s.min_new_tokens > 0 and s.eos_token_ids:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, s.min_new_tokens, list(s.eos_token_ids)))
    if extra:
        procs.extend(extra)
    if s.do_sample:
        if s.temperature <= 0:
            raise InputError(f"temperature={s.temperature} must be > 0 when sampling: use do_sample=False for greedy")
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            procs.append(TopKLogitsWarper(top_k=s.top_k))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=s.top_p))
    return procs


def _prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: Settings) -> torch.Tensor:
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}: pass one mask value per prompt token"
            )
        return attention_mask.to(input_ids.device).long()
    # transformers' rule: pad tokens in the prompt (when pad != eos) are masked out.
    if s.pad_token_id not in s.eos_token_ids and bool((input_ids == s.pad_token_id).any()):
        logger.warning(
            "no attention_mask given and the prompt holds pad token %d: masking those positions; "
            "pass attention_mask to be explicit",
            s.pad_token_id,
        )
        return (input_ids != s.pad_token_id).long()
    return torch.ones_like(input_ids)


def _static_decoder(model, state: LongLlamaCache, mask, mode: str, plan: ExecutionPlan):
    if mode not in ("auto", "static", "dynamic"):
        raise InputError(f"decoder={mode!r} is not supported: use 'auto', 'static' or 'dynamic'")
    if mode == "dynamic" or (mode == "auto" and not plan.on_gpu):
        return None
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
    output_scores: bool = False,
    output_logits: bool = False,
    return_dict_in_generate: bool = False,
    use_cache: bool = True,
    progress=None,
    decoder: str = "auto",
    **settings,
):
    """Generate up to `max_new_tokens` after `input_ids` (b, n).

    Settings (explicit values win over the model's generation config): max_new_tokens / max_length,
    min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id (int or list),
    pad_token_id, num_beams (only 1). `last_context_length` sets the final prompt window kept in the local cache.
    `past_key_values` continues from an earlier call's cache (left unchanged). `streamer` gets `put(tokens)` /
    `end()` calls as tokens come; `progress(tokens_done)` is called after each window of the prompt.
    `decoder`: "static" decodes from fixed buffers (decode.py; replayed as a CUDA graph on GPUs), "dynamic" through
    the generic forward; "auto" (default) takes "static" on GPUs. Padded batches always decode dynamically.
    Returns the sequences (prompt included) or, with return_dict_in_generate, a
    GenerateOutput with `scores` (processed logits per step), `logits` (raw) and the final cache.
    """
    unknown = sorted(set(settings) - set(_SETTING_NAMES))
    if unknown:
        raise InputError(
            f"generate() got unsupported argument(s) {', '.join(unknown)}: see help(longllama.generate.generate)"
        )
    if not use_cache:
        raise InputError("use_cache=False is not supported by generate: the local cache is how LongLLaMA decodes")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise InputError(f"input_ids of shape {shape}: pass a non-empty (batch, n) tensor of prompt token ids")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    n = input_ids.shape[1]
    s = _settings(model, n, generation_config, settings)
    procs = _processors(s, n, logits_processor)
    past = past_key_values if past_key_values is not None else cache
    state = model.model.resolve_cache(past, True)
    mask = _prompt_mask(input_ids, attention_mask, s) if past is None else attention_mask
    positions = None
    if past is None:
        positions = mask.cumsum(-1) - 1  # left pads get -1; only differences matter (relative RoPE)
    if streamer is not None:
        streamer.put(input_ids.cpu())

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
    plan = model.plan
    static = _static_decoder(model, state, mask, decoder, plan)
    sequences, scores, raw = input_ids, [], []
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    eos = torch.tensor(s.eos_token_ids, device=device, dtype=torch.long)
    ahead = _Ahead(input_ids.shape[0], device) if static is not None else None
    # Temperature, top-k and top-p alone (the common case) are one kernel on GPUs (sampling.py); any other processor,
    # or scores asked for, takes transformers' warpers.
    warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    fused = s.do_sample and not output_scores and all(type(p) in warpers for p in procs)
    for step in range(s.max_new_tokens):
        kernel = fused and sampling.applies(logits, cpu=plan.interpret_kernels)  # it reads any float dtype
        if output_logits or not kernel:
            logits = logits.float()
        if output_logits:
            raw.append(logits)
        if kernel:
            token = sampling.sample(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        else:
            processed = procs(sequences, logits) if len(procs) else logits
            if output_scores:
                scores.append(processed)
            if s.do_sample:
                token = torch.multinomial(torch.softmax(processed, dim=-1), num_samples=1).squeeze(1)
            else:
                token = processed.argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, s.pad_token_id))
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        last = step == s.max_new_tokens - 1
        if ahead is not None and not last:
            # The next step goes to the GPU before the host waits for this token (streamer, end of sequence), so
            # the GPU never idles on the host; a step past the end is taken back (undo).
            logits, done = ahead.step(static, token, unfinished, streamer, check=len(eos) > 0)
            if done:
                break
            continue
        if streamer is not None:
            streamer.put(token.cpu())
        if last or not bool(unfinished.any()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model.model.run(
            token[:, None],
            cache=state,
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            last_context_length=last_context_length,
            validate=False,
        )
        logits = model.lm_head(out.hidden[:, -1])
        next_pos = next_pos + 1
    if static is not None:
        state = static.to_cache()
    if streamer is not None:
        streamer.end()
    if not return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(scores) if output_scores else None,
        logits=tuple(raw) if output_logits else None,
        cache=state,
    )
