"""One directory for everything a process builds that a later process can reuse: Triton's compiled kernels,
Inductor's compiled graphs (torch.compile, with its FX graph cache on), FlashAttention 4's compiled kernels, and the
kernel tables `longllama tune` measures on this GPU.

The directory is $LONGLLAMA_CACHE, else $XDG_CACHE_HOME/longllama, else ~/.cache/longllama. `configure()` points the
libraries' own variables inside it, each only where the user has not set it:

    TRITON_CACHE_DIR                     <dir>/triton      (read when Triton compiles a kernel)
    TORCHINDUCTOR_CACHE_DIR              <dir>/inductor    (read when Inductor first compiles, in torch 2.11-2.15)
    TORCHINDUCTOR_FX_GRAPH_CACHE         1                 (Inductor's default since torch 2.4; stated for older ones)
    FLASH_ATTENTION_CUTE_DSL_CACHE_DIR   <dir>/flash-attn4 (read when flash_attn.cute is imported)
    FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED 1

Every library above reads its variable at its first compilation or import, so `configure()` runs before that:
when `longllama` is imported (before torch), and again from the command line's start and from `plan.build_plan`
for a GPU (every model gets its plan before it runs), which changes nothing once set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "LONGLLAMA_CACHE"


def directory() -> Path:
    """The cache directory (not created here)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longllama"


def settings(root: Path | None = None) -> dict[str, str]:
    """The library variables and the values `configure` gives the unset ones."""
    root = directory() if root is None else root
    return {
        "TRITON_CACHE_DIR": str(root / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(root / "flash-attn4"),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
    }


def configure() -> dict[str, str]:
    """Set the variables of `settings()` that are unset (a user's own value wins) and return those set now.
    Idempotent; an unwritable directory is left to each library to report (they fall back to compiling).
    Inductor writes its default folder into TORCHINDUCTOR_CACHE_DIR the first time it asks for it (some packages
    do at import): that value counts as unset."""
    changed = {}
    for name, value in settings().items():
        current = os.environ.get(name)
        if not current or (name == "TORCHINDUCTOR_CACHE_DIR" and current != value and current == _inductor_default()):
            os.environ[name] = value
            changed[name] = value
    return changed


def _inductor_default() -> str | None:
    """Inductor's own default folder, where Inductor's cache module is already imported (it cannot have written it
    otherwise; importing it would bring Inductor and Dynamo in: seconds)."""
    if "torch._inductor.runtime.cache_dir_utils" not in sys.modules:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - another torch layout: leave the variable as it is
        return None


def tuning_dir() -> Path:
    """Where `longllama tune` writes the kernel tables measured on this machine's GPUs."""
    return directory() / "tuning"
