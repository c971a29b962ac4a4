"""The whole LongLLaMA model over its layers (model.py): embeddings, decoder layers, final norm and the language-model
head, reading inputs of any length in windows (windows.py), with the reference's forward and generate arguments.

The behaviour lives in two mixins, `ModelMethods` and `CausalLMMethods`, shared by two families of classes with the
same parameter names: the plain nn.Modules here (`LongLlamaBody`, `LongLlamaLM`), which the command line runs, and
transformers' PreTrainedModel classes in hf.py (`LongLlamaModel`, `LongLlamaForCausalLM`), which add saving, the
Auto classes and the libraries built on them. Nothing here imports transformers' model classes: a process that
needs none starts seconds sooner (docs/cold-start.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from longllama.cache import CacheAlias, LongLlamaCache
from longllama.config import LongLlamaConfig
from longllama.errors import InputError
from longllama.model import DecoderLayer, RMSNorm, RotaryTable
from longllama.plan import ExecutionPlan, build_plan, check_changes, config_choices
from longllama.recompute import checkpointing
from longllama.windows import TokenEmbeddings, WindowsOutput, default_positions, run_windows

logger = logging.getLogger(__name__)


@dataclass
class LongLlamaOutput(CacheAlias, ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: LongLlamaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class LongLlamaCausalLMOutput(CacheAlias, ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: LongLlamaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _recomputing(run: Callable[..., WindowsOutput]) -> Callable[..., WindowsOutput]:
    """LongLlamaModel.run with the decoder layers recomputed in backward while gradient checkpointing is on."""

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        with self._checkpointing():
            return run(self, *args, **kwargs)

    return wrapper


class ModelMethods:
    """What LongLlamaModel does (embeddings, decoder layers and final norm; `forward` reads inputs of any length in
    windows), for an nn.Module that calls `_build(config)`: the plain `LongLlamaBody` and transformers'
    `longllama.hf.LongLlamaModel`."""

    # Set by transformers' gradient_checkpointing_enable / _disable, with the checkpoint function to use.
    gradient_checkpointing = False
    _gradient_checkpointing_func = None

    def _build(self, config: LongLlamaConfig) -> None:
        config.check()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = RotaryTable(config.head_dim, config.rope_theta, config.context_window)
        self._plan: tuple[tuple, ExecutionPlan] | None = None  # (what it was built from, the plan)
        self._plan_changes: dict = {}

    @property
    def plan(self) -> ExecutionPlan:
        """The ExecutionPlan for the device the weights are on: built once from the config, the device and what is
        installed, with the changes of `set_plan`; built anew when one of those changes (a move to another device,
        a new attn_impl in the config)."""
        config = self.config
        key = (
            str(self.embed_tokens.weight.device),
            config.attn_impl,
            config.torch_attention,
            config.compile_elementwise,
            config.quantization,
            *config_choices(config).values(),
        )
        if self._plan is None or self._plan[0] != key:
            if torch.compiler.is_compiling():
                raise InputError(
                    f"the execution plan was made for {self._plan[0] if self._plan else None}, the model is now {key}: "
                    "call the model (or read model.plan) once after the change, before tracing it"
                )
            self._plan = (key, build_plan(config, self.embed_tokens.weight.device, **self._plan_changes))
        return self._plan[1]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_plan_changes"):  # moved (to(), cuda(), ...): plan for the new device before any trace
            _ = self.plan
        return out

    def shard_memory(self, group=None) -> ExecutionPlan:
        """Split every memory layer's memory over the processes of a torch.distributed `group` (None: the default
        group): each process stores every N-th append and memory attention is merged across them by log-sum-exp, so N
        processes hold N times the memory (sharding.py). Every process must run the same calls on the same inputs
        (torchrun). With mem_retrieval 'blocks' each process reads its own slice's best blocks; mem_top_k is refused.
        Returns the plan."""
        from longllama.sharding import MemoryShard, check_readable

        check_readable(self.config)
        self._plan_changes = {**self._plan_changes, "memory_shard": MemoryShard.of(group)}
        self._plan = None
        return self.plan

    def set_plan(self, **changes) -> ExecutionPlan:
        """Change execution choices (ExecutionPlan fields, e.g. memory_kernel="cudnn", window_group_tokens=4096):
        validated now (a one-line error names a bad field or value), kept for later devices too. Returns the plan."""
        check_changes(changes)  # unknown fields and bad values fail here, before anything changes
        self._plan_changes = {**self._plan_changes, **changes}
        self._plan = None
        return self.plan

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self) -> LongLlamaCache:
        return LongLlamaCache(self.config.num_hidden_layers)

    @_recomputing
    def run(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        cache: LongLlamaCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_context_length: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        progress=None,
        keep_last: int = 0,
        validate: bool = True,
        cross_batch=None,
        fill_memories: int | None = None,
    ):
        """Like `forward`, but extends `cache` in place (generation owns its cache and needs no copy).
        `progress(tokens_done)` is called after each window of the input; `keep_last` > 0 returns only the hidden
        states of the last positions; `validate=False` skips the token-id range check (ids the model produced);
        `fill_memories` = k fills only the first k memory layers' memories of a fresh cache (windows.run_windows)."""
        embeds = self._embed(input_ids, inputs_embeds, validate=validate)
        b, n, _ = embeds.shape
        fresh = cache.local_length == 0 and cache.memory_length == 0
        if position_ids is None:
            position_ids = default_positions(cache, b, n, embeds.device)
        lcl = self.config.last_context_length if last_context_length is None else int(last_context_length)
        if lcl <= 0:
            raise InputError(f"last_context_length={lcl} must be a positive number of tokens")
        return run_windows(
            self,
            embeds,
            plan=self.plan,
            cache=cache,
            fresh=fresh,
            attention_mask=attention_mask,
            positions=position_ids.to(embeds.device).long(),
            use_cache=use_cache,
            default_use_cache=self.config.use_cache,
            window=self.config.context_window,
            last_context_length=lcl,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            progress=progress,
            keep_last=keep_last,
            cross_batch=cross_batch,
            fill_memories=fill_memories,
        )

    def _checkpointing(self) -> contextlib.AbstractContextManager:
        """Decoder layers recomputed in backward while gradient checkpointing is on (gradient_checkpointing_enable),
        in training mode with gradients; `config.gradient_checkpoint_every_ith` picks the layers."""
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return contextlib.nullcontext()
        return checkpointing(
            self.layers, every=self.config.gradient_checkpoint_every_ith, checkpoint=self._gradient_checkpointing_func
        )

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, *, validate: bool = True
    ) -> torch.Tensor | TokenEmbeddings:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
                raise InputError(
                    f"inputs_embeds has shape {tuple(inputs_embeds.shape)}: expected (batch, n > 0, hidden)"
                )
            return inputs_embeds
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(
                f"input_ids has shape {tuple(input_ids.shape)}: pass a non-empty (batch, n) tensor of token ids"
            )
        if validate and not torch.compiler.is_compiling():  # a traced graph cannot stop on a value it has not read
            check_token_range(int(input_ids.min()), int(input_ids.max()), self.config.vocab_size)
        return TokenEmbeddings(self.embed_tokens, input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_context_length: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache=None,
        **kwargs,
    ) -> LongLlamaOutput:
        _reject_unknown(kwargs)
        state = self.resolve_cache(past_key_values if past_key_values is not None else cache, use_cache)
        out = self.run(
            input_ids,
            cache=state,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            last_context_length=last_context_length,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        return LongLlamaOutput(
            last_hidden_state=out.hidden, cache=out.cache, hidden_states=out.all_hidden, attentions=out.attentions
        )

    def resolve_cache(self, past, use_cache: bool | None) -> LongLlamaCache:
        """A private copy of the caller's cache (legacy tuples are converted), or a new one."""
        if past is None:
            return self.new_cache()
        if use_cache is False:
            raise InputError(
                "past_key_values was given with use_cache=False: pass use_cache=True (or None) to continue"
            )
        if isinstance(past, LongLlamaCache):
            state = past.fork()
        elif isinstance(past, (tuple, list)):
            state = LongLlamaCache.from_legacy(
                past, mem_layers=self.config.mem_layers, mem_dtype=self.config.memory_dtype
            )
        else:
            raise InputError(
                f"past_key_values of type {type(past).__name__} is not supported: pass the "
                "LongLlamaCache (or tuple) returned by this model"
            )
        if len(state.layers) != self.config.num_hidden_layers:
            raise InputError(
                f"past_key_values has {len(state.layers)} layers, the model has "
                f"{self.config.num_hidden_layers}: pass the past returned by this model"
            )
        return state


def check_token_range(lo: int, hi: int, vocab_size: int) -> None:
    """A one-line InputError where token ids from `lo` to `hi` do not all lie in the vocabulary [0, vocab_size)."""
    if lo < 0 or hi >= vocab_size:
        raise InputError(
            f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size}): tokenize with this "
            "model's tokenizer"
        )


_IGNORED_KWARGS = {"return_dict", "logits_to_keep", "num_items_in_batch", "token_type_ids"}


def _reject_unknown(kwargs: dict) -> None:
    unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
    if unknown:
        raise InputError(f"unexpected argument(s) {', '.join(unknown)}: see help(LongLlamaForCausalLM.forward)")


class CausalLMMethods:
    """What LongLlamaForCausalLM does (LongLLaMA with a language-model head; the reference's forward and generate),
    for an nn.Module with `model` (ModelMethods) and `lm_head`: the plain `LongLlamaLM` and transformers'
    `longllama.hf.LongLlamaForCausalLM`."""

    @property
    def plan(self) -> ExecutionPlan:
        """How the model runs on its device (LongLlamaModel.plan)."""
        return self.model.plan

    def shard_memory(self, group=None) -> ExecutionPlan:
        """Split the memory over the processes of `group` (LongLlamaModel.shard_memory)."""
        return self.model.shard_memory(group)

    def set_plan(self, **changes) -> ExecutionPlan:
        """Change execution choices (LongLlamaModel.set_plan)."""
        return self.model.set_plan(**changes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_context_length: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache=None,
        cross_batch=None,
        **kwargs,
    ) -> LongLlamaCausalLMOutput:
        """Logits of every position (or of the last `logits_to_keep`), the loss if `labels` are given, and the
        cache to continue from (`past_key_values`). The caller's cache is never modified.

        `cross_batch` (FoT training, see cross_batch.py): memory layers attend to keys of other batch entries; the
        input is then read as one window (at most the context window long), without a cache."""
        _reject_unknown(kwargs)
        if cross_batch is not None:
            n = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if n > self.config.context_window:
                raise InputError(
                    f"cross_batch reads one window: got {n} tokens, the window is "
                    f"{self.config.context_window}: pass shorter training sequences"
                )
            if past_key_values is not None or cache is not None:
                raise InputError("cross_batch reads one window without a cache: do not pass past_key_values")
            if attention_mask is not None and not bool(attention_mask.all()):
                raise InputError(
                    "cross_batch takes unpadded batches (other entries' padding would become memory): "
                    "pack documents without padding"
                )
            last_context_length, use_cache = n, False
        state = self.model.resolve_cache(past_key_values if past_key_values is not None else cache, use_cache)
        out = self.model.run(
            input_ids,
            cache=state,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            last_context_length=last_context_length,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            keep_last=int(logits_to_keep or 0),
            cross_batch=cross_batch,
        )
        hidden = out.hidden if not logits_to_keep else out.hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise InputError("labels need the logits of every position: do not pass logits_to_keep with labels")
            loss = causal_lm_loss(logits, labels)
        return LongLlamaCausalLMOutput(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.all_hidden, attentions=out.attentions
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        """Greedy, sampled or beam-search decoding with transformers' generation arguments (see
        `longllama.generate.generate`).

        A right-padded batch (pads after a row's prompt, as tokenizers pad by default) is read left-aligned, each
        row's pads moved in front of its prompt, so every row continues its own last token; the sequences returned
        start with the prompts exactly as given."""
        from longllama.generate import generate

        mask = kwargs.get("attention_mask")
        moved = right_padding(input_ids, mask) if isinstance(input_ids, torch.Tensor) else None
        if moved is None:
            return generate(self, input_ids, **kwargs)
        logger.info("right-padded prompts: generating from them left-aligned")
        aligned_ids, aligned_mask = left_align(input_ids, mask, moved)
        out = generate(self, aligned_ids, **{**kwargs, "attention_mask": aligned_mask})
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        rows = sequences.shape[0] // input_ids.shape[0]  # several sequences per prompt (num_return_sequences)
        sequences[:, : input_ids.shape[1]] = input_ids.to(sequences.device).repeat_interleave(rows, dim=0)
        return out

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """The score of each generated token (batch * num_return_sequences, generated) from `generate`'s
        return_dict_in_generate output, as transformers computes it (its GenerationMixin method, which reads only
        the outputs and the vocabulary size, called on this model)."""
        from transformers.generation import GenerationMixin

        return GenerationMixin.compute_transition_scores(self, sequences, scores, beam_indices, normalize_logits)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: LongLlamaCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """The `forward` arguments of one decoding step, as the reference built them (docs/inference.md#generation):
        with a cache only the last token is read; positions come from the attention mask (cumulative sum - 1, so
        left pads sit at -1), the last one with a cache. `attention_mask` covers cached and new tokens, as `forward`
        expects. Wrappers such as peft's PeftModelForCausalLM call it; `generate` builds the same steps itself."""
        past = past_key_values if past_key_values is not None else kwargs.get("cache")
        if isinstance(past, LongLlamaCache):
            cached = bool(past.local_length or past.memory_length)
        else:
            cached = bool(past)  # the reference's tuples
        if cached:
            input_ids = input_ids[:, -1:]
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids[:, -input_ids.shape[1] :]
        inputs = (
            {"inputs_embeds": inputs_embeds} if inputs_embeds is not None and not cached else {"input_ids": input_ids}
        )
        inputs.update(
            position_ids=position_ids,
            past_key_values=past,
            attention_mask=attention_mask,
            use_cache=kwargs.get("use_cache"),
            last_context_length=kwargs.get("last_context_length"),
        )
        return inputs


def right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(b,) how many masked positions end each row, or None when no row ends with one (left-padded, unpadded or
    no mask). A row with nothing visible is refused."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
        return None  # generate reports malformed masks itself
    visible = attention_mask.to(torch.bool)
    if bool(visible[:, -1].all()):
        return None
    if not bool(visible.any(dim=1).all()):
        raise InputError("a prompt row is all padding (attention_mask all 0): drop that row or give it a token")
    n = visible.shape[1]
    last = n - 1 - visible.flip(1).long().argmax(dim=1)  # index of each row's last visible token
    return n - 1 - last


def left_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, trailing: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row right by its `trailing` masked positions, so they come first (left padding)."""
    n = input_ids.shape[1]
    index = (torch.arange(n, device=input_ids.device)[None, :] - trailing.to(input_ids.device)[:, None]) % n
    return input_ids.gather(1, index), attention_mask.gather(1, index.to(attention_mask.device))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring -100 (in fp32)."""
    if labels.shape != logits.shape[:2]:
        raise InputError(
            f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}: "
            "pass one label per input token (-100 to ignore)"
        )
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=-100,
    )


class LongLlamaBody(ModelMethods, nn.Module):
    """LongLlamaModel as a plain nn.Module: the same submodules, parameter names and forward, without transformers'
    model classes (whose import costs seconds). Built for loading (checkpoint.load_pretrained): its parameters keep
    PyTorch's default initialisation until the checkpoint's weights replace them."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.config = config
        self._build(config)
        _ = self.plan  # built now, so a traced call (torch.compile) finds it ready


class LongLlamaLM(CausalLMMethods, nn.Module):
    """LongLlamaForCausalLM as a plain nn.Module (the command line's model): the same parameter names, forward and
    generate, and what generation reads of transformers' API (config, generation_config, device, dtype,
    tie_weights), without importing transformers' model classes. Saving, Auto classes, peft and lm-eval want
    `longllama.LongLlamaForCausalLM`, which loads the same folders."""

    config_class = LongLlamaConfig

    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.config = config
        self.model = LongLlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = None  # checkpoint.load_pretrained sets the folder's
        self.tie_weights()

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def tie_weights(self) -> None:
        """lm_head shares the embeddings' weight where the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
