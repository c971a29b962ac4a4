"""longllama: LongLLaMA / Focused Transformer inference and training on current PyTorch and transformers.

Importing the package registers the `longllama` model type with transformers' Auto classes, so that
`AutoConfig` / `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(folder)` load LongLLaMA checkpoints with no
remote code: with each Auto module when it is imported (registration.py), so that a process that uses none of them,
such as the command line, imports neither them nor transformers' model classes (seconds). The package's names
(LongLlamaForCausalLM, ...) are imported on first access.
It also points the compilers' caches (Triton, Inductor, FlashAttention 4) into one folder where the user has not
chosen theirs (longllama.caches), first, before torch is imported: some libraries fix their folder at import.
"""

import importlib
import logging

from longllama import caches

caches.configure()

# torchao (the [quant] extra), which transformers imports whenever it is installed, logs notices at import where its
# optional compiled extensions do not load (CPU builds of torch) and registers enums torch's pytree warns about:
# kept off stderr (errors still show), before the imports below bring it in.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from longllama import registration  # noqa: E402

__version__ = "0.1.0"

registration.install()

_HOMES = {
    "LongLlamaConfig": "longllama.config",
    "LongLlamaCache": "longllama.cache",
    "MemoryCache": "longllama.memory",
    "LongLlamaForCausalLM": "longllama.hf",
    "LongLlamaForSequenceClassification": "longllama.hf",
    "LongLlamaModel": "longllama.hf",
    "register_auto_classes": "longllama.hf",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'longllama' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaForSequenceClassification",
    "LongLlamaModel",
    "LongLlamaCache",
    "MemoryCache",
    "__version__",
]
