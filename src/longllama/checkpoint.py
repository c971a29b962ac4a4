"""Model folders on disk: check, load, save (atomically) and convert LongLLaMA / LLaMA checkpoints.

A model folder holds `config.json` and its weights in one of four layouts: `model.safetensors`,
`model.safetensors.index.json` + shards, `pytorch_model.bin`, or `pytorch_model.bin.index.json` + shards.
When several are present the first in that order wins, as in transformers. LongLLaMA checkpoints use the
HF LLaMA tensor names, so converting between the two model types only rewrites `config.json`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from longllama.config import ConfigError, LongLlamaConfig
from longllama.errors import CheckpointError, InputError
from longllama.files import temp_sibling, write_folder

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_LAYOUTS = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

# Files that travel with the weights when a folder is converted.
AUX_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

DEFAULT_MAX_SHARD_SIZE = "5GB"

# The safetensors library refuses headers above 100 MB; anything larger is corruption, not a real header.
_MAX_SAFETENSORS_HEADER = 100_000_000
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_STALE_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SHARD_NAME = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_ZIP_LOCAL_HEADER = 30
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

# LLaMA config fields that LongLlamaConfig shares under the same name.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_FOT_FIELDS = (
    "context_window",
    "last_context_length",
    "mem_layers",
    "mem_positionals",
    "mem_dtype",
    "mem_attention_grouping",
    "torch_attention",
    "gradient_checkpoint_every_ith",
)


# --------------------------------------------------------------------------------------------------------------
# Checking


def check_model_folder(path: PathLike, *, allow_legacy_bin: bool = False) -> None:
    """Raise CheckpointError (one line: the problem and the fix) unless `path` looks like a loadable model folder.

    The checks are cheap: headers, indexes and zip directories are read, tensor data is not. Legacy (non-zip)
    `.bin` files are rejected unless `allow_legacy_bin`: they can be neither checked cheaply nor memory-mapped.
    """
    folder = _existing_folder(path)
    _read_json(folder / "config.json", what="config")
    _check_weights(folder, allow_legacy_bin=allow_legacy_bin)


def _existing_folder(path: PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist: check the path or download the model first")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the folder that holds config.json and the weights")
    return folder


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} is missing: copy it from the original model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = _one_line(exc)
        raise CheckpointError(f"{what} file {path} is not valid JSON ({reason}): restore it from the original") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} file {path} does not hold a JSON object: restore it from the original")
    return data


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _weight_layout(folder: Path) -> str:
    for name in WEIGHT_LAYOUTS:
        if (folder / name).is_file():
            return name
    raise CheckpointError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_LAYOUTS)} (with its shards); "
        "download or save the weights into this folder"
    )


def _check_weights(folder: Path, *, allow_legacy_bin: bool) -> list[Path]:
    """Check the weights that a loader would pick and return their files."""
    layout = _weight_layout(folder)
    if layout in (SAFE_SINGLE, BIN_SINGLE):
        files = [folder / layout]
        _check_weight_file(files[0], allow_legacy_bin=allow_legacy_bin)
        return files
    return _check_index(folder / layout, allow_legacy_bin=allow_legacy_bin)


def _check_weight_file(path: Path, *, allow_legacy_bin: bool) -> set[str] | None:
    """Check one weight file; for safetensors return the tensor names its header lists."""
    if path.suffix == ".safetensors":
        return set(_safetensors_header(path))
    _check_bin(path, allow_legacy=allow_legacy_bin)
    return None


def _read_index(index_path: Path) -> dict[str, str]:
    index = _read_json(index_path, what="index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"index {index_path} has no 'weight_map': restore it from the original model folder")
    for name, shard in weight_map.items():
        # Shards must sit next to the index; a path would let an index point outside the folder.
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"index {index_path} maps {name!r} to {shard!r}, not a file name: restore the index")
    return weight_map


def _check_index(index_path: Path, *, allow_legacy_bin: bool) -> list[Path]:
    weight_map = _read_index(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"index {index_path.name} names shard {shard}, which is missing from {index_path.parent}: "
                "download the missing shard or re-save the model"
            )
        names = _check_weight_file(shard_path, allow_legacy_bin=allow_legacy_bin)
        if names is not None:
            _check_shard_holds(weight_map, shard, names, index_path)
    return [index_path.parent / shard for shard in shards]


def _check_shard_holds(weight_map: Mapping[str, str], shard: str, names: set[str], index_path: Path) -> None:
    absent = [name for name, file in weight_map.items() if file == shard and name not in names]
    if absent:
        raise CheckpointError(
            f"index {index_path.name} places {absent[0]} in {shard}, but that shard does not hold it "
            f"({len(absent)} tensor(s) affected): the index and shards come from different saves; re-download them"
        )


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header against the file size without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"is truncated ({size} bytes, shorter than the 8-byte header length)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise _corrupt(
                path, f"has a corrupt or truncated header (declares {header_len} header bytes, file has {size})"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"has a corrupt header ({_one_line(exc)})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "has a corrupt header (not a JSON object)")
    header.pop("__metadata__", None)
    _check_data_extent(path, header, data_size=size - 8 - header_len)
    return header


def _check_data_extent(path: Path, header: Mapping[str, Any], *, data_size: int) -> None:
    end = 0
    for name, info in header.items():
        end = max(end, _tensor_end(path, name, info))
    if end > data_size:
        raise _corrupt(path, f"is truncated (tensor data needs {end} bytes, file holds {data_size})")
    if end < data_size:
        raise _corrupt(path, f"has {data_size - end} bytes after the last tensor (corrupt header or wrong file)")


def _tensor_end(path: Path, name: str, info: Any) -> int:
    """The end offset of one header entry, after checking it is self-consistent."""
    try:
        begin, end = info["data_offsets"]
        shape = [int(dim) for dim in info["shape"]]
        dtype = info["dtype"]
    except (TypeError, KeyError, ValueError) as exc:
        raise _corrupt(path, f"has a corrupt header entry for {name!r}") from exc
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
        raise _corrupt(path, f"has corrupt offsets or shape for {name!r}")
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if itemsize is not None and (end - begin) != itemsize * math.prod(shape):
        raise _corrupt(path, f"has a header entry for {name!r} whose size does not match its shape and dtype")
    return end


def _check_bin(path: Path, *, allow_legacy: bool) -> None:
    """Check a torch zip checkpoint through its central directory and the (small) pickle entry."""
    if not zipfile.is_zipfile(path):
        _reject_non_zip_bin(path, allow_legacy=allow_legacy)
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [info for info in infos if info.filename.endswith("/data.pkl") or info.filename == "data.pkl"]
            if not pickles:
                raise _corrupt(path, "is a zip file without data.pkl, so not a torch checkpoint")
            for info in infos:
                if info.header_offset + _ZIP_LOCAL_HEADER + info.compress_size > size:
                    raise _corrupt(path, f"is truncated (entry {info.filename} runs past the end of the file)")
            archive.read(pickles[0])  # zipfile checks the CRC while reading
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _corrupt(path, f"has a corrupt zip structure ({_one_line(exc)})") from exc


def _reject_non_zip_bin(path: Path, *, allow_legacy: bool) -> None:
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        raise _corrupt(path, "is truncated or corrupt (its zip directory is missing)")
    if head[:1] != b"\x80":
        raise _corrupt(path, "is not a torch checkpoint")
    if not allow_legacy:
        raise CheckpointError(
            f"{path} uses the legacy (pre-1.6, non-zip) torch format, which cannot be memory-mapped: "
            "convert it with longllama.checkpoint.convert_to_safetensors (or re-save it with torch.save)"
        )


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} {problem}: re-download or re-save this file")


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the weights of a model folder (any of the four layouts) or of one weight/index file, on CPU.

    Stale `*.rotary_emb.inv_freq` buffers of transformers-4.30-era files are dropped.
    """
    path = Path(path)
    if path.is_dir():
        files = _check_weights(path, allow_legacy_bin=True)
    elif path.name.endswith(".index.json"):
        files = _check_index(path, allow_legacy_bin=True)
    elif path.is_file():
        _check_weight_file(path, allow_legacy_bin=True)
        files = [path]
    else:
        raise CheckpointError(f"{path} does not exist: pass a model folder or a weight file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        _merge_unique(state, _load_file(file), file)
    dropped = [name for name in state if _STALE_BUFFER.search(name)]
    for name in dropped:
        del state[name]
    if dropped:
        logger.debug("dropped %d stale rotary inv_freq buffers from %s", len(dropped), path)
    return state


def _merge_unique(state: dict[str, torch.Tensor], part: Mapping[str, torch.Tensor], file: Path) -> None:
    for name, tensor in part.items():
        if name in state:
            raise CheckpointError(f"tensor {name} appears in more than one shard ({file.name}): re-save the model")
        state[name] = tensor


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return safetensors.torch.load_file(file, device="cpu")
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the caller
        raise CheckpointError(f"cannot read {file} ({_one_line(exc)}): re-download or re-save this file") from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors: save model.state_dict() instead")
    return loaded


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "constant_", "zeros_", "ones_")  # fmt: skip


_SKIPPING = threading.local()  # this thread is building a model on the meta device
_INSTALLED: dict[str, Any] = {}  # torch.nn.init's own fills, while ours stand in for them
_INSTALL = threading.Lock()
_BUILDS = 0  # builds under way, in all threads


def _skippable(original):
    """A fill that does nothing in a thread building a meta model and is `original` in every other thread."""

    @functools.wraps(original)
    def fill(tensor, *args, **kwargs):
        return tensor if getattr(_SKIPPING, "on", False) else original(tensor, *args, **kwargs)

    return fill


@contextlib.contextmanager
def _initialisation_skipped():
    """torch.nn.init's fills as no-ops while a model is built on the meta device to take a checkpoint's tensors:
    they would change nothing there, and the meta versions of the random fills import Dynamo (seconds). Only this
    thread's fills are skipped: another thread initialising a model meanwhile gets its random weights."""
    global _BUILDS
    with _INSTALL:
        if _BUILDS == 0:
            _INSTALLED.update({name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS})
            for name, fn in _INSTALLED.items():
                setattr(torch.nn.init, name, _skippable(fn))
        _BUILDS += 1
    before, _SKIPPING.on = getattr(_SKIPPING, "on", False), True
    try:
        yield
    finally:
        _SKIPPING.on = before
        with _INSTALL:
            _BUILDS -= 1
            if _BUILDS == 0:
                for name, fn in _INSTALLED.items():
                    setattr(torch.nn.init, name, fn)
                _INSTALLED.clear()


def load_pretrained(cls, folder: PathLike, *, dtype: torch.dtype | str, device: torch.device | str, **overrides: Any):
    """A model of class `cls` (LongLlamaForCausalLM or another LongLlamaPreTrainedModel) from the safetensors
    weights of `folder`, read once, tensor by tensor, straight onto `device` in `dtype` ("auto": the checkpoint's
    own): the model is built on the meta device (no memory, no initialisation) and takes the tensors as its
    parameters (load_state_dict(assign=True)), so no full copy of the weights ever sits in CPU memory. `overrides`
    change config fields, as in from_pretrained. Returns None where this path does not apply (.bin weights, tensor
    names other than the model's): the caller then loads with from_pretrained."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    folder = _existing_folder(folder)
    files = _check_weights(folder, allow_legacy_bin=True)
    if any(f.suffix != ".safetensors" for f in files):
        return None
    config = cls.config_class.from_pretrained(folder, **overrides)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    with torch.device("meta"), _initialisation_skipped():
        model = cls(config)
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not _STALE_BUFFER.search(name):
                    names[name] = file
    if set(names) - expected or expected - set(names) - tied:
        return None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as handle:
            for name in [n for n, f in names.items() if f == file]:
                tensor = handle.get_tensor(name)
                state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise CheckpointError(f"{folder} lacks the weights {', '.join(meta[:3])}: re-save the model")
    model.config.dtype = dtype
    model.config._name_or_path = str(folder)
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the model's own defaults, as from_pretrained takes them
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.config.check()
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Saving


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], folder: PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[Path]:
    """Write `state_dict` into `folder` as safetensors and return the files written.

    Above `max_shard_size` (bytes, or a string such as "5GB" / "500MiB") the tensors are split into
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Every file is first written
    under a temporary name in the same folder and then renamed, so a failed save never leaves a partial file
    under a final name; safetensors weights of an earlier save that would shadow the new ones are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _standalone_tensors(state_dict)
    shards = _split_shards(tensors, _parse_size(max_shard_size))
    previous = _safetensors_files(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        staged = _stage_files(folder, shards)
        for temp, final in staged:
            os.replace(temp, final)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
    written = [final for _, final in staged]
    for stale in previous - set(written):
        stale.unlink(missing_ok=True)
    logger.info("saved %d tensors to %s in %d file(s)", len(tensors), folder, len(written))
    return written


def _standalone_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that each own their storage (safetensors rejects shared or strided ones)."""
    users: dict[int, int] = {}
    for tensor in state_dict.values():
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            users[ptr] = users.get(ptr, 0) + 1
    return {name: _standalone(tensor, users) for name, tensor in state_dict.items()}


def _standalone(tensor: torch.Tensor, users: Mapping[int, int]) -> torch.Tensor:
    storage = tensor.untyped_storage()
    shared = tensor.numel() > 0 and users.get(storage.data_ptr(), 0) > 1
    partial = storage.nbytes() != tensor.numel() * tensor.element_size()
    tensor = tensor.detach().to("cpu")
    return tensor.contiguous().clone() if shared or partial or not tensor.is_contiguous() else tensor


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS or int(float(match.group(1)) * _SIZE_UNITS[unit]) <= 0:
        raise InputError(
            f"max_shard_size={size!r} is not a positive size: use bytes or a string such as '5GB' or '500MiB'"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _split_shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += nbytes
    return shards


def _stage_files(folder: Path, shards: list[dict[str, torch.Tensor]]) -> list[tuple[Path, Path]]:
    """Write every output under a temporary name; returns (temporary, final) pairs, index last."""
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    staged: list[tuple[Path, Path]] = []
    try:
        for name, shard in zip(names, shards):
            staged.append((temp_sibling(folder / name), folder / name))
            safetensors.torch.save_file(shard, staged[-1][0], metadata={"format": "pt"})
        if len(shards) > 1:
            staged.append((temp_sibling(folder / SAFE_INDEX), folder / SAFE_INDEX))
            staged[-1][0].write_text(_index_json(names, shards), encoding="utf-8")
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return staged


def _index_json(names: list[str], shards: list[dict[str, torch.Tensor]]) -> str:
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def _safetensors_files(folder: Path) -> set[Path]:
    found = {folder / SAFE_SINGLE, folder / SAFE_INDEX} | {
        p for p in folder.glob("model-*.safetensors") if _SHARD_NAME.match(p.name)
    }
    if (folder / SAFE_INDEX).is_file():
        try:
            found |= {folder / shard for shard in _read_index(folder / SAFE_INDEX).values()}
        except CheckpointError:
            pass  # a broken old index only matters for the file it names, which the glob already covers
    return {p for p in found if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Conversions


def convert_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> None:
    """Copy a model folder (any weight layout, legacy .bin included) to `dst` with safetensors weights.

    `dtype` (e.g. torch.bfloat16) casts the floating-point weights and records it in the config (`dtype`, and the
    older `torch_dtype` where the source has one);
    None keeps them as stored. The generation files and tokenizer.model are copied unchanged; the transformers
    tokenizer files are rebuilt from tokenizer.model (longllama.tokenizer.write_tokenizer_files). `dst` must not exist
    or be empty; it appears complete or not at all.
    """
    src_folder = _existing_folder(src)
    check_model_folder(src_folder, allow_legacy_bin=True)
    config = _read_json(src_folder / "config.json", what="config")
    state = load_state_dict(src_folder)
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
        name = str(dtype).removeprefix("torch.")
        config = {**config, "dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}
    _write_folder(dst, src=src_folder, config=config, state=state, max_shard_size=max_shard_size)


def llama_to_longllama(
    src: PathLike,
    dst: PathLike,
    *,
    mem_layers: Iterable[int],
    last_context_length: int | None = None,
    mem_dtype: str = "bfloat16",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Turn a transformers LlamaForCausalLM folder into a LongLLaMA folder with the same weights.

    `last_context_length` defaults to half the context window (at least 1). Raises ConfigError for LLaMA
    variants LongLLaMA cannot run (rope scaling, attention/MLP biases, ...) and CheckpointError for bad files.
    """
    src_folder = _existing_folder(src)
    check_model_folder(src_folder, allow_legacy_bin=True)
    fields = _llama_fields(_read_json(src_folder / "config.json", what="config"))
    if last_context_length is None:
        last_context_length = max(1, fields["max_position_embeddings"] // 2)
    fot = dict(mem_layers=list(mem_layers), last_context_length=last_context_length, mem_dtype=mem_dtype)
    config = _longllama_config_json(LongLlamaConfig(**fields, **fot))
    state = load_state_dict(src_folder)
    _check_llama_tensors(state, config)
    _write_folder(dst, src=src_folder, config=config, state=state, max_shard_size=max_shard_size)


def longllama_to_llama(src: PathLike, dst: PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Turn a LongLLaMA folder into a plain transformers LlamaForCausalLM folder (the FoT fields are dropped)."""
    from transformers import LlamaConfig

    src_folder = _existing_folder(src)
    check_model_folder(src_folder, allow_legacy_bin=True)
    raw = _read_json(src_folder / "config.json", what="config")
    if raw.get("model_type") != "longllama":
        raise ConfigError(
            f"config model_type={raw.get('model_type')!r} is not 'longllama': "
            "pass a LongLLaMA folder (use llama_to_longllama for the other direction)"
        )
    long_config = _longllama_from_json(raw)
    shared = {name: getattr(long_config, name) for name in _SHARED_FIELDS}
    shared["max_position_embeddings"] = long_config.context_window  # plain LLaMA reads no further than the window
    dtype = long_config.to_dict().get("dtype")
    llama = LlamaConfig(
        **shared,
        rope_theta=long_config.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )
    config = json.loads(llama.to_json_string(use_diff=True))
    state = load_state_dict(src_folder)
    _check_llama_tensors(state, llama.to_dict())
    _write_folder(dst, src=src_folder, config=config, state=state, max_shard_size=max_shard_size)


def _longllama_from_json(raw: Mapping[str, Any]) -> LongLlamaConfig:
    # auto_map points at the reference's remote code, which this package replaces.
    kwargs = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "transformers_version")}
    try:
        return LongLlamaConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config.json has a field LongLlamaConfig does not accept ({_one_line(exc)})") from exc


def _llama_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The LongLlamaConfig keyword arguments that carry a LLaMA config.json over, after rejecting variants."""
    from transformers import LlamaConfig

    if raw.get("model_type") != "llama":
        raise ConfigError(
            f"config model_type={raw.get('model_type')!r} is not 'llama': pass a LlamaForCausalLM "
            "folder (other architectures cannot be converted)"
        )
    # LlamaConfig normalises the three historic rope spellings (rope_theta, rope_scaling, rope_parameters).
    try:
        llama = LlamaConfig.from_dict(dict(raw))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"config.json is not a valid LLaMA config ({_one_line(exc)}): fix or re-save it") from exc
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(llama, flag, False):
            raise ConfigError(f"{flag}=true is not supported: LongLLaMA has no bias terms; use a bias-free LLaMA")
    fields = {name: getattr(llama, name) for name in _SHARED_FIELDS}
    fields["rope_theta"] = _plain_rope_theta(llama)
    if llama.dtype is not None:
        fields["dtype"] = str(llama.dtype).removeprefix("torch.")
    return fields


def _plain_rope_theta(llama: Any) -> float:
    params = getattr(llama, "rope_parameters", None)
    if params is None:  # transformers versions before rope_parameters
        scaling = getattr(llama, "rope_scaling", None)
        params = {
            "rope_type": "default" if not scaling else scaling.get("rope_type", scaling.get("type")),
            "rope_theta": getattr(llama, "rope_theta", 10000.0),
        }
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"rope scaling {rope_type!r} is not supported: LongLLaMA uses plain RoPE "
            "(rope_type 'default'); convert a model without rope scaling"
        )
    return float(params.get("rope_theta", 10000.0))


def _longllama_config_json(config: LongLlamaConfig) -> dict[str, Any]:
    out = config.to_diff_dict()
    full = config.to_dict()
    # Write every model field even when it equals a default, so the file reads the same under any version.
    out.update({name: full[name] for name in (*_SHARED_FIELDS, "rope_theta", *_FOT_FIELDS)})
    out["model_type"] = "longllama"
    out["architectures"] = ["LongLlamaForCausalLM"]
    return out


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    per_layer = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _check_llama_tensors(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """The weights must be exactly the HF LLaMA tensors that the config describes."""
    expected = _expected_shapes(config)
    tied_head = {"lm_head.weight"} if config.get("tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - tied_head)
    if missing or unexpected:
        name, kind = (missing[0], "is missing") if missing else (unexpected[0], "is not a LLaMA tensor")
        raise CheckpointError(
            f"weight {name} {kind} ({len(missing)} missing, {len(unexpected)} unexpected): "
            "the weights do not match config.json; convert a plain LlamaForCausalLM checkpoint"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"weight {name} has shape {tuple(state[name].shape)}, config.json implies {shape}: "
                "the weights and config.json do not belong together"
            )


def _write_folder(
    dst: PathLike, *, src: Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], max_shard_size: int | str
) -> None:
    """Build the whole destination in a sibling temporary folder, then rename it into place."""
    final = Path(dst)
    _check_destination(final, src)

    def write(temp: Path) -> None:
        temp.mkdir()
        (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in AUX_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, temp / name)
        _rebuild_tokenizer_files(temp)
        save_state_dict(state, temp, max_shard_size=max_shard_size)

    write_folder(final, write)  # the destination is empty or absent (_check_destination)
    logger.info("wrote %s from %s", final, src)


def _rebuild_tokenizer_files(folder: Path) -> None:
    """Rewrite the transformers tokenizer files from the folder's tokenizer.model (and its new config.json): copied
    ones may name LlamaTokenizer, whose 5.x conversion is inexact, or the source's context length."""
    from longllama.tokenizer import TOKENIZER_FILE, write_tokenizer_files

    if not (folder / TOKENIZER_FILE).is_file():
        return
    try:
        write_tokenizer_files(folder)
    except CheckpointError as exc:
        # A tokenizer longllama cannot encode exactly does not stop the conversion of the weights.
        logger.warning("kept the copied tokenizer files: %s", exc)


def _check_destination(final: Path, src: Path) -> None:
    if final.resolve() == src.resolve():
        raise CheckpointError(f"destination {final} is the source folder: choose a new folder")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"destination {final} already exists and is not empty: choose a new folder or remove it")
