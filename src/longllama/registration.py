"""Registering the `longllama` model type with transformers' Auto classes without importing them.

transformers' Auto modules are heavy to import in some releases (5.17's pull in torch.distributed.tensor, Dynamo
and scikit-learn: 5.4 s on one GPU machine), and a command-line process never uses them. So `import longllama`
registers with each Auto module when that module is imported, or at once where it already is:

    transformers.models.auto.configuration_auto  AutoConfig: model_type "longllama" -> LongLlamaConfig
    transformers.models.auto.tokenization_auto   AutoTokenizer: LongLlamaConfig (and the name LongLlamaTokenizer)
                                                 -> the exact SentencePiece tokenizer
    transformers.models.auto.modeling_auto       AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification
                                                 -> longllama.hf's classes (imported then)

`import longllama` followed by `AutoModelForCausalLM.from_pretrained(folder)` therefore works as if the classes had
been registered at import. The hook is a finder on sys.meta_path that wraps the loader of those three modules only
and removes itself once all have run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

_AUTO = "transformers.models.auto."


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from longllama.config import LongLlamaConfig

    AutoConfig.register("longllama", LongLlamaConfig, exist_ok=True)


def register_tokenizer() -> None:
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    from longllama.config import LongLlamaConfig
    from longllama.tokenizer import LongLlamaTokenizer

    AutoTokenizer.register(LongLlamaConfig, tokenizer_class=LongLlamaTokenizer, exist_ok=True)


def _models() -> None:
    import longllama.hf  # noqa: F401  (registers every Auto class at import)


WHEN_IMPORTED: dict[str, Callable[[], None]] = {
    _AUTO + "configuration_auto": register_config,
    _AUTO + "tokenization_auto": register_tokenizer,
    _AUTO + "modeling_auto": _models,
}


def _run(name: str, register: Callable[[], None]) -> None:
    try:
        register()
    except Exception as exc:  # an import must not fail because of a registration; the Auto class will say so
        logger.warning("could not register longllama with %s: %s", name, exc)


class _Loader(importlib.abc.Loader):
    """A module's own loader, then the registration once the module has run."""

    def __init__(self, loader: importlib.abc.Loader, name: str, register: Callable[[], None]):
        self._loader, self._name, self._register = loader, name, register

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._name, self._register)

    def __getattr__(self, attr):  # get_source, is_package, ...: the module's own loader answers
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the modules of WHEN_IMPORTED it asks the path finder and wraps the loader."""

    def __init__(self, pending: dict[str, Callable[[], None]]):
        self.pending = pending

    def find_spec(self, name, path, target=None):
        register = self.pending.pop(name, None)
        if register is None:
            return None
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, name, register)
        return spec


def install() -> None:
    """Register with the Auto modules already imported and hook the others (idempotent)."""
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    pending = {}
    for name, register in WHEN_IMPORTED.items():
        if name in sys.modules:
            _run(name, register)
        else:
            pending[name] = register
    if pending:
        sys.meta_path.insert(0, _Finder(pending))
