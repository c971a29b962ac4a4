"""Train LongLLaMA: FoT continued pre-training with cross-batch memory (SPEC C) and instruction / chat fine-tuning
(SPEC D), in one loop that runs on one CPU or GPU, or on several GPUs through torchrun with DDP or FSDP2.

`load_config("configs/tiny-pretrain.yaml", overrides=["steps=3"])` reads a YAML file into a `TrainConfig`; `train(config)`
runs it. What a run does:

* model: a preset (`model.preset: tiny`) or a folder (`model.path`): a LongLLaMA checkpoint, or a transformers LLaMA
  one (GQA included) that becomes LongLLaMA in memory with the `model.mem_layers` you choose (same tensor names,
  strict load);
* data, `mode: pretrain`: documents -> `TokenizedDocs` -> `build_pipeline(data.pipeline)` batches of
  `data.batch_size` x `data.seq_len`; each batch is cut into contiguous micro-batches (one group per rank, then
  `grad_accum` per rank), and memory layers attend across entries of one micro-batch only (SPEC C.4), so cross-batch
  negatives come from the rank-local micro-batch. Loss: the per-sequence mean of SPEC C.4. Evaluation uses cross-batch
  range 0 on `data.eval_pipeline` (doc_aware_k1), restarted from the first eval document each time;
* data, `mode: finetune`: JSONL rows -> `InstructionExample` / `ChatExample` padded to `max_total_length` (a named
  `data.mixture` of SPEC D.2 or one `data.template`), read by the model's long-input handler, so the first
  T - last_context_length tokens go to memory and the last window attends to them (SPEC D.4). Loss: the token mean
  over labelled positions (the model's `labels=` loss);
* optimiser: AdamW (b1 0.9, b2 0.95, weight decay on every parameter, global-norm clipping), linear warm-up then cosine
  decay to `end_lr` at `decay_steps`, or constant; optional bf16 autocast, activation checkpointing per decoder layer
  (applied from outside the model), torch.compile per layer;
* output in `out_dir`: `checkpoints/step-NNNNNNNN/` (model and optimiser through torch.distributed.checkpoint, RNG
  states, data position, step; written under a temporary name and renamed, the last `keep_checkpoints` kept),
  `log.jsonl`, `loss.png` (when matplotlib is installed) and the final `model/` folder that
  `LongLlamaForCausalLM.from_pretrained` loads. `resume: true` continues from the newest checkpoint and gives the same
  losses as a run that was never stopped.

Paths written in a config file (data.train, data.eval, model.path, model.tokenizer) are read relative to the file's
folder; `out_dir` and values given as overrides are relative to the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longllama.cache import LayerState
from longllama.config import LongLlamaConfig, preset
from longllama.cross_batch import make_cross_batch
from longllama.data import IGNORE_INDEX
from longllama.errors import LongLlamaError

logger = logging.getLogger(__name__)

MODES = ("pretrain", "finetune")
PARALLEL = ("none", "ddp", "fsdp2")
SCHEDULES = ("cosine", "constant")
AUTOCAST = ("auto", "none", "bfloat16")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "model"
LOG_FILE = "log.jsonl"
TIME_CHECK_EVERY = 10  # steps between looks at the clock under max_seconds (each needs a saved data state)
PLOT_FILE = "loss.png"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


class TrainError(LongLlamaError, ValueError):
    """A training setting or file that cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    """Where the weights come from: a preset (random init) or a folder (LongLLaMA or transformers LLaMA)."""

    preset: str | None = "tiny"
    path: str | None = None  # wins over preset
    mem_layers: list[int] | None = None  # None: the preset's / checkpoint's; required for a LLaMA folder
    overrides: dict[str, Any] = field(default_factory=dict)  # other LongLlamaConfig fields
    tokenizer: str | None = None  # folder with tokenizer.model; None: model.path when it holds one
    dtype: str = "float32"  # weights and optimiser state


@dataclass
class DataSettings:
    train: list[Any] = field(default_factory=list)  # files or folders (finetune mixture: one entry per part)
    eval: list[str] = field(default_factory=list)
    # pretrain (SPEC C.1, C.2)
    field: str = "text"
    shuffle_seed: int | None = None  # shuffle the order of the files each epoch
    min_length: int = 0
    pipeline: str = "doc_aware"
    seq_len: int = 2048
    batch_size: int = 8  # entries per optimiser step, over all ranks and micro-batches
    cross_batch_range: int = 1
    stepping: bool = True
    negatives: bool = True  # false: memory layers see earlier chunks of their own document only (an ablation)
    eval_pipeline: str = "doc_aware_k1"
    eval_batch_size: int | None = None  # None: batch_size
    eval_seq_len: int | None = None  # None: seq_len
    eval_min_length: int = 0
    read_ahead: int = 32  # documents tokenized per batched call (same documents and states as one at a time)
    # finetune (SPEC D.1-D.4)
    template: str = "openorca-3b"
    mixture: str | None = None
    filter: str = ""
    max_input_length: int | None = None  # None: the mixture's, else 2048
    max_output_length: int | None = None
    max_total_length: int | None = None
    random_pad: bool = True
    last_context_length: int | None = None  # None: the model's


@dataclass
class OptimSettings:
    lr: float = 1e-5
    end_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: the run's `steps`
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float | None = 1.0


@dataclass
class TrainConfig:
    mode: str = "pretrain"
    out_dir: str = "runs/longllama"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    steps: int = 100
    grad_accum: int = 1
    seed: int = 42
    device: str = "auto"
    autocast: str = "auto"  # auto: bf16 on CUDA, none on CPU
    tf32: bool = True  # TF32 matmuls on CUDA (the reference fine-tuning runs used them)
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: str = "none"
    eval_every: int = 0  # 0: never
    eval_steps: int = 10
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool | str = False  # true: the newest checkpoint in out_dir; a path: that checkpoint
    export: bool = True
    progress: bool = True
    max_seconds: float | None = None  # stop after this much training time (then save and export as at the end)

    def check(self) -> None:
        """Raise TrainError for a value out of range (before any process group or model exists)."""
        _choice("mode", self.mode, MODES)
        _choice("parallel", self.parallel, PARALLEL)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("autocast", self.autocast, AUTOCAST)
        _choice("model.dtype", self.model.dtype, tuple(WEIGHT_DTYPES))
        for name in ("steps", "grad_accum", "eval_steps", "keep_checkpoints", "log_every", "data.batch_size",
                     "data.seq_len"):
            _positive(name, _get(self, name))
        for name in ("eval_every", "save_every", "optim.warmup_steps", "data.cross_batch_range"):
            if _get(self, name) < 0:
                raise TrainError(f"{name}={_get(self, name)} must be 0 or more")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise TrainError(f"max_seconds={self.max_seconds} must be a positive number of seconds (or null)")
        if self.model.path is None and self.model.preset is None:
            raise TrainError("no model: set model.preset (e.g. tiny) or model.path (a checkpoint folder)")
        if not self.data.train:
            raise TrainError("data.train is empty: list the training files (.jsonl, .txt, .parquet) or folders")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise TrainError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainError(f"{name}={value!r} must be a positive integer")


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def load_config(path: str | os.PathLike[str], *, overrides: Sequence[str] = (), mode: str | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file plus "key=value" overrides (dotted keys, YAML values: `optim.lr=3e-4`,
    `model.mem_layers=[1,3]`); `mode` forces pretrain / finetune."""
    import yaml

    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainError(f"config file {file} does not exist: pass a YAML file such as configs/tiny-pretrain.yaml") \
            from None
    except yaml.YAMLError as exc:
        raise TrainError(f"config file {file} is not valid YAML ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(raw, dict):
        raise TrainError(f"config file {file} must hold a mapping of settings, not {type(raw).__name__}")
    _resolve_paths(raw, file.resolve().parent)
    for text in overrides:
        apply_override(raw, text)
    if mode is not None:
        raw["mode"] = mode
    return config_from_dict(raw)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Paths in a config file are relative to the file, so a config works from any working directory."""

    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            return str(base / value)
        return value

    for section, keys in (("data", ("train", "eval")), ("model", ("path", "tokenizer"))):
        part = raw.get(section)
        if isinstance(part, dict):
            for key in keys:
                if part.get(key) is not None:
                    part[key] = resolve(part[key])


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Set `key.path=value` in a raw config mapping; the value is read as YAML ("3" -> 3, "[1,3]" -> [1, 3])."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise TrainError(f"override {text!r} is not KEY=VALUE (e.g. steps=10 or optim.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainError(f"override {text!r}: {part} is not a section of settings")
        node = child
    node[leaf] = parsed


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Build and check a TrainConfig; unknown keys and values of the wrong type are one-line TrainErrors."""
    config = _build(TrainConfig, raw, "")
    config.check()
    return config


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise TrainError(f"{prefix.rstrip('.') or 'config'} must be a mapping of settings, not {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrainError(f"unknown setting {prefix}{unknown[0]}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a YAML value against a field type; numbers YAML reads as text ("2e-5") become floats."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise TrainError(f"{name} cannot be null")
    for option in options:
        converted = _convert(value, option)
        if converted is not _NO:
            return converted
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise TrainError(f"{name}={value!r} must be {wanted}")


_NO = object()


def _convert(value: Any, option: Any) -> Any:
    origin = typing.get_origin(option)
    if origin is list and isinstance(value, str):
        return [value]  # `train: corpus.jsonl` means a list of one file
    if origin in (list, dict):
        return value if isinstance(value, origin) else _NO
    if option is Any:
        return value
    if option is bool:
        return value if isinstance(value, bool) else _NO
    if option is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if option is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        with contextlib.suppress(TypeError, ValueError):
            return float(value)  # PyYAML reads 2e-5 (no dot) as a string
        return _NO
    if option is str:
        return value if isinstance(value, str) else _NO
    return _NO


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
        raise TrainError(f"model.path {folder}: cannot read config.json ({exc.__class__.__name__}); pass a "
                         "LongLLaMA or LLaMA checkpoint folder") from None
    if kind not in ("longllama", "llama"):
        raise TrainError(f"model.path {folder} holds a {kind!r} model: pass a LongLLaMA or LLaMA checkpoint folder")
    return kind


def _from_llama_folder(folder: Path, overrides: dict[str, Any]) -> nn.Module:
    """A transformers LLaMA checkpoint as a LongLLaMA with chosen memory layers: the tensor names are the same, so
    the weights load strictly (SPEC A.3)."""
    from longllama import LongLlamaForCausalLM, checkpoint

    if "mem_layers" not in overrides:
        raise TrainError(f"model.path {folder} is a LLaMA checkpoint: choose its memory layers with "
                         "model.mem_layers (e.g. [6, 12, 18] for a 26-layer 3B)")
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
        raise TrainError(f"{folder}: weight {name} does not match a LongLLaMA of this config "
                         f"({len(missing)} missing, {len(unexpected)} unexpected); pass a plain LlamaForCausalLM")
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
# Loss and learning rate
# --------------------------------------------------------------------------------------------------------------------


def sequence_mean_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """SPEC C.4: fp32 NLL, summed over each row's masked positions, divided by max(mask sum, 1e-10), averaged over
    rows (a per-sequence mean: a row with few loss tokens weighs as much as a full one)."""
    b, n, v = logits.shape
    nll = F.cross_entropy(logits.float().reshape(b * n, v), targets.reshape(b * n), reduction="none").view(b, n)
    mask = loss_mask.to(nll.dtype)
    return ((nll * mask).sum(-1) / mask.sum(-1).clamp_min(1e-10)).mean()


def learning_rate(update: int, optim: OptimSettings, *, steps: int) -> float:
    """The learning rate of update number `update` (0 for the first): linear warm-up from 0 over warmup_steps, then
    cosine from lr to end_lr at decay_steps (end_lr after), or constant lr (SPEC C.4, D.3)."""
    if update < optim.warmup_steps:
        return optim.lr * update / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay = optim.decay_steps if optim.decay_steps is not None else steps
    progress = min((update - optim.warmup_steps) / max(1, decay - optim.warmup_steps), 1.0)
    return optim.end_lr + (optim.lr - optim.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim: OptimSettings) -> torch.optim.Optimizer:
    # One group: the reference decays every parameter, norms and embeddings included (SPEC C.4).
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                             weight_decay=optim.weight_decay)


# --------------------------------------------------------------------------------------------------------------------
# Data: tasks (what a batch is, its loss, its evaluation) and how a batch is cut up
# --------------------------------------------------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`parts` contiguous slices of the batch rows (micro-batches: cross-batch never crosses their borders)."""
    size = next(iter(batch.values())).shape[0]
    step = size // parts
    return [{name: value[i * step:(i + 1) * step] for name, value in batch.items()} for i in range(parts)]


def _device_batch(batch: Batch, device: torch.device) -> Batch:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


class PretrainTask:
    """FoT pre-training batches (SPEC C.2), the cross-batch setting (C.3) and the per-sequence loss (C.4)."""

    def __init__(self, config: TrainConfig, tokenizer: Any) -> None:
        data = config.data
        if tokenizer is None:
            raise TrainError("pretraining reads text: set model.tokenizer to a folder with tokenizer.model")
        self.data, self.tokenizer = data, tokenizer
        self.batches = self._pipeline(data.train, data.pipeline, data.batch_size, data.seq_len, data.min_length,
                                      shuffle_seed=data.shuffle_seed)
        self.cross_batch = make_cross_batch(cross_batch_range=data.cross_batch_range, data_pipeline=data.pipeline,
                                            stepping=data.stepping, negatives=data.negatives)
        # SPEC C.3: evaluation sees no other entries, so memory layers act as plain causal attention.
        self.eval_cross_batch = make_cross_batch(cross_batch_range=0, data_pipeline=data.eval_pipeline,
                                                 stepping=False)
        self.eval_batch_size = data.eval_batch_size or data.batch_size
        self._eval_cache: list[Batch] = []

    def _pipeline(self, files: Sequence[Any], name: str, batch_size: int, seq_len: int, min_length: int, *,
                  shuffle_seed: int | None = None) -> Any:
        from longllama.data import TokenizedDocs, build_pipeline, iter_documents

        # Looping forever, as the reference's JSON dataset does: steps, not epochs, end a run.
        docs = iter_documents(files, field=self.data.field, loop=True, shuffle_seed=shuffle_seed)
        tokens = TokenizedDocs(docs, tokenizer=self.tokenizer, min_length=min_length,
                               read_ahead=self.data.read_ahead)
        return build_pipeline(name, tokens, batch_size=batch_size, seq_len=seq_len)

    def check_split(self, parts: int) -> None:
        k = self.cross_batch.dataset_packing
        size, rest = divmod(self.data.batch_size, parts)
        if rest or size % k:
            raise TrainError(f"data.batch_size={self.data.batch_size} must split into {parts} micro-batches "
                             f"(ranks x grad_accum) of whole {k}-packs: use a multiple of {parts * k}")
        if self.eval_batch_size % parts:
            raise TrainError(f"data.eval_batch_size={self.eval_batch_size} must be a multiple of {parts} "
                             "(ranks x grad_accum)")

    def loss(self, model: nn.Module, batch: Batch, *, evaluate: bool = False) -> torch.Tensor:
        cross_batch = self.eval_cross_batch if evaluate else self.cross_batch
        logits = model(input_ids=batch["input_ids"], cross_batch=cross_batch).logits
        return sequence_mean_loss(logits, batch["targets"], batch["loss_mask"])

    def eval_batches(self, count: int) -> Iterator[Batch]:
        """The first `count` eval batches, the same ones at every evaluation (so evaluations compare); made once."""
        if not self.data.eval:
            return iter(())
        if len(self._eval_cache) < count:
            pipeline = self._pipeline(self.data.eval, self.data.eval_pipeline, self.eval_batch_size,
                                      self.data.eval_seq_len or self.data.seq_len, self.data.eval_min_length)
            self._eval_cache = [next(pipeline) for _ in range(count)]
        return iter(self._eval_cache[:count])


class SFTBatches:
    """Batches of fine-tuning examples in a fresh permutation each epoch (drawn from seed and epoch); resumable.

    Only the rows of `rows` (a slice of the global batch: this rank's) are built; random padding of an example
    depends on (seed, epoch, index), so every rank and every resumed run builds the same tensors."""

    def __init__(self, dataset: Any, *, batch_size: int, seed: int, pad_id: int,
                 rows: tuple[int, int] | None = None) -> None:
        if len(dataset) == 0:
            raise TrainError("the fine-tuning data has no rows (all filtered out?); check data.train and data.filter")
        self.dataset, self.batch_size, self.seed, self.pad_id = dataset, batch_size, seed, pad_id
        self.rows = rows or (0, batch_size)
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next_indices(self) -> list[tuple[int, int]]:
        """(epoch, item) of the next global batch, wrapping into the next epoch when one ends."""
        picked: list[tuple[int, int]] = []
        order = self._order(self.epoch)
        while len(picked) < self.batch_size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            picked.append((self.epoch, int(order[self.position])))
            self.position += 1
        return picked

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> Batch:
        from longllama.data import collate_sft

        lo, hi = self.rows
        examples = []
        for epoch, index in self.next_indices()[lo:hi]:
            _set_epoch(self.dataset, epoch)
            examples.append(self.dataset[index])
        return collate_sft(examples, pad_id=self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sft", "size": len(self.dataset), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "sft" or state.get("size") != len(self.dataset):
            raise TrainError(f"checkpoint data state {dict(state)} does not belong to this fine-tuning data "
                             f"({len(self.dataset)} rows): resume with the data of the saved run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _set_epoch(dataset: Any, epoch: int) -> None:
    for part in getattr(dataset, "datasets", [dataset]):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


class FinetuneTask:
    """Instruction / chat fine-tuning (SPEC D): padded examples, one memory window plus the last window (D.4), and
    the token-mean loss of the labelled positions."""

    def __init__(self, config: TrainConfig, tokenizer: Any, *, rank_rows: tuple[int, int]) -> None:
        from longllama.data import pad_id_of

        if tokenizer is None:
            raise TrainError("fine-tuning reads text: set model.tokenizer to a folder with tokenizer.model")
        self.data = config.data
        self.pad_id = pad_id_of(tokenizer)
        self.dataset = self._dataset(self.data.train, tokenizer, seed=config.seed)
        self.batches = SFTBatches(self.dataset, batch_size=self.data.batch_size, seed=config.seed,
                                  pad_id=self.pad_id, rows=rank_rows)
        self.eval_dataset = self._dataset(self.data.eval, tokenizer, seed=config.seed) if self.data.eval else None
        self.eval_batch_size = self.data.eval_batch_size or self.data.batch_size
        self.rank_rows = rank_rows

    def _lengths(self) -> Any:
        from longllama.data import MIXTURES, SFTLengths

        base = MIXTURES[self.data.mixture].lengths if self.data.mixture else SFTLengths()
        chosen = {name: getattr(self.data, name) for name in ("max_input_length", "max_output_length",
                                                               "max_total_length")}
        return dataclasses.replace(base, random_pad=self.data.random_pad,
                                   **{k: v for k, v in chosen.items() if v is not None})

    def _dataset(self, files: Sequence[Any], tokenizer: Any, *, seed: int) -> Any:
        from longllama.data import MIXTURES, MixedDataset

        lengths = self._lengths()
        if self.data.mixture is None:
            return _sft_dataset(files, self.data.template, self.data.filter, tokenizer, lengths, seed=seed)
        if self.data.mixture not in MIXTURES:
            raise TrainError(f"data.mixture={self.data.mixture!r} is unknown: use one of {', '.join(MIXTURES)}")
        parts = MIXTURES[self.data.mixture].parts
        if len(files) != len(parts):
            raise TrainError(f"mixture {self.data.mixture} has {len(parts)} parts ({', '.join(p.template for p in parts)}):"
                             f" give data.train {len(parts)} entries (files of each part), got {len(files)}")
        datasets = [_sft_dataset(part_files, part.template, part.filter, tokenizer, lengths, seed=seed)
                    for part_files, part in zip(files, parts)]
        return MixedDataset(datasets, [part.proportion for part in parts])

    def check_split(self, parts: int) -> None:
        if self.data.batch_size % parts or self.eval_batch_size % parts:
            raise TrainError(f"data.batch_size={self.data.batch_size} and eval batch {self.eval_batch_size} must "
                             f"split into {parts} micro-batches (ranks x grad_accum): use multiples of {parts}")

    def loss(self, model: nn.Module, batch: Batch, *, evaluate: bool = False) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    last_context_length=self.data.last_context_length, use_cache=False)
        if not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            # Truncation can cut every answer off; a mean over no tokens is NaN and would poison the weights.
            # A zero that still touches every parameter keeps DDP/FSDP gradient reduction in step.
            return out.logits.sum() * 0.0
        return out.loss

    def eval_batches(self, count: int) -> Iterator[Batch]:
        """The first `count` batches of the eval rows, in file order."""
        from longllama.data import collate_sft

        if self.eval_dataset is None:
            return iter(())
        size = self.eval_batch_size
        starts = range(0, min(count * size, len(self.eval_dataset) // size * size), size)
        return (collate_sft([self.eval_dataset[start + i] for i in range(size)], pad_id=self.pad_id)
                for start in starts)


def _sft_dataset(files: Any, template: str, row_filter: str, tokenizer: Any, lengths: Any, *, seed: int) -> Any:
    from longllama.data import (
        TEMPLATES,
        ChatExample,
        ChatTemplate,
        InstructionExample,
        SFTDataset,
        filter_rows,
        read_rows,
    )

    if template not in TEMPLATES:
        raise TrainError(f"data.template={template!r} is unknown: use one of {', '.join(TEMPLATES)}")
    rows = read_rows(files)
    if row_filter:
        rows = filter_rows(rows, row_filter, tokenizer=tokenizer)
    kind = ChatExample if isinstance(TEMPLATES[template], ChatTemplate) else InstructionExample
    return SFTDataset(rows, kind(tokenizer, template=template, lengths=lengths), seed=seed)


# --------------------------------------------------------------------------------------------------------------------
# Activation checkpointing, compile, processes and parallelism (applied from outside the model)
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_layers(model: nn.Module, *, every: int = 1) -> int:
    """Recompute decoder layers idx % every == 0 in the backward pass instead of keeping their activations.

    The layer's forward is wrapped on the instance, so the model code is untouched and FSDP/DDP hooks still run.
    Returns the number of layers wrapped."""
    layers = _decoder_layers(model)
    for idx, layer in enumerate(layers):
        if idx % every == 0:
            layer.forward = _checkpointed(layer.forward)
    return len(range(0, len(layers), every))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "module", model)  # DDP
    return inner.model.layers


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    def run(x: torch.Tensor, *, state: LayerState, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(x, state=state, **kwargs)
        # A memory window appends to the layer's memory; the recomputation must start from the state the first
        # pass saw and must not append again, so it runs on a copy of that state.
        before = _copy_state(state)
        calls = [0]

        def body(h: torch.Tensor) -> Any:
            target = state if calls[0] == 0 else _copy_state(before)
            calls[0] += 1
            return forward(h, state=target, **kwargs)

        return checkpoint(body, x, use_reentrant=False)

    return run


def _copy_state(state: LayerState) -> LayerState:
    memory = None if state.memory is None else state.memory.fork()
    return LayerState(state.keys, state.values, state.positions, memory)


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (parameter names stay as they are, unlike torch.compile(model))."""
    for layer in _decoder_layers(model):
        layer.compile()


@dataclass
class Processes:
    """This process's place in the run: rank, world size, device (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (for logged numbers)."""
        if not self.distributed or self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item() / self.world)

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start_processes(config: TrainConfig) -> Processes:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA), or make a group of one for ddp/fsdp2 runs
    started without torchrun, so both take the same code path."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and config.parallel == "none":
        raise TrainError(f"started as {world} processes but parallel=none: set parallel=ddp or parallel=fsdp2")
    device = _device(config.device, local_rank)
    procs = Processes(rank=rank, world=world, local_rank=local_rank, device=device)
    if config.parallel == "none" or dist.is_initialized():
        return procs
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    procs.owns_group = True
    return procs


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device={name}: CUDA is not available here; use device=cpu")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes(procs: Processes) -> None:
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, parallel: str, procs: Processes) -> nn.Module:
    """DDP around the model, or FSDP2: `fully_shard` on each decoder layer, then on the root."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [procs.device.index] if procs.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(procs.device.type, (procs.world,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _sync_context(model: nn.Module, parallel: str, last: bool) -> contextlib.AbstractContextManager:
    """Gradient reduction only after the last micro-batch of a step."""
    if parallel == "ddp" and not last:
        return model.no_sync()
    if parallel == "fsdp2":
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
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


def save_checkpoint(out_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: Mapping[str, Any], procs: Processes, keep: int) -> Path:
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
        model_state, optim_state = get_state_dict(model, optimizer)
        with _single_process_dcp(procs):
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=temp, no_dist=not procs.distributed)
        torch.save(_rng_state(), temp / f"rng-{procs.rank}.pt")
        procs.barrier()
        if procs.main:
            _write_json(temp / STATE_FILE, trainer_state)
            _replace_folder(temp, final)
            _prune(root, keep)
        procs.barrier()
    except BaseException:
        if procs.main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    return final


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


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_folder(temp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing one (a re-save of the same step) is swapped out first."""
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    _fsync_folder(final.parent)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; also clear temporary folders left by saves that were killed."""
    for stale in root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    procs: Processes) -> dict[str, Any]:
    """Restore model, optimiser and RNG states in place (any world size: the checkpoint is resharded on load);
    returns the trainer state (step, data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / STATE_FILE).is_file():
        raise TrainError(f"{folder} is not a complete training checkpoint (no {STATE_FILE}); pick another one")
    trainer_state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_dcp(procs):
        dcp.load(state, checkpoint_id=folder, no_dist=not procs.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = folder / f"rng-{procs.rank}.pt"
    _set_rng_state(torch.load(rng_file if rng_file.is_file() else folder / "rng-0.pt", weights_only=False))
    return trainer_state


def export_model(model: nn.Module, folder: Path, *, procs: Processes, tokenizer: Path | None = None) -> Path:
    """Write the full model as a from_pretrained folder (config.json + safetensors, tokenizer.model if given),
    gathered on rank 0 from shards if needed, into a temporary folder that is renamed into place."""
    from longllama.checkpoint import save_state_dict

    state = _full_state_dict(model, procs)
    if procs.main:
        inner = getattr(model, "module", model)
        config = inner.config
        config.architectures = [type(inner).__name__.removeprefix("FSDP")]
        config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            temp.mkdir()
            config.save_pretrained(temp)
            save_state_dict(state, temp)
            if tokenizer is not None:
                shutil.copy2(tokenizer, temp / "tokenizer.model")
            _replace_folder(temp, folder)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    procs.barrier()
    return folder


def _full_state_dict(model: nn.Module, procs: Processes) -> dict[str, torch.Tensor]:
    if not procs.distributed:
        return {name: tensor.detach().cpu() for name, tensor in getattr(model, "module", model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------------------------------------------------
# Logs: JSONL, progress bar, loss curve
# --------------------------------------------------------------------------------------------------------------------


class RunLog:
    """log.jsonl (one JSON object per record) and a progress bar on stderr, on rank 0 only."""

    def __init__(self, path: Path, *, start_step: int, total: int, enabled: bool, progress: bool) -> None:
        self.path, self.enabled = path, enabled
        self.bar = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(path, start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def advance(self, record: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _truncate_log(path: Path, start_step: int) -> None:
    """A resumed run continues the log from its checkpoint: records of later steps (written by the run that was
    stopped) are dropped. A new run starts an empty log."""
    if not path.is_file():
        return
    kept = []
    if start_step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Draw training (and eval) loss against step into a PNG; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no loss plot: matplotlib is not installed (pip install matplotlib)")
        return False
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int  # the last step reached
    losses: dict[int, float]  # training loss of each step run in this call
    eval_losses: dict[int, float]
    export_dir: Path | None
    model: nn.Module  # the trained model (wrapped by DDP/FSDP when parallel)
    main: bool  # rank 0


class Trainer:
    """One training run: model, optimiser, task and the step / evaluate / save / export cycle."""

    def __init__(self, config: TrainConfig, procs: Processes) -> None:
        self.config, self.procs = config, procs
        self.out_dir = Path(config.out_dir)
        self.parts = procs.world * config.grad_accum
        _seed_everything(config.seed)
        self.tokenizer = load_training_tokenizer(config.model)
        self.task = self._task()
        self.task.check_split(self.parts)
        self.model = self._model()
        self.optimizer = make_optimizer(self.model, config.optim)
        self.step = 0
        self.tokens_seen = 0
        self._autocast = _autocast_dtype(config.autocast, procs.device)
        if procs.device.type == "cuda" and config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _task(self) -> PretrainTask | FinetuneTask:
        if self.config.mode == "pretrain":
            from longllama.data import Prefetcher

            task = PretrainTask(self.config, self.tokenizer)
            # The next batches are made while the GPU runs this step; states only where a checkpoint may be saved.
            task.batches = Prefetcher(task.batches, state_at=self._saves_after,
                                      pin=self.procs.device.type == "cuda")
            return task
        size = self.config.data.batch_size // self.procs.world
        rows = (self.procs.rank * size, (self.procs.rank + 1) * size)
        return FinetuneTask(self.config, self.tokenizer, rank_rows=rows)

    def _model(self) -> nn.Module:
        config = self.config
        model = build_model(config.model)
        _check_vocab(model, self.tokenizer)
        model.to(self.procs.device).train()
        if config.activation_checkpointing:
            checkpoint_layers(model, every=model.config.gradient_checkpoint_every_ith)
        if config.compile:
            compile_layers(model)
        return parallelize(model, config.parallel, self.procs)

    def _saves_after(self, step: int) -> bool:
        every = self.config.save_every
        # A run with a time limit may stop (and save) at every TIME_CHECK_EVERY-th step.
        timed = self.config.max_seconds is not None and step % TIME_CHECK_EVERY == 0
        return timed or bool(every and step % every == 0) or step >= self.config.steps

    # -- state ---------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint `config.resume` names (true: the newest), if there is one."""
        resume = self.config.resume
        existing = list_checkpoints(self.out_dir)
        if resume is False:
            if existing:
                raise TrainError(f"{self.out_dir} already has checkpoints (newest {existing[-1].name}): pass "
                                 "--resume to continue, or choose another out_dir")
            return
        folder = Path(resume) if isinstance(resume, str) else (existing[-1] if existing else None)
        if folder is None:
            logger.info("no checkpoint in %s: starting from step 0", self.out_dir)
            return
        state = load_checkpoint(folder, model=self.model, optimizer=self.optimizer, procs=self.procs)
        self.task.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens", 0))
        if hasattr(self.task.batches, "set_position"):
            self.task.batches.set_position(self.step)
        logger.info("resumed from %s at step %d", folder, self.step)

    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens_seen, "data": self.task.batches.state_dict(),
                 "world": self.procs.world, "config": dataclasses.asdict(self.config)}
        return save_checkpoint(self.out_dir, step=self.step, model=self.model, optimizer=self.optimizer,
                               trainer_state=state, procs=self.procs, keep=self.config.keep_checkpoints)

    # -- steps ---------------------------------------------------------------------------------------------------
    def _rank_micro_batches(self, batch: Batch) -> list[Batch]:
        """This rank's contiguous group of micro-batches of a global batch (already sliced for fine-tuning)."""
        accum = self.config.grad_accum
        if self.config.mode == "pretrain":
            groups = split_batch(batch, self.procs.world)
            batch = groups[self.procs.rank]
        return [_device_batch(part, self.procs.device) for part in split_batch(batch, accum)]

    def _autocast_context(self) -> contextlib.AbstractContextManager:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.procs.device.type, dtype=self._autocast)

    def train_step(self, lr: float) -> tuple[float, float, int]:
        """One optimiser step over the next global batch; returns (mean loss, gradient norm, tokens in the batch)."""
        micro = self._rank_micro_batches(next(self.task.batches))
        total = torch.zeros((), dtype=torch.float64, device=self.procs.device)
        for index, batch in enumerate(micro):
            with _sync_context(self.model, self.config.parallel, index == len(micro) - 1):
                with self._autocast_context():
                    loss = self.task.loss(self.model, batch)
                # Mean over micro-batches here, over ranks in the gradient all-reduce (optax.MultiSteps, DDP).
                (loss / len(micro)).backward()
            total += loss.detach()
        norm = _clip(self.model, self.config.optim.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b["input_ids"].numel() for b in micro) * self.procs.world
        return self.procs.mean(float(total) / len(micro)), norm, tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first eval_steps eval batches (this rank's share of each, then averaged over ranks)."""
        losses = []
        for batch in self.task.eval_batches(self.config.eval_steps):
            batch = split_batch(batch, self.procs.world)[self.procs.rank]
            for part in split_batch(batch, self.config.grad_accum):
                with self._autocast_context():
                    losses.append(float(self.task.loss(self.model, _device_batch(part, self.procs.device),
                                                       evaluate=True)))
        if not losses:
            return None
        return self.procs.mean(sum(losses) / len(losses))

    def fit(self, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
        config = self.config
        log = RunLog(self.out_dir / LOG_FILE, start_step=self.step, total=config.steps, enabled=self.procs.main,
                     progress=config.progress)
        losses: dict[int, float] = {}
        evals: dict[int, float] = {}
        last_saved = self.step if self.step else None
        started = time.monotonic()
        try:
            while self.step < config.steps:
                at_check = self.step % TIME_CHECK_EVERY == 0
                if config.max_seconds is not None and at_check and self._out_of_time(started):
                    logger.warning("max_seconds=%s reached: stopping at step %d of %d", config.max_seconds,
                                   self.step, config.steps)
                    log.write({"step": self.step, "stopped": "max_seconds"})
                    break
                record = self._one_step()
                losses[self.step] = record["loss"]
                if self.step % config.log_every == 0 or self.step == config.steps:
                    log.write(record)
                log.advance(record)
                if config.eval_every and self.step % config.eval_every == 0:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        evals[self.step] = eval_loss
                        log.write({"step": self.step, "eval_loss": eval_loss})
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
                    last_saved = self.step
                if on_step is not None:
                    on_step(self.step, record)
            if last_saved != self.step:
                self.save()
        finally:
            log.close()
            if hasattr(self.task.batches, "close"):
                self.task.batches.close()
        return self._finish(losses, evals)

    def _out_of_time(self, started: float) -> bool:
        # Every rank must stop at the same step: rank 0's clock decides.
        return bool(self.procs.broadcast(time.monotonic() - started >= self.config.max_seconds))

    def _one_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        lr = learning_rate(self.step, self.config.optim, steps=self.config.steps)
        loss, norm, tokens = self.train_step(lr)
        self.step += 1
        self.tokens_seen += tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": self.tokens_seen,
                "tokens_per_s": tokens / elapsed}

    def _finish(self, losses: dict[int, float], evals: dict[int, float]) -> TrainResult:
        export_dir = None
        if self.config.export:
            export_dir = export_model(self.model, self.out_dir / EXPORT_DIR, procs=self.procs,
                                      tokenizer=tokenizer_file(self.config.model))
        if self.procs.main and (self.out_dir / LOG_FILE).is_file():
            plot_losses(self.out_dir / LOG_FILE, self.out_dir / PLOT_FILE)
        return TrainResult(step=self.step, losses=losses, eval_losses=evals, export_dir=export_dir,
                           model=self.model, main=self.procs.main)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _check_vocab(model: nn.Module, tokenizer: Any) -> None:
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise TrainError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.vocab_size}:"
                         " use the model's own tokenizer")


def _clip(model: nn.Module, clip: float | None) -> float:
    """Clip the global gradient norm (over all shards) to `clip`; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train(config: TrainConfig, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run `config` (resuming if asked), export the model and plot the loss. `on_step(step, record)` is called after
    every step (tests use it to stop a run midway)."""
    config.check()
    procs = start_processes(config)
    try:
        trainer = Trainer(config, procs)
        trainer.resume()
        return trainer.fit(on_step=on_step)
    finally:
        stop_processes(procs)


if __name__ == "__main__":  # torchrun --nproc_per_node N -m longllama.train CONFIG.yaml [--set key=value ...]
    from longllama.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
