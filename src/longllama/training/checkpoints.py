"""Weights of a run on disk: the model it starts from, its checkpoints (save, resume) and the exported model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longllama.config import LongLlamaConfig, preset
from longllama.files import replace_folder, write_folder
from longllama.training.config import WEIGHT_DTYPES, ModelSettings, TrainError
from longllama.training.parallel import Processes

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "model"
ADAPTER_DIR = "adapter"  # lora.export=adapter
STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


# --------------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------------------------


def build_model(settings: ModelSettings) -> nn.Module:
    """The LongLlamaForCausalLM to train, on the CPU in `settings.dtype` (seed torch first for a preset)."""
    from longllama import LongLlamaForCausalLM

    overrides = dict(settings.overrides)
    if settings.mem_layers is not None:
        overrides["mem_layers"] = list(settings.mem_layers)
    if settings.path is None:
        model = LongLlamaForCausalLM(preset(settings.preset, **overrides))
    else:
        folder = Path(settings.path)
        kind = _model_type(folder)
        if kind == "llama":
            model = _from_llama_folder(folder, overrides)
        else:
            model = LongLlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides)
    return model.to(WEIGHT_DTYPES[settings.dtype])


def _model_type(folder: Path) -> str:
    try:
        kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(
            f"model.path {folder}: cannot read config.json ({exc.__class__.__name__}); pass a "
            "LongLLaMA or LLaMA checkpoint folder"
        ) from None
    if kind not in ("longllama", "llama"):
        raise TrainError(f"model.path {folder} holds a {kind!r} model: pass a LongLLaMA or LLaMA checkpoint folder")
    return kind


def _from_llama_folder(folder: Path, overrides: dict[str, Any]) -> nn.Module:
    """A transformers LLaMA checkpoint as a LongLLaMA with chosen memory layers: the tensor names are the same, so
    the weights load strictly (docs/checkpoints.md#tensor-names)."""
    from longllama import LongLlamaForCausalLM, checkpoint

    if "mem_layers" not in overrides:
        raise TrainError(
            f"model.path {folder} is a LLaMA checkpoint: choose its memory layers with "
            "model.mem_layers (e.g. [6, 12, 18] for a 26-layer 3B)"
        )
    # The converter's own reading of LLaMA configs, so training and `longllama convert` accept the same models.
    fields = checkpoint._llama_fields(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    fields.setdefault("last_context_length", max(1, fields["max_position_embeddings"] // 2))
    config = LongLlamaConfig(**{**fields, "dtype": None, **overrides})
    model = LongLlamaForCausalLM(config)
    state = checkpoint.load_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        name = min(set(missing) - tied or unexpected)
        raise TrainError(
            f"{folder}: weight {name} does not match a LongLLaMA of this config "
            f"({len(missing)} missing, {len(unexpected)} unexpected); pass a plain LlamaForCausalLM"
        )
    return model.float()


def load_training_tokenizer(settings: ModelSettings) -> Any:
    """The tokenizer of model.tokenizer, else of model.path when that folder holds tokenizer.model, else None."""
    from longllama.tokenizer import TOKENIZER_FILE, load_tokenizer

    folder = settings.tokenizer
    if folder is None and settings.path is not None and (Path(settings.path) / TOKENIZER_FILE).is_file():
        folder = settings.path
    if folder is None:
        return None
    path = Path(folder)
    return load_tokenizer(path.parent if path.name == TOKENIZER_FILE else path)


def tokenizer_file(settings: ModelSettings) -> Path | None:
    """tokenizer.model that goes with the exported model, if there is one."""
    for folder in (settings.tokenizer, settings.path):
        if folder is not None:
            path = Path(folder)
            path = path if path.name == "tokenizer.model" else path / "tokenizer.model"
            if path.is_file():
                return path
    return None


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# --------------------------------------------------------------------------------------------------------------------


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are not listed)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: Mapping[str, Any],
    procs: Processes,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically: every rank writes its part into a temporary folder, rank 0 adds
    trainer_state.json last and renames the folder; a failed save removes its folder and leaves older ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = out_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    temp = Path(procs.broadcast(str(root / f".step-{step:08d}.{uuid.uuid4().hex[:8]}.tmp")))
    try:
        if procs.main:
            temp.mkdir(parents=True)
        procs.barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
        with _single_process_dcp(procs):
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=temp, no_dist=not procs.distributed)
        torch.save(_rng_state(), temp / f"rng-{procs.rank}.pt")
        procs.barrier()
        if procs.main:
            _write_json(temp / STATE_FILE, trainer_state)
            replace_folder(temp, final)
            _prune(root, keep)
        procs.barrier()
    except BaseException:
        if procs.main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    return final


def _state_options(model: nn.Module) -> Any:
    """What a checkpoint holds: every weight, or only the trainable ones where some are frozen (LoRA: the base model
    is rebuilt from model.path / the preset on resume, so only the adapters and their optimiser state are saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


@contextlib.contextmanager
def _single_process_dcp(procs: Processes) -> Iterator[None]:
    """torch.distributed.checkpoint warns on every call without a process group; that is intended here."""
    with warnings.catch_warnings():
        if not procs.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename that makes the checkpoint visible


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; also clear temporary folders left by saves that were killed."""
    for stale in root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, procs: Processes
) -> dict[str, Any]:
    """Restore model, optimiser and RNG states in place (any world size: the checkpoint is resharded on load);
    returns the trainer state (step, data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / STATE_FILE).is_file():
        raise TrainError(f"{folder} is not a complete training checkpoint (no {STATE_FILE}); pick another one")
    trainer_state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    options = _state_options(model)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_dcp(procs):
        dcp.load(state, checkpoint_id=folder, no_dist=not procs.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    rng_file = folder / f"rng-{procs.rank}.pt"
    _set_rng_state(torch.load(rng_file if rng_file.is_file() else folder / "rng-0.pt", weights_only=False))
    return trainer_state


def export_model(model: nn.Module, folder: Path, *, procs: Processes, tokenizer: Path | None = None) -> Path:
    """Write the full model as a from_pretrained folder (config.json + safetensors; tokenizer.model and its
    transformers tokenizer files if given), gathered on rank 0 from shards if needed, into a temporary folder that is
    renamed into place."""
    from longllama.checkpoint import save_state_dict

    state = _full_state_dict(model, procs)
    if procs.main:
        inner = getattr(model, "module", model)
        config = inner.config
        config.architectures = [type(inner).__name__.removeprefix("FSDP")]
        config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")

        def write(temp: Path) -> None:
            temp.mkdir()
            config.save_pretrained(temp)
            save_state_dict(state, temp)
            if tokenizer is not None:
                from longllama.tokenizer import write_tokenizer_files

                shutil.copy2(tokenizer, temp / "tokenizer.model")
                write_tokenizer_files(temp)  # AutoTokenizer then loads the exact tokenizer (after config.json)

        write_folder(folder, write)
    procs.barrier()
    return folder


def export_adapter(model: nn.Module, folder: Path, *, procs: Processes, tokenizer: Path | None = None) -> Path:
    """Write a peft model's adapter (adapter_config.json + weights, tokenizer.model if given) on rank 0, into a
    temporary folder that is renamed into place."""
    if procs.main:
        peft_model = getattr(model, "module", model)

        def write(temp: Path) -> None:
            peft_model.save_pretrained(temp)
            if tokenizer is not None:
                shutil.copy2(tokenizer, temp / "tokenizer.model")

        write_folder(folder, write)
    procs.barrier()
    return folder


def _full_state_dict(model: nn.Module, procs: Processes) -> dict[str, torch.Tensor]:
    if not procs.distributed:
        return {name: tensor.detach().cpu() for name, tensor in getattr(model, "module", model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
