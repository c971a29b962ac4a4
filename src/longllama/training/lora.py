"""LoRA training through peft (docs/finetuning.md#lora): adapters on the chosen projections, the rest frozen, and the
export of the result as a merged model folder or as a peft adapter folder."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from longllama.training.config import LoraSettings, ModelSettings, TrainError

INSTALL_HINT = "pip install 'longllama[lora]'"


def require_peft() -> None:
    """Fail in one line, naming the install command, where peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise TrainError(f"lora needs the peft package, which is not installed: {INSTALL_HINT}") from None


def apply_lora(model: nn.Module, lora: LoraSettings, settings: ModelSettings) -> nn.Module:
    """`model` (a LongLlamaForCausalLM) as a peft PeftModelForCausalLM with trainable adapters on `lora.targets`."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = sorted(set(lora.targets) - names)
    if unknown:
        raise TrainError(
            f"lora.targets names {', '.join(unknown)}, not a linear layer of the model: choose from "
            f"{', '.join(sorted(names))}"
        )
    config = LoraConfig(
        task_type="CAUSAL_LM",  # then AutoPeftModelForCausalLM loads the adapter through AutoModelForCausalLM
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
    )
    base = _base_folder(lora, settings)
    peft_model = get_peft_model(model, config)
    if base is not None:  # peft takes the name the weights were loaded under; the adapter names the resolved folder
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = base
    return peft_model


def _base_folder(lora: LoraSettings, settings: ModelSettings) -> str | None:
    """The folder an adapter export names as its base: a LongLLaMA checkpoint (a LLaMA folder would load without
    memory layers)."""
    if settings.path is None:
        return None
    folder = Path(settings.path).resolve()
    if lora.export == "adapter":
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if kind != "longllama":
            raise TrainError(
                f"lora.export=adapter over {folder}, a {kind!r} checkpoint: the adapter's base must be a LongLLaMA "
                "folder (convert it with `longllama convert` first), or use lora.export=merged"
            )
    return str(folder)


def is_peft(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "peft_config")


def merged(model: nn.Module) -> nn.Module:
    """The plain LongLlamaForCausalLM with the adapters added into its weights (the peft wrapper is undone)."""
    return getattr(model, "module", model).merge_and_unload()
