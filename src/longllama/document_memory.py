"""Document memories (docs/chat.md): a document read once into a LongLlamaCache, kept, saved, loaded and asked
questions many times.

A DocumentMemory holds the cache after the format's prefix (BOS, system text) and the document: every layer's local
cache (the last window) and the memory layers' memories. It is never modified: each Conversation forks it (copy on
write, O(layers)) and appends its own turns, so one memory serves many conversations at once (a server can load
several, keep some on the GPU and fork one per request).

A saved memory is a folder, written under a temporary name and renamed into place: the tensors as safetensors
(`local.safetensors`: every layer's local cache; `memory.layer<i>.safetensors`: one per memory layer;
`tokens.safetensors`: the token ids read) and `manifest.json`: format version, model and tokenizer fingerprints, the
settings the memory depends on, the token count, the source files and a sha256 of every tensor file. `load` checks all
of it against the model it is given.

Loading may also recompute the lower memory layers from the saved tokens while the upper ones are read from the disk
(`recompute_layers`): a memory layer's memory depends only on the layers below it, so the GPU runs the document's
memory windows up to the k-th memory layer while the disk delivers the others' files; then the final window runs
every layer. Where the disk is slower than the GPU (a 3B memory of 128k tokens is 5 GB), this is faster than either
reading everything or reading the document again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers.decoders import DecodeStream
from transformers import StoppingCriteriaList, StopStringCriteria

from longllama.cache import LongLlamaCache
from longllama.chat_format import ChatFormat, chat_format
from longllama.errors import CheckpointError, InputError
from longllama.files import sync_files, write_folder
from longllama.model import memory_device
from longllama.windows import window_spans

logger = logging.getLogger(__name__)

FORMAT = "longllama-document-memory"
VERSION = 1
MANIFEST = "manifest.json"
LOCAL_FILE = "local.safetensors"
TOKENS_FILE = "tokens.safetensors"
MEMORY_FILE_PREFIX = "memory.layer"  # memory.layer{i}.safetensors: a memory layer's memory
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # weights-file fingerprint: 16 chunks of 64 KiB spread over each file
_HASH_CHUNK = 1 << 24
_CHECK_CHUNK = 1 << 26  # bytes per checksum of a memory's tensor file (checked in parallel)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")  # read as records (documents.py); other files as is
FILE_SEPARATOR = "\n\n"  # between the texts of several files or records


# --------------------------------------------------------------------------------------------------------------------
# Fingerprints


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_chunks(
    path: Path, size: int, chunk: int, target: torch.Tensor | None = None, stream: torch.cuda.Stream | None = None
) -> list[str]:
    """The sha256 of each `chunk` bytes of the file's `size` bytes, read side by side (file reads and hashlib release
    the GIL: a memory of several GB is hashed in a fraction of the time one digest of the whole file takes). With
    `target` (a uint8 tensor of `size` bytes) the bytes land there too: read straight into it on the CPU; on a GPU
    each thread reads into its own buffer, hashes it, and copies it over on `stream` (so the copies wait for nothing
    the GPU computes meanwhile) while the other threads read."""
    staging = threading.local()

    def part(start: int) -> str:
        n = min(chunk, size - start)
        if target is not None and not target.is_cuda:
            buffer = target[start : start + n]
        else:
            if not hasattr(staging, "buffer"):
                staging.buffer = torch.empty(chunk, dtype=torch.uint8)
            buffer = staging.buffer[:n]
        view = memoryview(buffer.numpy())
        with open(path, "rb", buffering=0) as handle:
            handle.seek(start)
            done = 0
            while done < n:
                got = handle.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"memory file {path} ended early: build the memory again")
                done += got
        digest = hashlib.sha256(view).hexdigest()
        if target is not None and target.is_cuda:
            with torch.cuda.stream(stream):
                target[start : start + n].copy_(buffer)
        return digest

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(part, range(0, max(size, 1), chunk)))


def file_entry(path: Path) -> dict[str, Any]:
    """A tensor file's manifest entry: its size and the sha256 of each of its chunks."""
    size, chunk = path.stat().st_size, _CHECK_CHUNK
    return {"bytes": size, "chunk_bytes": chunk, "sha256_chunks": _read_chunks(path, size, chunk)}


def check_file(path: Path, entry: dict[str, Any]) -> None:
    """CheckpointError unless `path` is there with the size its manifest entry records (the checksums are checked as
    the file is read: `DocumentMemory.load`)."""
    if not path.is_file():
        raise CheckpointError(f"memory file {path} is missing: the folder is incomplete; build the memory again")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise CheckpointError(
            f"memory file {path} has {size} bytes, the manifest says {entry.get('bytes')} (truncated?): build the "
            "memory again"
        )


def _corrupt(path: Path) -> CheckpointError:
    return CheckpointError(f"memory file {path} fails its sha256 check (corrupt): build the memory again")


def _weights_entry(path: Path) -> dict[str, Any]:
    """Name, size, the safetensors header's sha256 (tensor names, dtypes, shapes, offsets) and a sha256 of 16
    evenly spaced 64 KiB samples of the file: a few MiB read even for a 7B checkpoint."""
    size = path.stat().st_size
    entry: dict[str, Any] = {"name": path.name, "bytes": size}
    with open(path, "rb") as handle:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            handle.seek(0)
            entry["header_sha256"] = hashlib.sha256(handle.read(8 + min(header_len, size))).hexdigest()
        digest = hashlib.sha256()
        step = max((size - _SAMPLE_BYTES) // max(_SAMPLES - 1, 1), 1)
        for i in range(_SAMPLES):
            handle.seek(min(i * step, max(size - _SAMPLE_BYTES, 0)))
            digest.update(handle.read(_SAMPLE_BYTES))
        entry["sample_sha256"] = digest.hexdigest()
    return entry


def model_fingerprint(model) -> dict[str, Any]:
    """What identifies the model's weights: for a model loaded from a folder, config.json's sha256 plus each
    weights file's name, size, header hash and sampled-content hash (cheap for any size); for a model built in
    memory, the config and a sha256 of every parameter and buffer (reads them all)."""
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if folder.name and (folder / "config.json").is_file():
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".bin"))
        )
        return {
            "source": "folder",
            "config_sha256": _sha256_file(folder / "config.json"),
            "weights": [_weights_entry(p) for p in files],
        }
    digest = hashlib.sha256()
    for name, tensor in [*model.state_dict().items()]:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    config = json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str)
    return {
        "source": "parameters",
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "parameters_sha256": digest.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """tokenizer.model's sha256 (the file this package's tokenizers are built from), else the backend's JSON."""
    source = getattr(tokenizer, "vocab_file", None)
    if source and os.path.isfile(source):
        return {"sha256": _sha256_file(Path(source))}
    backend = tokenizer.backend_tokenizer.to_str()
    return {"backend_sha256": hashlib.sha256(backend.encode()).hexdigest()}


def memory_settings(model, fmt: ChatFormat, last_context_length: int) -> dict[str, Any]:
    """The settings a document's memory depends on, beside its tokens and the weights."""
    config = model.config
    return {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "mem_dtype": str(config.memory_dtype).removeprefix("torch."),
        "last_context_length": int(last_context_length),
        "context_window": int(config.context_window),
        "mem_layers": sorted(int(i) for i in config.mem_layers),
        "mem_top_k": config.mem_top_k,
        "mem_positionals": bool(config.mem_positionals),
        # block retrieval reads part of the memory while the document is read: later windows' keys depend on it
        "mem_retrieval": config.mem_retrieval,
        "mem_blocks": config.mem_blocks if config.mem_retrieval == "blocks" else None,
        "mem_block_size": config.mem_block_size if config.mem_retrieval == "blocks" else None,
        # recorded only when on: memories saved before it existed were read with one level
        "mem_super_size": config.mem_super_size if config.mem_retrieval == "blocks" and config.mem_super_size else None,
        "mem_recent_blocks": (
            config.mem_recent_blocks if config.mem_retrieval == "blocks" and config.mem_recent_blocks else None
        ),
        "template": fmt.template,
        "system": fmt.system,
    }


# Settings added after memories were first saved: what a manifest without them was built with.
_SETTINGS_BEFORE = {
    "mem_retrieval": "dense",
    "mem_blocks": None,
    "mem_block_size": None,
    "mem_super_size": None,
    "mem_recent_blocks": None,
}


# --------------------------------------------------------------------------------------------------------------------
# Documents


def read_documents(paths: Sequence[str | os.PathLike[str]]) -> tuple[str, list[dict[str, Any]]]:
    """The text of `paths` joined by blank lines (.jsonl / .json / .parquet: their records' `text` fields; any
    other file: its UTF-8 text as is) and, per file, its name, size and sha256."""
    from longllama.documents import iter_documents

    if not paths:
        raise InputError("no document files given: pass at least one file to read")
    texts, sources = [], []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise InputError(f"document file {name} does not exist: check the path")
        if path.suffix.lower() in JSONL_SUFFIXES:
            texts.extend(iter_documents([path]))
        else:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"document file {name} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
                ) from None
        sources.append({"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256_file(path)})
    text = FILE_SEPARATOR.join(t for t in texts if t)
    if not text:
        raise InputError(f"the files {', '.join(map(str, paths))} hold no text: pass files with some")
    return text, sources


# --------------------------------------------------------------------------------------------------------------------
# The memory


class DocumentMemory:
    """A document read into a LongLlamaCache by `model`, for questions in the `format` it was built with.

    `build(model, tokenizer, text)` / `from_files(...)` read a document; `save(path)` / `load(path, model,
    tokenizer)` keep it; `ask`, `stream` and `conversation()` answer questions. The cache is never modified."""

    def __init__(
        self,
        model,
        tokenizer,
        cache: LongLlamaCache,
        *,
        fmt: ChatFormat,
        tokens: int,
        last_context_length: int,
        sources: list[dict[str, Any]] | None = None,
        next_logits: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ):
        self.model, self.tokenizer, self.cache, self.format = model, tokenizer, cache, fmt
        self.tokens = tokens  # prefix (BOS, system text) and document
        self.ids = ids  # (tokens,) int32 on the CPU: the token ids read (None for memories saved without them)
        self.last_context_length = last_context_length
        self.sources = sources or []
        self.next_logits = next_logits  # (vocab,) the model's prediction after the document, when it was read here

    # -- building --------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        text: str,
        *,
        template: str | None = None,
        system: str | None = None,
        last_context_length: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        sources: list[dict[str, Any]] | None = None,
    ) -> DocumentMemory:
        """Read `text` into a new memory: the format's prefix, then the document. `progress(tokens_done, total)` is
        called after each window; `last_context_length` (None: the model's) is the final window kept local."""
        fmt = chat_format(tokenizer, template, system=system)
        ids = list(fmt.prefix_ids) + fmt.document_ids(text)
        lcl = int(last_context_length or model.config.last_context_length)
        device = model.lm_head.weight.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        cache = model.model.new_cache()
        with torch.no_grad():
            out = model.model.run(
                input_ids,
                cache=cache,
                use_cache=True,
                last_context_length=lcl,
                progress=None if progress is None else (lambda done: progress(done, len(ids))),
                keep_last=1,
            )
            logits = model.lm_head(out.hidden[:, -1])[0]
        return cls(
            model, tokenizer, cache, fmt=fmt, tokens=len(ids), last_context_length=lcl, sources=sources,
            next_logits=logits, ids=torch.tensor(ids, dtype=torch.int32),
        )  # fmt: skip

    @classmethod
    def from_files(cls, model, tokenizer, paths: Sequence[str | os.PathLike[str]], **options: Any) -> DocumentMemory:
        """`build` from files (read_documents: records of .jsonl / .parquet, any other file as text)."""
        text, sources = read_documents(paths)
        return cls.build(model, tokenizer, text, sources=sources, **options)

    # -- questions -------------------------------------------------------------------------------------------------
    def conversation(self, **settings: Any) -> Conversation:
        """A new conversation about this document; `settings` are generate() settings for its answers."""
        return Conversation(self, **settings)

    def ask(self, question: str, **settings: Any) -> str:
        """The answer to one question (a conversation of one turn)."""
        return self.conversation(**settings).ask(question)

    def stream(self, question: str, **settings: Any) -> Iterator[str]:
        """The answer to one question as pieces of text, as they are generated."""
        return self.conversation(**settings).stream(question)

    def to(self, device: torch.device | str) -> DocumentMemory:
        """Move the cache (in place: a server can keep some memories on the GPU, others in CPU memory)."""
        for layer in self.cache.layers:
            if layer.keys is not None:
                layer.set_local(layer.keys.to(device), layer.values.to(device), layer.positions.to(device))
            if layer.memory is not None:
                layer.memory.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes the cache holds (local caches and memory buffers): what keeping this memory loaded costs."""
        total = self.cache.memory_bytes()
        seen: set[int] = set()  # layers may share one positions tensor
        for layer in self.cache.layers:
            for tensor in (layer.keys, layer.values, layer.positions):
                if tensor is not None and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
        return total

    # -- files ---------------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": model_fingerprint(self.model),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "settings": memory_settings(self.model, self.format, self.last_context_length),
            "tokens": self.tokens,
            "local_length": self.cache.local_length,
            "memory_length": self.cache.memory_length,
            "sources": self.sources,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the memory as a folder at `path`, atomically: written under a temporary name beside it, then
        renamed into place (an existing memory folder there is replaced). Returns the path."""
        target = Path(path).expanduser()
        if target.exists() and not (target / MANIFEST).is_file():
            raise InputError(f"{target} exists and is not a saved document memory: choose another path")
        if not target.parent.is_dir():
            raise InputError(f"folder {target.parent} does not exist: create it or choose another path")
        manifest = self.manifest()

        def write(temp: Path) -> None:
            temp.mkdir()
            files = {}
            for name, tensors in self._tensor_files().items():
                save_file(tensors, str(temp / name), metadata={"format": FORMAT})
                files[name] = file_entry(temp / name)
            manifest["files"] = files
            (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            sync_files(temp)

        write_folder(target, write)
        return target

    def _tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        local: dict[str, torch.Tensor] = {}
        files = {LOCAL_FILE: local}
        if self.ids is not None:
            files[TOKENS_FILE] = {"ids": self.ids.to(torch.int32).contiguous()}
        for i, layer in enumerate(self.cache.layers):
            if layer.keys is not None:
                # clone: layers may share one positions tensor, and safetensors refuses shared storage
                for part in ("keys", "values", "positions"):
                    local[f"layers.{i}.{part}"] = (
                        getattr(layer, part).detach().cpu().clone(memory_format=torch.contiguous_format)
                    )
            if layer.memory is not None:
                parts = layer.memory.tensors()  # as stored: int8 memory keeps its int8 and scales
                files[f"{MEMORY_FILE_PREFIX}{i}.safetensors"] = {
                    k: t.detach().cpu().clone(memory_format=torch.contiguous_format) for k, t in parts.items()
                }
        return files

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model,
        tokenizer,
        *,
        template: str | None = None,
        system: str | None = None,
        device: torch.device | str | None = None,
        recompute_layers: int = 0,
    ) -> DocumentMemory:
        """Read a memory written by `save`, for `model` and `tokenizer`, checking the manifest against both (and
        `template` / `system` when given) and every tensor file's checksum; `device`: the model's by default.
        `recompute_layers` = k > 0: the first k memory layers' memories are computed again from the saved tokens
        while the other memory layers' files are read (at the same time), then the final window runs every layer
        (its local caches are computed, not read); k = the number of memory layers reads the document again."""
        folder = Path(path).expanduser()
        manifest = read_manifest(folder)
        _check_same(manifest, "model", model_fingerprint(model), folder, "the model the memory was built with")
        _check_same(manifest, "tokenizer", tokenizer_fingerprint(tokenizer), folder, "that model's tokenizer")
        saved = manifest["settings"]
        fmt = chat_format(
            tokenizer,
            saved["template"] if template is None else template,
            system=saved["system"] if system is None else system,
        )
        expected = memory_settings(model, fmt, saved["last_context_length"])
        saved = {**_SETTINGS_BEFORE, **saved}
        changed = [key for key in expected if saved.get(key) != expected[key]]
        if changed:
            key = changed[0]
            raise CheckpointError(
                f"memory {folder} was built with {key}={saved.get(key)!r}, this run uses {expected[key]!r}: run with "
                f"the same {key}, or build the memory again (longllama memory build)"
            )
        device = model.lm_head.weight.device if device is None else torch.device(device)
        held = memory_device(model.config, device)
        files = manifest["files"]
        ids = None
        if TOKENS_FILE in files:
            ids = _read_tensor_file(folder, TOKENS_FILE, files[TOKENS_FILE], "cpu")["ids"]
            if ids.shape != (int(manifest["tokens"]),):
                raise CheckpointError(f"memory {folder}: {TOKENS_FILE} does not hold the manifest's tokens")
        lcl = int(saved["last_context_length"])
        mem_layers = sorted(model.config.mem_layers)
        if not 0 <= recompute_layers <= len(mem_layers):
            raise InputError(
                f"recompute_layers={recompute_layers}: this model has {len(mem_layers)} memory layers; pass 0 to that"
            )
        next_logits = None
        if recompute_layers == 0:  # every file but the tokens, read above
            tensors = {
                name: _read_tensor_file(folder, name, entry, held if name.startswith(MEMORY_FILE_PREFIX) else device)
                for name, entry in files.items()
                if name != TOKENS_FILE
            }
            cache = _cache_from_files(model, tensors, folder, device)
        else:
            if ids is None:
                raise InputError(
                    f"memory {folder} was saved without its tokens, so no layer can be recomputed: load it with "
                    "recompute_layers=0, or build it again"
                )
            home = model.lm_head.weight.device
            if device.type != home.type or device.index not in (None, home.index):
                raise InputError(
                    f"recompute_layers runs the model, which is on {home}: load onto that device (not {device}), or "
                    "with recompute_layers=0"
                )
            read = [f"{MEMORY_FILE_PREFIX}{i}.safetensors" for i in mem_layers[recompute_layers:]]
            if not manifest["memory_length"]:  # a document within the final window: no memory to read
                read = []
            cache, next_logits = _recompute_and_read(model, ids, lcl, recompute_layers, folder, files, read, home)
        if cache.local_length != manifest["local_length"] or cache.memory_length != manifest["memory_length"]:
            raise CheckpointError(
                f"memory {folder} holds {cache.local_length} local / {cache.memory_length} memory tokens, its "
                "manifest says otherwise: build the memory again"
            )
        return cls(
            model, tokenizer, cache, fmt=fmt, tokens=int(manifest["tokens"]), last_context_length=lcl,
            sources=manifest.get("sources"), next_logits=next_logits, ids=ids,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"DocumentMemory(tokens={self.tokens}, template={self.format.template!r}, "
            f"local_length={self.cache.local_length}, memory_length={self.cache.memory_length})"
        )


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved memory, checked for its format and version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"document memory {folder} does not exist: pass a folder written by memory build")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it is not a complete document memory; build it again (longllama memory build)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); build the memory again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a document memory manifest; pass a folder written by memory build")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{folder} is document memory version {manifest.get('version')}, this longllama reads version "
            f"{VERSION}: build the memory again with this version"
        )
    missing = [key for key in ("model", "tokenizer", "settings", "tokens", "files") if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: build the memory again")
    return manifest


def _check_same(manifest: dict[str, Any], key: str, current: dict[str, Any], folder: Path, what: str) -> None:
    if manifest[key] != current:
        raise CheckpointError(
            f"memory {folder} was built with another {key} ({key} fingerprint differs): load it with {what}, "
            "or build the memory again for this one"
        )


def _read_tensor_file(
    folder: Path,
    name: str,
    entry: dict[str, Any],
    device,
    flat: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> dict[str, torch.Tensor]:
    """A tensor file's tensors on `device`, its checksums checked (into `flat` on `stream` when given: see
    _read_checked)."""
    path = folder / name
    try:
        check_file(path, entry)
        if "sha256_chunks" in entry:
            return _read_checked(path, entry, torch.device(device), flat, stream)
        if _sha256_file(path) != entry.get("sha256"):  # older memories: one digest of the whole file, then a read
            raise _corrupt(path)
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read memory file {path} ({exc}): build the memory again") from None


# safetensors' dtype names (its file format: 8-byte little-endian header size, JSON header, the tensors' bytes)
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_checked(
    path: Path,
    entry: dict[str, Any],
    device: torch.device,
    flat: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> dict[str, torch.Tensor]:
    """A tensor file read once, its chunks checked as they are read (_read_chunks), into one buffer on `device` whose
    views are the tensors: `flat` when given, else a new one. GPU copies go through a stream other than the current
    one (`stream`, whose owner made it wait for the buffer's earlier users; else a new one that waits for them),
    synchronised before the tensors are returned."""
    if flat is None:
        flat = torch.empty(int(entry["bytes"]), dtype=torch.uint8, device=device)
    if flat.is_cuda and stream is None:
        stream = _copy_stream(flat.device)
    if _read_chunks(path, flat.numel(), int(entry["chunk_bytes"]), flat, stream) != entry["sha256_chunks"]:
        raise _corrupt(path)
    if stream is not None:
        stream.synchronize()
    (header_len,) = struct.unpack("<Q", flat[:8].cpu().numpy().tobytes())
    header = json.loads(flat[8 : 8 + header_len].cpu().numpy().tobytes())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = (8 + header_len + offset for offset in info["data_offsets"])
        raw = flat[begin:end]
        if begin % dtype.itemsize:  # not aligned for a view of this dtype: its own copy
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(info["shape"])
    return tensors


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream for a file's copies to the GPU, after the work queued so far on the current stream (a buffer
    allocated there may be a block whose earlier users are still queued)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _recompute_and_read(
    model,
    ids: torch.Tensor,
    last_context_length: int,
    recompute: int,
    folder: Path,
    files: dict[str, dict[str, Any]],
    read: list[str],
    device: torch.device,
) -> tuple[LongLlamaCache, torch.Tensor]:
    """DocumentMemory.load's recomputation: the first `recompute` memory layers' memories computed from `ids` on this
    thread while another reads the files `read` (the other memory layers'); then the final window through every
    layer. Returns the cache and the logits after the document."""
    missing = [name for name in read if name not in files]
    if missing:
        raise CheckpointError(f"memory {folder} lacks {missing[0]}: build the memory again")
    # The read's buffers and stream are made here, before this thread queues its GPU work: the reading thread's
    # copies wait for the buffers' earlier users, not for the recomputation.
    held = memory_device(model.config, device)
    flats = {name: torch.empty(int(files[name]["bytes"]), dtype=torch.uint8, device=held) for name in read}
    stream = _copy_stream(held) if held.type == "cuda" else None
    results: dict[str, Any] = {}

    def reader() -> None:
        try:
            results["tensors"] = {
                name: _read_tensor_file(folder, name, files[name], held, flats[name], stream) for name in read
            }
        except BaseException as exc:  # handed to the loading thread
            results["error"] = exc

    thread = threading.Thread(target=reader, name="longllama-memory-read", daemon=True)
    thread.start()
    cache = model.model.new_cache()
    input_ids = ids.to(device=device, dtype=torch.long)[None]
    try:
        with torch.no_grad():
            model.model.run(input_ids, cache=cache, use_cache=True, last_context_length=last_context_length,
                            fill_memories=recompute)  # fmt: skip
    finally:
        thread.join()
    if "error" in results:
        raise results["error"]
    _cache_from_files(model, results["tensors"], folder, device, cache=cache)
    n = input_ids.shape[1]
    start, _ = window_spans(n, window=model.config.context_window, last_context_length=last_context_length)[-1]
    with torch.no_grad():
        out = model.model.run(
            input_ids[:, start:],
            cache=cache,
            position_ids=torch.arange(start, n, device=device)[None],
            use_cache=True,
            last_context_length=last_context_length,
            keep_last=1,
        )
        logits = model.lm_head(out.hidden[:, -1])[0]
    return cache, logits


def _cache_from_files(
    model, files: dict[str, dict[str, torch.Tensor]], folder: Path, device, cache: LongLlamaCache | None = None
) -> LongLlamaCache:
    """A cache of `model` with the local caches and memories of the tensor files `files` (into `cache` if given)."""
    config = model.config
    cache = model.model.new_cache() if cache is None else cache
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    local = files.get(LOCAL_FILE, {})
    dtype = next(model.parameters()).dtype
    for i, layer in enumerate(cache.layers):
        if f"layers.{i}.keys" in local:
            keys, values, positions = (local[f"layers.{i}.{part}"] for part in ("keys", "values", "positions"))
            if keys.shape[1:] != (kv_heads, keys.shape[2], head_dim) or keys.dtype != dtype:
                raise CheckpointError(f"memory {folder}: layer {i}'s local cache does not fit this model")
            layer.set_local(keys.to(device), values.to(device), positions.to(device))
        name = f"{MEMORY_FILE_PREFIX}{i}.safetensors"
        if name in files:
            if i not in config.mem_layers:
                raise CheckpointError(f"memory {folder} has a memory for layer {i}, not a memory layer of this model")
            part = files[name]
            keys = part["keys"]
            if keys.dim() != 4 or keys.shape[1] != kv_heads or keys.shape[3] != head_dim:
                raise CheckpointError(f"memory {folder}: layer {i}'s memory does not fit this model")
            attn = model.model.layers[i].self_attn
            layer.memory = attn.memory_from(part, source=f"memory {folder} layer {i}", device=device, plan=model.plan)
    return cache


# --------------------------------------------------------------------------------------------------------------------
# Conversations


class Conversation:
    """Turns about one DocumentMemory, on a fork of its cache (the memory itself is never modified).

    Settings are generate() settings (max_new_tokens, do_sample, temperature, top_p, ...); `stop` replaces the
    format's stop strings (answers also end at EOS)."""

    def __init__(self, memory: DocumentMemory, *, stop: Sequence[str] | None = None, **settings: Any):
        self.memory = memory
        self.settings = {"max_new_tokens": 256, "do_sample": False, **settings}
        self.stop = tuple(memory.format.stop_strings if stop is None else stop)
        self._criteria = (
            StoppingCriteriaList([StopStringCriteria(memory.tokenizer, list(self.stop))]) if self.stop else None
        )
        self.reset()

    def reset(self) -> None:
        """Start over on the same document."""
        self.cache = self.memory.cache  # generate() never modifies the cache it is given
        self.pending: list[int] = []  # ids the next turn must feed before its own (the end of the last answer)
        self.turns: list[tuple[str, str]] = []  # (question, answer)
        self.answer_ids: list[list[int]] = []  # each answer's ids as fed back (stop text and EOS cut off)

    def ask(self, question: str, *, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `question` (greedy unless the settings sample); `on_text(piece)` gets the text as it comes."""
        fmt, tokenizer = self.memory.format, self.memory.tokenizer
        ids = self.pending + fmt.turn_ids(question, first=not self.turns)
        device = self.memory.model.lm_head.weight.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        streamer = _AnswerText(tokenizer, self.stop, on_text)
        with torch.no_grad():
            out = self.memory.model.generate(
                input_ids,
                cache=self.cache,
                attention_mask=None,
                streamer=streamer,
                stopping_criteria=self._criteria,
                return_dict_in_generate=True,
                last_context_length=self.memory.last_context_length,
                **self.settings,
            )
        generated = [int(t) for t in out.sequences[0, len(ids) :].tolist()]
        answer, kept = streamer.answer(generated)
        self._continue(out.cache, ids, generated, kept)
        self.turns.append((question, answer))
        self.answer_ids.append(kept)
        return answer

    def _continue(self, cache: LongLlamaCache, ids: list[int], generated: list[int], kept: list[int]) -> None:
        """The state for the next turn: the answer as kept (stop text cut off), then the format's end of answer."""
        end = list(self.memory.format.end_ids)
        fed = len(generated) - 1  # generate() feeds every new token but the last to the model
        if generated[:fed] == kept[:fed] and len(kept) >= fed:
            self.cache, self.pending = cache, kept[fed:] + end
        else:  # the cache holds stop text the kept answer lacks: read the turn again from before it
            self.pending = ids + kept + end

    def stream(self, question: str) -> Iterator[str]:
        """The answer to `question` as pieces of text, as they come (generation runs in a worker thread)."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.ask(question, on_text=pieces.put)
            except BaseException as exc:
                failure.append(exc)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while (piece := pieces.get()) is not done:
            yield piece
        worker.join()
        if failure:
            raise failure[0]


class _AnswerText:
    """A generate() streamer that turns the answer's ids into text as they come, holding back text that may be the
    start of a stop string (or an incomplete character), and passes each new piece to `on_text`.

    With a `tokenizers` tokenizer the pieces come from its incremental decoder (tokenizers' DecodeStream: a few
    ids' work per new id) where decoding the whole answer again for every id made a long answer's streaming
    quadratic (a server's model thread spent a quarter of its time there); the final text is one decode of all ids."""

    def __init__(self, tokenizer, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.on_text = tokenizer, tuple(stop), on_text
        self.ids: list[int] = []
        self.shown = 0
        self._prompt = True
        self._special = set(tokenizer.all_special_ids)
        self._last: tuple[list[int], str] | None = None
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._streamed = ""  # the stream's text so far (an incomplete character waits in the stream)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._stop_checked = 0  # characters of the streamed text searched for stop strings
        self._stop_found = False

    def put(self, tokens) -> None:
        if self._prompt:  # generate() passes the prompt first
            self._prompt = False
            return
        self.add([int(t) for t in tokens.reshape(-1).tolist()])

    def add(self, ids: list[int]) -> None:
        """More of the answer's ids (no prompt comes first here)."""
        self.ids.extend(ids)
        if self._stream is not None:
            for i in ids:
                if i not in self._special:
                    piece = self._stream.step(self._backend, i)
                    if piece:
                        self._streamed += piece
        self._show(final=False)

    def stopped(self) -> bool:
        """Whether the answer so far holds a stop string."""
        if self._stream is None:
            text = self._text(self.ids)
            return any(s in text for s in self.stop)
        if not self._stop_found:  # only the new text, and the stop string's length before it, can hold a new one
            tail = self._streamed[max(0, self._stop_checked - self._longest_stop) :]
            self._stop_checked = len(self._streamed)
            self._stop_found = any(s in tail for s in self.stop)
        return self._stop_found

    def end(self) -> None:
        self._show(final=True)

    def _text(self, ids: list[int]) -> str:
        if self._last is not None and self._last[0] == ids:  # asked again for the same ids: decode once
            return self._last[1]
        text = self.tokenizer.decode([i for i in ids if i not in self._special], skip_special_tokens=True)
        self._last = (list(ids), text)
        return text

    def _visible(self, final: bool) -> str:
        text = self._streamed if self._stream is not None and not final else self._text(self.ids)
        cut = min([text.find(s) for s in self.stop if s in text] or [len(text)])
        text = text[:cut]
        if not final:
            text = text.rstrip("\ufffd")
            for s in self.stop:  # a stop string may be starting at the end
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        return text

    def _show(self, *, final: bool) -> None:
        text = self._visible(final)
        if len(text) > self.shown and self.on_text is not None:
            self.on_text(text[self.shown :])
        self.shown = max(self.shown, len(text))

    def answer(self, generated: list[int]) -> tuple[str, list[int]]:
        """(the answer's text, the ids kept for it): EOS and any stop string and what follows are cut off."""
        text = self._visible(final=True)
        eos = self.tokenizer.eos_token_id
        kept = generated[: generated.index(eos)] if eos in generated else list(generated)
        while kept and len(self._text(kept)) > len(text):
            kept.pop()
        return text, kept
