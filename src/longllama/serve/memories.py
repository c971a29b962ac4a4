"""The server's document memories: one folder each under the memory folder (DocumentMemory.save, atomic), named by
an unguessable id; the most recently used ones stay loaded within a byte budget, the others are read back from disk
when asked for.

The index (ids, token counts) may be read from any thread; building, loading, evicting and deleting memories run on
the model worker's thread only (they touch the model and the memories' caches)."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longllama.document_memory import (
    MANIFEST,
    TOKENS_FILE,
    DocumentMemory,
    check_file,
    model_fingerprint,
    read_manifest,
    tokenizer_fingerprint,
)
from longllama.errors import CheckpointError

logger = logging.getLogger(__name__)

ID_PREFIX = "mem-"
_ID = re.compile(r"^mem-[A-Za-z0-9_-]{32}$")  # what new_id makes: nothing else is ever a path under the folder


def new_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(24)  # 24 random bytes: 32 URL-safe characters


def valid_id(memory_id: object) -> bool:
    return isinstance(memory_id, str) and bool(_ID.match(memory_id))


@dataclass(frozen=True)
class MemoryInfo:
    id: str
    tokens: int
    created: int
    template: str
    bytes: int  # on disk

    def as_json(self, *, loaded: bool) -> dict:
        return {
            "id": self.id,
            "object": "memory",
            "tokens": self.tokens,
            "created": self.created,
            "template": self.template,
            "bytes": self.bytes,
            "loaded": loaded,  # held in memory now, or read from disk when next used
        }


class MemoryStore:
    """Memories of `model` kept in `folder`; at most `budget` bytes of them loaded at once (the most recently used
    one always stays, whatever its size). A memory read from disk has its first `recompute_layers` memory layers
    computed again from its tokens while the others are read (DocumentMemory.load; memories saved without their
    tokens are read whole)."""

    def __init__(self, folder: str | os.PathLike[str], model, tokenizer, *, budget: int, recompute_layers: int = 0):
        self.folder = Path(folder)
        self.model, self.tokenizer, self.budget = model, tokenizer, int(budget)
        self.recompute_layers = int(recompute_layers)
        self._index: dict[str, MemoryInfo] = {}
        self._lock = threading.Lock()  # the index is read by request handlers, changed by the worker
        self._hot: OrderedDict[str, tuple[DocumentMemory, int]] = OrderedDict()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- any thread ------------------------------------------------------------------------------------------------
    def list(self) -> list[MemoryInfo]:
        with self._lock:
            return sorted(self._index.values(), key=lambda info: (info.created, info.id))

    def info(self, memory_id: str) -> MemoryInfo | None:
        if not valid_id(memory_id):
            return None
        with self._lock:
            return self._index.get(memory_id)

    def is_loaded(self, memory_id: str) -> bool:
        return memory_id in self._hot  # a dict lookup: safe beside the worker's changes

    @property
    def loaded_bytes(self) -> int:
        return sum(size for _, size in list(self._hot.values()))

    # -- the worker thread ---------------------------------------------------------------------------------------
    def create(
        self,
        text: str,
        *,
        template: str | None,
        system: str | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> MemoryInfo:
        """Read `text` into a new memory, save it and keep it loaded; `progress(tokens_done, total)` after each
        window."""
        memory = DocumentMemory.build(
            self.model, self.tokenizer, text, template=template, system=system, progress=progress
        )
        memory_id = new_id()
        path = memory.save(self.folder / memory_id)
        info = self._info(memory_id, path, memory.tokens, memory.format.template)
        with self._lock:
            self._index[memory_id] = info
        self._keep(memory_id, memory)
        return info

    def get(self, memory_id: str) -> DocumentMemory | None:
        """The memory `memory_id` (loaded from disk when it is not in memory), or None when there is none."""
        if self.info(memory_id) is None:
            return None
        if memory_id in self._hot:
            self._hot.move_to_end(memory_id)
            return self._hot[memory_id][0]
        folder = self.folder / memory_id
        recompute = self.recompute_layers if TOKENS_FILE in read_manifest(folder)["files"] else 0
        memory = DocumentMemory.load(folder, self.model, self.tokenizer, recompute_layers=recompute)
        self._keep(memory_id, memory)
        return memory

    def delete(self, memory_id: str) -> bool:
        with self._lock:
            info = self._index.pop(memory_id, None) if valid_id(memory_id) else None
        if info is None:
            return False
        self._hot.pop(memory_id, None)
        path = self.folder / memory_id
        trash = self.folder / f".{memory_id}.{secrets.token_hex(4)}.old"  # gone from listings at once
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _keep(self, memory_id: str, memory: DocumentMemory) -> None:
        self._hot[memory_id] = (memory, memory.nbytes())
        self._hot.move_to_end(memory_id)
        while len(self._hot) > 1 and self.loaded_bytes > self.budget:
            evicted, _ = self._hot.popitem(last=False)
            logger.info(
                "memory %s unloaded (budget %d bytes); it is read from disk when asked for", evicted, self.budget
            )

    # -- start-up ------------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index the complete memories of this model; remove what a killed save or delete left behind."""
        model_print, tokenizer_print = model_fingerprint(self.model), tokenizer_fingerprint(self.tokenizer)
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
                logger.warning("removing %s, left by an interrupted save or delete", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not (entry.is_dir() and valid_id(entry.name)):
                continue
            try:  # sizes only: the checksums are checked when a memory is loaded (a start reads no tensors)
                manifest = _verified_manifest(entry)
            except CheckpointError as exc:
                logger.warning("skipping memory %s: %s", entry.name, exc)
                continue
            if manifest["model"] != model_print or manifest["tokenizer"] != tokenizer_print:
                logger.warning("skipping memory %s: it was built with another model or tokenizer", entry.name)
                continue
            info = self._info(entry.name, entry, int(manifest["tokens"]), manifest["settings"]["template"])
            self._index[entry.name] = info

    @staticmethod
    def _info(memory_id: str, path: Path, tokens: int, template: str) -> MemoryInfo:
        size = sum(item.stat().st_size for item in path.iterdir() if item.is_file())
        created = int((path / MANIFEST).stat().st_mtime)
        return MemoryInfo(id=memory_id, tokens=tokens, created=created, template=template, bytes=size)


def _verified_manifest(folder: Path) -> dict:
    """The manifest of `folder`, every tensor file it names present with the size it records."""
    manifest = read_manifest(folder)
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{folder / MANIFEST} names no tensor files")
    for name, entry in files.items():
        if "/" in name or not isinstance(entry, dict):
            raise CheckpointError(f"{folder / MANIFEST} names a file outside the memory: {name!r}")
        check_file(folder / name, entry)
    return manifest
