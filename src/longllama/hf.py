"""transformers integration: PreTrainedModel classes, Auto* registration and checked loading.

Everything that touches transformers' model API lives here, kept thin: what the models do is lm.py's mixins (shared
with the plain classes the command line runs), the windows, the memory and generation plain PyTorch in their own
modules. Both names of the cache argument are accepted (`past_key_values`, and `cache` as transformers >= 5.24
calls it); outputs carry it as `cache` with `past_key_values` as an alias (a field named `past_key_values` would be
renamed by ModelOutput on 5.24 but not on 5.17).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from longllama import quantize, registration
from longllama.cache import CacheAlias, LongLlamaCache
from longllama.checkpoint import check_model_folder
from longllama.config import ConfigError, LongLlamaConfig
from longllama.errors import CheckpointError, InputError, LongLlamaError
from longllama.lm import (  # noqa: F401  (some re-exported: their home was this module)
    CausalLMMethods,
    LongLlamaCausalLMOutput,
    LongLlamaOutput,
    ModelMethods,
    _reject_unknown,
    causal_lm_loss,
    check_token_range,
    left_align,
    right_padding,
)


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    base_model_prefix = "model"
    # gradient_checkpointing_enable() flags LongLlamaModel (its `gradient_checkpointing` attribute), which then
    # recomputes decoder layers through recompute.py: layers write memory inside forward.
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    # Checkpoints written in the transformers 4.30 era carry rotary buffers; RoPE tables are computed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, with the folder checked first and load failures as one-line errors."""
        path = os.fspath(pretrained_model_name_or_path)
        check_model_folder(path)  # local folders only: nothing is downloaded
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")  # the seed README's spelling
        quantization = quantize.check_quantization(kwargs.pop("quantization", None))
        if quantize.is_quantized_folder(path):
            return quantize.load_from_folder(cls, path, quantization, args, kwargs)
        try:
            model = super().from_pretrained(path, *args, **kwargs)
        except LongLlamaError:
            raise
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"refused the weights in {path}: they hold pickled objects other than tensors, and .bin files are "
                "read with weights_only (no code runs); convert the checkpoint to safetensors where you trust it"
            ) from exc
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"cannot load the model in {path}: {first[:300]}; check that the folder is a complete LongLLaMA or "
                "LLaMA checkpoint (re-copy or re-convert it)"
            ) from exc
        model.config.check()
        quantize.quantize_model(model, quantization)  # on the device the weights were loaded to
        _ = model.base_model.plan  # for the device the weights were loaded to
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; a quantized model is written in torchao's safetensors format instead
        (quantize.save_quantized: config and weights)."""
        if getattr(self.config, "quantization", "none") != "none":
            return quantize.save_quantized(self, save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)


class LongLlamaModel(ModelMethods, LongLlamaPreTrainedModel):
    """Embeddings, decoder layers and final norm; `forward` reads inputs of any length in windows (lm.ModelMethods)."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self._build(config)
        self.post_init()
        _ = self.plan  # built now, so a traced call (torch.compile) finds it ready


class LongLlamaForCausalLM(CausalLMMethods, LongLlamaPreTrainedModel):
    """LongLLaMA with a language-model head; the interface of the reference (forward, generate, save/load;
    lm.CausalLMMethods)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def can_generate(cls) -> bool:
        return True  # our own `generate` (generate.py); this makes transformers load generation_config.json


@dataclass
class LongLlamaClassifierOutput(CacheAlias, ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: LongLlamaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LongLlamaForSequenceClassification(LongLlamaPreTrainedModel):
    """LongLLaMA with a `score` head read at the last non-pad token (docs/inference.md#other-entry-points: padding on
    either side; the last position when no pad id is set)."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LongLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

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
        return_dict: bool | None = None,
        cache=None,
        **kwargs,
    ) -> LongLlamaClassifierOutput:
        _reject_unknown(kwargs)
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
        )
        logits = self.score(out.hidden)  # (B, N, labels)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), self._last_index(input_ids, logits)]
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        return LongLlamaClassifierOutput(loss=loss, logits=pooled, cache=out.cache, hidden_states=out.all_hidden)

    def _last_index(self, input_ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        pad = self.config.pad_token_id
        if pad is None or input_ids is None:
            if logits.shape[0] > 1 and pad is None:
                raise InputError("batches need pad_token_id in the config to find each row's last token: set it")
            return torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device)
        real = input_ids.to(logits.device) != pad  # (B, N)
        positions = torch.arange(real.shape[-1], device=logits.device)
        # The last real token wherever the padding is: tokenizers pad on the left for generation.
        last = (positions * real).argmax(-1)
        return torch.where(real.any(-1), last, real.shape[-1] - 1)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = self.config.problem_type
        if kind is None:
            if self.num_labels == 1:
                kind = "regression"
            elif labels.dtype in (torch.long, torch.int):
                kind = "single_label_classification"
            else:
                kind = "multi_label_classification"
        if kind == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
        if kind == "single_label_classification":
            return F.cross_entropy(logits.float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification resolve
    `model_type: "longllama"` to these classes, and AutoTokenizer to the exact SentencePiece tokenizer (done when this
    module is imported; calling it again changes nothing). Imported from their own modules: this may run while
    transformers.models.auto's package is still importing modeling_auto (registration.py)."""
    from transformers.models.auto.modeling_auto import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    registration.register_config()
    AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LongLlamaConfig, LongLlamaForSequenceClassification, exist_ok=True)
    registration.register_tokenizer()


register_auto_classes()

__all__ = [
    "LongLlamaModel",
    "LongLlamaForCausalLM",
    "LongLlamaForSequenceClassification",
    "LongLlamaOutput",
    "LongLlamaCausalLMOutput",
    "register_auto_classes",
    "causal_lm_loss",
    "ConfigError",
]
