"""Weight-only quantization (int8, int4) of a model's linear layers, and quantized checkpoints.

What is quantized: the q/k/v/o projections and the MLP's three products of every layer. The embeddings stay in the
model's dtype (a lookup, not a product: quantizing them saves memory but no decoding time), and so does lm_head by
default (`lm_head=True` quantizes it too; docs/quantization.md has the measured choice). Activations stay in the
model's dtype.

Layouts: int8 is torchao's Int8Tensor (one scale per output row; torchao's product dequantizes inside it) on every
device. int4 is this package's own packed layout (int4.py: two 4-bit codes a byte, a scale and an offset per `group`
input columns, the largest of 128/64/32 dividing the layer's input size; a layer no group divides stays unquantized),
the same on every device. Decoding's matrix-vector kernels read both in place (int8_rows, int4_parts,
fast/gemv.py); products of many rows dequantize an int4 weight first (one kernel pass on GPUs).

Checkpoints: `save_quantized` writes config.json (its `quantization` field says which) and model.safetensors: int8
weights in torchao's safetensors format (each quantized weight as its plain tensors plus a JSON description in the
file's metadata: torchao.prototype.safetensors), int4 weights as their three plain tensors (`<name>.qdata`,
`.scale`, `.offset`) with their group sizes in the metadata; `load_quantized` rebuilds the tensors without
re-quantizing. Files written before int4 had its own layout (torchao's CUDA tinygemm tensors) still load, through
torchao's product.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from longllama.choices import QUANTIZATIONS
from longllama.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

INSTALL = "pip install 'longllama[quant]' (torchao>=0.18,<0.19)"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "longllama-torchao-v1"
INT4_KEY = "longllama-int4"  # metadata: {weight name: group size} of the int4 weights stored as plain parts
INT4_PARTS = ("qdata", "scale", "offset")


def check_quantization(name: object) -> str:
    """`name` if it is a quantization this package offers, else a one-line InputError naming them."""
    if name is None:
        return "none"
    if not isinstance(name, str) or name not in QUANTIZATIONS:
        raise InputError(f"quantization={name!r} is not supported: use one of {', '.join(QUANTIZATIONS)}")
    return name


def quiet_torchao() -> None:
    """Keep torchao's import notices off stderr: its optional compiled extensions warn on every import where they
    do not load (CPU builds of torch), and it registers enums that torch's pytree warns about. Effective before
    the first import of torchao (transformers may import it while loading a model)."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _torchao():
    """torchao's quantization entry points, or a one-line error naming the install."""
    quiet_torchao()
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise InputError(f"weight quantization needs torchao ({exc}): {INSTALL}") from None
    return quantize_, Int8WeightOnlyConfig, Int4WeightOnlyConfig


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is one of torchao's quantized tensors (not a plain tensor or parameter)."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 values (N, K), fp32 scales (N, 1)) of an int8 weight quantized here (quantize_model: weight-only,
    symmetric, one scale per output row, so weight = values * scale), for the matrix-vector kernels to read in
    place; None for any other tensor."""
    if type(weight).__name__ != "Int8Tensor":
        return None
    if (
        list(weight.block_size) != [1, weight.shape[-1]]
        or getattr(weight, "act_quant_kwargs", None) is not None
        or getattr(weight, "act_pre_scale", None) is not None
    ):
        return None
    return weight.qdata, weight.scale


def int4_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(qdata, scale, offset, group) of an int4 weight in this package's layout (int4.Int4Weight), for the
    matrix-vector kernels to read in place; None for any other tensor."""
    if type(weight).__name__ != "Int4Weight":
        return None
    return weight.qdata, weight.scale, weight.offset, weight.group


def _int8_config():
    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings (coordinate-descent
    # tuning and more) for every later compilation, ours of the elementwise functions included.
    _, int8, _ = _torchao()
    return int8(set_inductor_config=False)


def _int4():
    """The int4 module (its tensor class builds on torchao's), or a one-line error naming the install."""
    _torchao()
    from longllama import int4

    return int4


def quantized_linears(model: nn.Module, *, lm_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The linear layers quantization applies to: every nn.Linear of the decoder layers, plus lm_head if asked."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (name != "lm_head" or lm_head)
    ]


def quantize_model(model: nn.Module, quantization: str, *, lm_head: bool | None = None) -> nn.Module:
    """Quantize `model`'s linear layers in place (weight-only; see the module docstring) on the device they are on,
    record the choice in model.config (`quantization`, `quantize_lm_head`) and return the model. "none" changes
    nothing; a model already quantized fails (quantize the unquantized weights)."""
    quantization = check_quantization(quantization)
    config = model.config
    if lm_head is None:
        lm_head = bool(getattr(config, "quantize_lm_head", False))
    if quantization == "none":
        return model
    if getattr(config, "quantization", "none") != "none":
        raise InputError(
            f"the model is already quantized ({config.quantization}): load the unquantized checkpoint to quantize "
            "it another way"
        )
    quantize_, _, _ = _torchao()
    layers = quantized_linears(model, lm_head=lm_head)
    kept = []
    with torch.no_grad():
        for name, module in layers:
            if quantization == "int8":
                quantize_(module, _int8_config(), filter_fn=lambda m, fqn, target=module: m is target)
                continue
            int4 = _int4()
            group = int4.group_of(module.in_features)
            if group is None:
                kept.append(name)
                continue
            module.weight = nn.Parameter(int4.Int4Weight.from_float(module.weight, group), requires_grad=False)
    if kept:
        logger.info("int4: %d layers kept unquantized (no group size divides their inputs): %s", len(kept), kept)
    config.quantization = quantization
    config.quantize_lm_head = lm_head
    model.requires_grad_(False)  # quantized weights take no gradient
    return model


def save_quantized(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write a quantized model's config and weights (torchao's safetensors format) to `folder`, atomically."""
    from safetensors.torch import save_file

    from longllama.files import write_folder

    try:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    except ImportError as exc:
        raise InputError(f"saving quantized weights needs torchao ({exc}): {INSTALL}") from None
    state = {name: t.detach() for name, t in model.state_dict().items()}
    groups, parts = {}, {}
    for name, t in list(state.items()):
        found = int4_parts(t)
        if found is not None:
            del state[name]
            groups[name] = found[3]
            parts.update({f"{name}.{part}": tensor for part, tensor in zip(INT4_PARTS, found[:3], strict=True)})
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {name: t.contiguous().cpu() for name, t in {**tensors, **parts}.items()}
    metadata["format"] = FORMAT
    metadata[INT4_KEY] = json.dumps(groups)

    def write(temp: Path) -> None:
        temp.mkdir(parents=True)
        model.config.save_pretrained(temp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(temp)
        save_file(tensors, str(temp / WEIGHTS_FILE), metadata=metadata)

    write_folder(Path(folder), write)


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    """Whether the checkpoint in `folder` was written by save_quantized (its config records a quantization)."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("quantization", "none") not in (None, "none")


def load_quantized(
    cls: type[nn.Module], folder: str | os.PathLike, *, device: torch.device | str | None = None, **config_overrides
) -> nn.Module:
    """A `cls` model (LongLlamaForCausalLM, say) from a folder written by save_quantized, its weights on `device`
    (default: where they were saved, read from the file; a CUDA int4 layout needs a CUDA device)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from longllama.config import LongLlamaConfig

    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    folder = Path(folder)
    file = folder / WEIGHTS_FILE
    config = LongLlamaConfig.from_pretrained(folder)
    config._name_or_path = str(folder)  # as transformers' loading records it (document memories name models so)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.check()
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file), device=str(device))
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read quantized weights {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "write them again with save_quantized"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{file} is not a quantized longllama checkpoint (format {metadata.get('format')!r}): write it with "
            "longllama.quantize.save_quantized"
        )
    state = _int4_weights(tensors, metadata.get(INT4_KEY), file)
    torchao_state, rest = unflatten_tensor_state_dict(tensors, metadata)
    state.update(torchao_state)
    state.update(rest)
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight") or not config.tie_word_embeddings]:
        raise CheckpointError(
            f"{file} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}): write it again "
            "with save_quantized"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    if (folder / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.requires_grad_(False)
    model.eval()
    _ = model.base_model.plan  # for the device the weights are on
    return model


def _int4_weights(tensors: dict, listed: str | None, file: Path) -> dict:
    """The int4 weights a file lists (its metadata's {name: group}), rebuilt from their parts, which leave `tensors`."""
    if not listed:
        return {}
    try:
        groups = json.loads(listed)
        int4 = _int4()
        weights = {}
        for name, group in groups.items():
            qdata, scale, offset = (tensors.pop(f"{name}.{part}") for part in INT4_PARTS)
            n, k = qdata.shape[0], 2 * qdata.shape[1]
            if not (
                qdata.dtype == torch.uint8
                and isinstance(group, int)
                and group > 0
                and k % group == 0
                and scale.shape == offset.shape == (n, k // group)
                and scale.dtype == offset.dtype
            ):
                raise ValueError(f"{name}: parts of shapes {qdata.shape}, {scale.shape}, {offset.shape}, group {group}")
            weights[name] = int4.Int4Weight(qdata, scale, offset, group, (n, k))
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"{file}: its int4 weights are incomplete ({type(exc).__name__}: {exc}): write them again with "
            "save_quantized"
        ) from None
    return weights


def load_from_folder(
    cls: type[nn.Module], folder: str | os.PathLike, quantization: str, args: tuple, kwargs: dict
) -> nn.Module:
    """from_pretrained's route for a quantized checkpoint: load_quantized with the keyword arguments that apply
    (a device_map of one device, config overrides), a one-line error for a different quantization or others."""
    stored = json.loads((Path(folder) / "config.json").read_text()).get("quantization")
    if quantization not in ("none", stored):
        raise InputError(
            f"{folder} holds {stored} weights; quantization={quantization!r} needs the unquantized checkpoint "
            f"(or pass quantization={stored!r} or none)"
        )
    device = kwargs.pop("device_map", None)
    kwargs.pop("dtype", None)  # the stored tensors keep their dtype
    if args or (device is not None and not isinstance(device, (str, torch.device, int))):
        raise InputError(
            f"loading the quantized checkpoint {folder} takes a single device (device_map='cuda', say) and "
            "config overrides as keywords only"
        )
    if isinstance(device, int):
        device = torch.device("cuda", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_quantized(cls, folder, device=device, **kwargs)
