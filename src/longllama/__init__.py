"""longllama: LongLLaMA / Focused Transformer inference and training on current PyTorch and transformers.

Importing the package registers the `longllama` model type with transformers' Auto classes, so that
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(folder)` load LongLLaMA checkpoints with no remote code.
"""

from longllama.cache import LongLlamaCache
from longllama.config import LongLlamaConfig
from longllama.hf import (
    LongLlamaForCausalLM,
    LongLlamaForSequenceClassification,
    LongLlamaModel,
    register_auto_classes,
)
from longllama.memory import MemoryCache

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaForSequenceClassification",
    "LongLlamaModel",
    "LongLlamaCache",
    "MemoryCache",
    "__version__",
]
