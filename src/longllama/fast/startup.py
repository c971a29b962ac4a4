"""What Triton does once per process before its first compilation or cache lookup, begun in a background thread
when a command starts on a GPU machine, while the main thread imports torch and transformers: importing Triton,
computing its key (a hash of its own sources and compiled library, about a second, mostly reading files and hashing,
outside Python's lock) and making its CUDA driver (a small C module, built into Triton's cache on a fresh machine).
The kernels' first compilations and launches wait for it (`wait`); nothing depends on it having run.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

_thread: threading.Thread | None = None
_lock = threading.Lock()


def start() -> None:
    """Begin the preparation in a daemon thread (once per process)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_prepare, name="longllama-triton-start", daemon=True)
            _thread.start()


def wait() -> None:
    """Return once a preparation begun by `start` has finished (at once where none was begun)."""
    thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _prepare() -> None:
    try:
        from triton.runtime.cache import triton_key

        triton_key()  # kept by Triton for the process (functools.lru_cache)
        from triton.runtime import driver

        driver.active.get_current_target()  # imports torch (after the main thread's import) and makes the driver
    except Exception as exc:  # noqa: BLE001 - the first compilation meets the same problem and reports it
        logger.debug("preparing Triton in the background failed: %s", exc)
