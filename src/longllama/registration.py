"""Registering the `longllama` model type with transformers' Auto classes, in two steps so that importing the
package stays light.

- At `import longllama`: AutoConfig and AutoTokenizer (the config and tokenizer classes import none of transformers'
  model machinery).
- The model classes (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification) need longllama.hf, whose
  PreTrainedModel base imports transformers' modeling utilities (seconds: torch.distributed, Dynamo, the
  quantizers). They are registered when longllama.hf is imported (any use of the classes, or
  `longllama.register_auto_classes()`), and when transformers' Auto classes build a LongLlamaConfig
  (`models_if_built_by_auto`): `AutoModelForCausalLM.from_pretrained(folder)` builds the config through AutoConfig
  before it looks the model class up, so it finds ours.
"""

from __future__ import annotations

import os
import sys

_AUTO_FOLDER = os.sep + os.path.join("transformers", "models", "auto") + os.sep


def register_config_and_tokenizer() -> None:
    """AutoConfig resolves `model_type: "longllama"` to LongLlamaConfig; AutoTokenizer resolves it (and
    `tokenizer_class: LongLlamaTokenizer`) to the exact SentencePiece tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from longllama.config import LongLlamaConfig
    from longllama.tokenizer import LongLlamaTokenizer

    AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)
    AutoTokenizer.register(LongLlamaConfig, tokenizer_class=LongLlamaTokenizer, exist_ok=True)


def models_if_built_by_auto() -> None:
    """Register the model classes (by importing longllama.hf) where one of transformers' Auto classes is building a
    config (a caller's frame is in transformers/models/auto/)."""
    if "longllama.hf" in sys.modules:
        return
    frame = sys._getframe(1)
    while frame is not None:
        if _AUTO_FOLDER in frame.f_code.co_filename:
            import longllama.hf  # noqa: F401  (registers at import)

            return
        frame = frame.f_back
