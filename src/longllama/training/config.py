"""Training settings: the TrainConfig dataclasses, read from YAML plus "key=value" overrides, and their checks.

Paths written in a config file (data.train, data.eval, model.path, model.tokenizer) are read relative to the file's
folder; `out_dir` and values given as overrides are relative to the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longllama.errors import LongLlamaError

MODES = ("pretrain", "finetune")
PARALLEL = ("none", "ddp", "fsdp2")
SCHEDULES = ("cosine", "constant")
AUTOCAST = ("auto", "none", "bfloat16")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_EXPORTS = ("merged", "adapter")


class TrainError(LongLlamaError, ValueError):
    """A training setting or file that cannot be used; the message names it and the fix."""


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
    # pretrain (docs/training.md#documents-and-tokens, C.2)
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
    # finetune (docs/finetuning.md)
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
class LoraSettings:
    """LoRA through peft (docs/finetuning.md#lora): only the adapters train; the rest of the model is frozen."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    export: str = "merged"  # merged: a full model folder; adapter: a peft adapter folder over model.path

    def check(self, model: ModelSettings) -> None:
        if not self.enabled:
            return
        _choice("lora.export", self.export, LORA_EXPORTS)
        _positive("lora.rank", self.rank)
        if not self.alpha > 0:
            raise TrainError(f"lora.alpha={self.alpha} must be a positive number (the scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise TrainError(f"lora.targets={self.targets!r} must list module names, e.g. [q_proj, v_proj]")
        if self.export == "adapter" and model.path is None:
            raise TrainError(
                "lora.export=adapter needs a base checkpoint the adapter applies to: set model.path to a "
                "LongLLaMA folder, or use lora.export=merged"
            )


@dataclass
class TrainConfig:
    mode: str = "pretrain"
    out_dir: str = "runs/longllama"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
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
        for name in (
            "steps",
            "grad_accum",
            "eval_steps",
            "keep_checkpoints",
            "log_every",
            "data.batch_size",
            "data.seq_len",
        ):
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
        self.lora.check(self.model)
        if self.lora.enabled and self.parallel == "fsdp2":
            raise TrainError("lora with parallel=fsdp2 is not supported: use parallel=ddp (adapters are small)")


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
        raise TrainError(
            f"config file {file} does not exist: pass a YAML file such as configs/tiny-pretrain.yaml"
        ) from None
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
