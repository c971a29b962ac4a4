"""longllama: LongLLaMA / Focused Transformer inference and training on current PyTorch and transformers.

Importing the package registers the `longllama` model type with transformers' Auto classes, so that
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(folder)` load LongLLaMA checkpoints with no remote code.
It also points the compilers' caches (Triton, Inductor, FlashAttention 4) into one folder where the user has not
chosen theirs (longllama.caches), first, before torch is imported: some libraries fix their folder at import.
"""

import logging

from longllama import caches

caches.configure()

# torchao (the [quant] extra), which transformers imports whenever it is installed, logs notices at import where its
# optional compiled extensions do not load (CPU builds of torch) and registers enums torch's pytree warns about:
# kept off stderr (errors still show), before the imports below bring it in.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from longllama.cache import LongLlamaCache  # noqa: E402
from longllama.config import LongLlamaConfig  # noqa: E402
from longllama.hf import (  # noqa: E402
    LongLlamaForCausalLM,
    LongLlamaForSequenceClassification,
    LongLlamaModel,
    register_auto_classes,
)
from longllama.memory import MemoryCache  # noqa: E402

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
