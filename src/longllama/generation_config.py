"""transformers' generation vocabulary for LongLLaMA's `generate`: one merged GenerationConfig, the logits processors
and the stopping criteria it asks for (docs/inference.md, Generation).

Priority as in transformers: explicit arguments, then `generation_config=`, then the model's generation config
(generation_config.json), then the defaults below. The processors are transformers' public classes, built in
transformers' order (its own builder is a private method of GenerationMixin, which LongLLaMA does not inherit).
Options LongLLaMA does not implement are refused with a one-line InputError naming the alternative; a field left
at its default is never an error.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from longllama.errors import InputError

# Values that fields left unset take: transformers' global defaults (sampling keeps the 50 best tokens unless top_k
# says otherwise, as transformers and the reference's generation did).
DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "use_cache": True,
}

# Fields LongLLaMA does not implement: (values that mean "off", what to use instead).
UNSUPPORTED = {
    "penalty_alpha": ((None, 0, 0.0), "contrastive search is not supported: use num_beams > 1 or do_sample=True"),
    "num_beam_groups": (
        (None, 1),
        "diverse (group) beam search is not supported: use num_beams with num_beam_groups=1",
    ),
    "diversity_penalty": ((None, 0, 0.0), "diverse beam search is not supported: leave diversity_penalty at 0"),
    "constraints": ((None,), "constrained beam search is not supported: use bad_words_ids or sequence_bias"),
    "force_words_ids": ((None,), "forced words are not supported: use sequence_bias to favour them"),
    "watermarking_config": ((None,), "watermarking is not supported: apply a watermark processor via logits_processor"),
    "prompt_lookup_num_tokens": ((None,), "prompt-lookup decoding is not supported: drop prompt_lookup_num_tokens"),
    "assistant_early_exit": ((None,), "assisted decoding is not supported: drop assistant_early_exit"),
    "is_assistant": ((None, False), "LongLLaMA cannot serve as an assistant model: leave is_assistant unset"),
    "cache_implementation": ((None,), "LongLLaMA has its own cache: drop cache_implementation"),
    "cache_config": ((None,), "LongLLaMA has its own cache: drop cache_config"),
    "guidance_scale": ((None, 1, 1.0), "classifier-free guidance is not supported: drop guidance_scale"),
    "low_memory": ((None, False), "low_memory beam search is not supported: drop low_memory"),
    "dola_layers": ((None,), "DoLa decoding is not supported: drop dola_layers"),
    "token_healing": ((None, False), "token healing is not supported: drop token_healing"),
    "use_mtp": ((None, False), "multi-token prediction is not supported: drop use_mtp"),
    "output_attentions": ((None, False), "generate returns no attentions: call model(...) with output_attentions"),
    "output_hidden_states": (
        (None, False),
        "generate returns no hidden states: call model(...) with output_hidden_states",
    ),
    "use_cache": ((None, True), "generate decodes through the local cache: drop use_cache=False"),
}

# generate() keyword arguments that are not GenerationConfig fields and that LongLLaMA refuses.
UNSUPPORTED_KWARGS = {
    "assistant_model": "assisted decoding is not supported: call generate without assistant_model",
    "assistant_tokenizer": "assisted decoding is not supported: call generate without assistant_tokenizer",
    "negative_prompt_ids": "classifier-free guidance is not supported: drop negative_prompt_ids",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported: drop negative_prompt_attention_mask",
    "inputs_embeds": "generate reads token ids: pass input_ids",
    "custom_generate": "custom generation loops are not supported: call your loop with the model directly",
}


@dataclass
class Plan:
    """What one generate call does, from the merged config."""

    config: GenerationConfig  # every field set (DEFAULTS filled in)
    max_new_tokens: int
    max_length: int  # prompt + max_new_tokens
    eos: torch.Tensor | None  # (k,) int64 on the model's device
    pad_token_id: int | None  # transformers' rule: eos[0] when unset and eos is known


def merged_config(model, generation_config, kwargs: dict, prompt_len: int) -> GenerationConfig:
    """The GenerationConfig of one call (priority in the module docstring); unknown names are an InputError."""
    for name, why in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise InputError(f"{name}: {why}")
    if kwargs.get("synced_gpus"):
        raise InputError("synced_gpus=True is not supported: generate each rank's batch on its own")
    kwargs = {k: v for k, v in kwargs.items() if k not in UNSUPPORTED_KWARGS and k not in ("synced_gpus",)}
    use_model_defaults = kwargs.pop("use_model_defaults", None)
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    model_config = getattr(model, "generation_config", None)
    if model_config is not None and use_model_defaults is not False:
        _fill(config, model_config.to_dict())
    try:
        unknown = config.update(**kwargs)
    except ValueError as exc:  # transformers' own validation of the values
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{first} Pass a valid value.") from None
    if unknown:
        names = ", ".join(sorted(unknown))
        raise InputError(f"generate() got unsupported argument(s) {names}: see help(longllama.generate.generate)")
    _fill(config, DEFAULTS)
    for name, (off, why) in UNSUPPORTED.items():
        if getattr(config, name, None) not in off:
            raise InputError(f"{name}={getattr(config, name)!r}: {why}")
    return config


def _fill(config: GenerationConfig, values: dict) -> None:
    for key, value in values.items():
        if key.startswith("_") or key == "transformers_version":
            continue
        if getattr(config, key, None) is None and value is not None:
            setattr(config, key, value)


def plan_of(config: GenerationConfig, prompt_len: int, device: torch.device) -> Plan:
    """Lengths and special tokens of a merged config, checked."""
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = config.max_length - prompt_len
    if max_new < 1:
        raise InputError(
            f"max_new_tokens={max_new} must be at least 1 (max_length={config.max_length}, prompt {prompt_len} "
            "tokens): pass max_new_tokens"
        )
    eos = config.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    pad = config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    beams, n_return = int(config.num_beams), int(config.num_return_sequences)
    if beams < 1 or n_return < 1:
        raise InputError(f"num_beams={beams}, num_return_sequences={n_return}: both must be at least 1")
    if n_return > beams and (beams > 1 or not config.do_sample):
        raise InputError(
            f"num_return_sequences={n_return} needs num_beams >= {n_return} (beam search) or do_sample=True: "
            "raise num_beams or sample"
        )
    if config.early_stopping not in (True, False, "never"):
        raise InputError(f"early_stopping={config.early_stopping!r}: use True, False or 'never'")
    if config.do_sample and float(config.temperature) <= 0:
        raise InputError(f"temperature={config.temperature} must be > 0 when sampling: use do_sample=False for greedy")
    return Plan(
        config=config,
        max_new_tokens=int(max_new),
        max_length=prompt_len + int(max_new),
        eos=eos_tensor,
        pad_token_id=None if pad is None else int(pad),
    )


def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def logits_processors(
    plan: Plan,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    extra,
    prefix_allowed_tokens_fn=None,
) -> lp.LogitsProcessorList:
    """transformers' processors for the merged config, in transformers' order; `extra` (the caller's
    logits_processor) replaces a built one of the same type, else comes after them, before the sampling warpers.
    input_ids: the prompt rows as decoding sees them (expanded for beams / returned sequences)."""
    c, eos = plan.config, plan.eos
    device = str(input_ids.device)
    n = input_ids.shape[1]
    procs = lp.LogitsProcessorList()
    if c.sequence_bias is not None:
        procs.append(lp.SequenceBiasLogitsProcessor(sequence_bias=c.sequence_bias))
    if c.encoder_repetition_penalty != 1.0:
        procs.append(lp.EncoderRepetitionPenaltyLogitsProcessor(c.encoder_repetition_penalty, input_ids))
    if c.repetition_penalty != 1.0:
        penalty = None
        if mask is not None and _accepts(lp.RepetitionPenaltyLogitsProcessor, "prompt_ignore_length"):
            try:  # left pads are not repetitions (transformers >= 5.24 passes them per row)
                ignore = (mask != 0).int().argmax(dim=1)
                penalty = lp.RepetitionPenaltyLogitsProcessor(c.repetition_penalty, prompt_ignore_length=ignore)
            except ValueError:  # older releases take one int for the batch, and their generate passes none
                penalty = None
        procs.append(penalty or lp.RepetitionPenaltyLogitsProcessor(c.repetition_penalty))
    if c.no_repeat_ngram_size > 0:
        procs.append(lp.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
    if c.encoder_no_repeat_ngram_size > 0:
        procs.append(lp.EncoderNoRepeatNGramLogitsProcessor(c.encoder_no_repeat_ngram_size, input_ids))
    if c.bad_words_ids is not None:
        procs.append(lp.NoBadWordsLogitsProcessor(c.bad_words_ids, eos))
    if eos is not None and c.min_length > 0:
        procs.append(lp.MinLengthLogitsProcessor(c.min_length, eos, device=device))
    if eos is not None and (c.min_new_tokens or 0) > 0:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(n, c.min_new_tokens, eos, device=device))
    if prefix_allowed_tokens_fn is not None:
        rows = max(int(c.num_beams), int(c.num_return_sequences))
        procs.append(lp.PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, rows))
    if c.forced_bos_token_id is not None:
        procs.append(lp.ForcedBOSTokenLogitsProcessor(c.forced_bos_token_id))
    if c.forced_eos_token_id is not None:
        procs.append(lp.ForcedEOSTokenLogitsProcessor(plan.max_length, c.forced_eos_token_id, device=device))
    if c.remove_invalid_values:
        procs.append(lp.InfNanRemoveLogitsProcessor())
    if c.exponential_decay_length_penalty is not None:
        procs.append(lp.ExponentialDecayLengthPenalty(c.exponential_decay_length_penalty, eos, n))
    if c.suppress_tokens is not None:
        procs.append(lp.SuppressTokensLogitsProcessor(c.suppress_tokens, device=device))
    if c.begin_suppress_tokens is not None:
        procs.append(lp.SuppressTokensAtBeginLogitsProcessor(c.begin_suppress_tokens, n, device=device))
    procs = _merged(procs, extra)
    if c.do_sample:
        # Beam sampling keeps one more token than there are eos tokens, so a beam can always continue.
        keep = (1 + (0 if eos is None else eos.numel())) if c.num_beams > 1 else 1
        if c.num_beams > 1 and eos is None:
            keep = 2
        if c.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(float(c.temperature)))
        if getattr(c, "top_h", None) is not None:
            if not hasattr(lp, "TopHLogitsWarper"):
                raise InputError("top_h needs a newer transformers: drop top_h or upgrade transformers")
            procs.append(lp.TopHLogitsWarper(top_h=c.top_h))
        if c.top_k:
            procs.append(lp.TopKLogitsWarper(top_k=int(c.top_k), min_tokens_to_keep=keep))
        if c.top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(top_p=float(c.top_p), min_tokens_to_keep=keep))
        if c.min_p is not None:
            procs.append(lp.MinPLogitsWarper(min_p=float(c.min_p), min_tokens_to_keep=keep))
        if c.typical_p < 1.0:
            procs.append(lp.TypicalLogitsWarper(mass=float(c.typical_p), min_tokens_to_keep=keep))
        if 0.0 < c.epsilon_cutoff < 1.0:
            procs.append(lp.EpsilonLogitsWarper(epsilon=float(c.epsilon_cutoff), min_tokens_to_keep=keep))
        if 0.0 < c.eta_cutoff < 1.0:
            procs.append(lp.EtaLogitsWarper(epsilon=float(c.eta_cutoff), min_tokens_to_keep=keep, device=device))
    if c.renormalize_logits:
        procs.append(lp.LogitNormalization())
    return procs


def _merged(built, extra):
    """transformers' merge: a caller's processor / criterion replaces a built one of the same type; the others
    follow the built ones."""
    if not extra:
        return built
    merged = type(built)()
    for item in built:
        mine = next((e for e in extra if type(e) is type(item)), None)
        merged.append(item if mine is None else mine)
    merged.extend(e for e in extra if e not in merged)
    return merged


def stopping_criteria(plan: Plan, extra, tokenizer, *, with_length_and_eos: bool) -> StoppingCriteriaList:
    """The stopping criteria of the merged config plus the caller's (`extra`: a StoppingCriteriaList, a list of
    criteria, or None). The decoding loops count length and check eos themselves (no host sync for eos-only
    generation); `with_length_and_eos` adds transformers' MaxLengthCriteria / EosTokenCriteria (beam search)."""
    c = plan.config
    criteria = StoppingCriteriaList()
    if with_length_and_eos:
        criteria.append(MaxLengthCriteria(max_length=plan.max_length))
    if c.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=c.max_time))
    if c.stop_strings is not None:
        if tokenizer is None:
            raise InputError("stop_strings need the tokenizer: pass tokenizer= to generate")
        criteria.append(StopStringCriteria(stop_strings=c.stop_strings, tokenizer=tokenizer))
    if with_length_and_eos and plan.eos is not None:
        criteria.append(EosTokenCriteria(eos_token_id=plan.eos))
    if extra is not None:
        if isinstance(extra, StoppingCriteria) or callable(extra) and not isinstance(extra, (list, tuple)):
            extra = [extra]
        criteria = _merged(criteria, StoppingCriteriaList(list(extra)))
    return criteria
