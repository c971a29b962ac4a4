"""LongLlamaConfig: the LLaMA fields plus the FoT memory fields, validated with one-line errors."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig

from longllama.choices import ATTN_IMPLS, MEM_RETRIEVALS, QUANTIZATIONS
from longllama.errors import LongLlamaError

MEM_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,  # 8-bit memory: int8 with a scale per token and head (memory.py)
}


# The usable context advertised by configs that do not state one (every checkpoint written before `context_window`
# existed): the input length the released LongLLaMA checkpoints were shown to handle (256k-token pass keys). Longer
# inputs are still read; tools such as lm-eval and pipelines truncate to this number.
DEFAULT_CONTEXT = 262144


class ConfigError(LongLlamaError, ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


def _dtype_name(value: Any) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str) or value not in MEM_DTYPES:
        raise ConfigError(f"mem_dtype={value!r} is not supported: use one of {', '.join(MEM_DTYPES)}")
    return value


class LongLlamaConfig(PreTrainedConfig):
    """Configuration of a LongLLaMA model.

    The LLaMA fields keep transformers' names; the FoT fields keep the reference's names:
    `mem_layers` (indices of the layers that also attend to the memory), `last_context_length` (size of the final
    window kept in the local cache), `mem_positionals` (RoPE in memory layers), `mem_dtype` (storage dtype of the
    memory), `mem_attention_grouping` ((heads, queries) per chunk of memory attention) and `torch_attention`
    (use `scaled_dot_product_attention`). `context_window` is the attention window (the size of memory windows and the
    cap of the local cache: the reference's `max_position_embeddings`); `max_position_embeddings` is the usable
    context, what evaluation tools and pipelines read (the memory makes it far longer than the window). A config
    without `context_window` (any older checkpoint) reads `max_position_embeddings` as the window and advertises
    DEFAULT_CONTEXT, or the window if larger. `attn_impl` picks the
    attention implementation ("auto", "eager", "sdpa", "fast"); `mem_offload` keeps the memory in pinned CPU memory
    (for memories larger than the GPU), copied to the GPU whenever it is read. `mem_top_k` (inference only; null:
    dense memory attention as in the reference) lets each query of a memory layer see only its k highest-scoring
    memory keys, chosen by exact kNN (FoT's kNN memory); training's cross-batch attention stays dense.
    `compile_elementwise` (inference; true; false; "auto", the default, is off) runs RMSNorm, RoPE, SwiGLU and the
    merges through torch.compile (fused.py) instead of the Triton kernels that serve them on GPUs by default: seconds
    of compiling in each new process's first calls, for no measured gain (docs/cold-start.md).
    `num_key_value_heads` < `num_attention_heads` gives grouped-query attention; the memory then stores only the
    key/value heads. `quantization` ("none", "int8", "int4") records weight-only quantization of the linear layers
    (quantize.py; lm_head too when `quantize_lm_head`). `mem_retrieval` ("dense", the default; "blocks", inference
    only) picks how memory layers read the memory: "blocks" groups the memory keys in blocks of `mem_block_size`
    keys, ranks them by an upper bound of q.k from each block's per-dimension max and min key, and attends exactly
    to the best `mem_blocks` blocks of each group of queries (retrieval.py, docs/retrieval.md). `mem_super_size`
    (0, the default: off) ranks superblocks of that many blocks first and only the blocks of the best of them
    (retrieval.select_two_level), so that the ranking grows more slowly than the memory. `mem_recent_blocks` (0, the
    default, up to `mem_blocks`) of the blocks read are always the memory's most recent ones, whatever their bound.
    """

    model_type = "longllama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    context_window: int | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    last_context_length: int = 1024
    mem_layers: Any = None
    mem_positionals: bool = True
    mem_dtype: Any = "bfloat16"
    mem_attention_grouping: Any = None
    torch_attention: bool = False
    attn_impl: str = "auto"
    mem_offload: bool = False
    mem_top_k: int | None = None
    mem_retrieval: str = "dense"
    mem_blocks: int = 64
    mem_block_size: int = 64
    mem_super_size: int = 0
    mem_recent_blocks: int = 0
    compile_elementwise: Any = "auto"
    gradient_checkpoint_every_ith: int = 1
    quantization: str = "none"
    quantize_lm_head: bool = False

    def __post_init__(self, **kwargs):
        if self.context_window is None:  # the reference's config: its max_position_embeddings is the window
            self.context_window = 2048 if self.max_position_embeddings is None else self.max_position_embeddings
            self.max_position_embeddings = None
        if self.max_position_embeddings is None and isinstance(self.context_window, int):
            self.max_position_embeddings = max(DEFAULT_CONTEXT, self.context_window)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    def __setattr__(self, key: str, value: Any) -> None:
        # from_pretrained(..., mem_dtype=torch.bfloat16) sets attributes directly: keep the JSON-friendly name.
        if key == "mem_dtype" and isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        super().__setattr__(key, value)

    def _normalize(self) -> None:
        # Load-time overrides are set as plain attributes, so normalise here rather than only at construction.
        self.mem_layers = [] if self.mem_layers is None else list(self.mem_layers)
        self.mem_dtype = _dtype_name(self.mem_dtype)
        if self.mem_attention_grouping is not None:
            if isinstance(self.mem_attention_grouping, (str, bytes)) or not hasattr(
                self.mem_attention_grouping, "__len__"
            ):
                raise ConfigError(
                    f"mem_attention_grouping={self.mem_attention_grouping!r} must be two positive "
                    "integers (heads per chunk, queries per chunk), e.g. (4, 2048), or null"
                )
            self.mem_attention_grouping = tuple(self.mem_attention_grouping)

    def check(self) -> None:
        """Normalise the FoT fields and raise ConfigError with a one-line message if any value is out of range."""
        self._normalize()
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "context_window",
            "last_context_length",
            "gradient_checkpoint_every_ith",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.max_position_embeddings < self.context_window:
            raise ConfigError(
                f"max_position_embeddings={self.max_position_embeddings} (the usable context) is below "
                f"context_window={self.context_window}: set it to at least the window"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: choose a divisor"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported: LongLLaMA uses 'silu'")
        if self.rope_scaling is not None:
            raise ConfigError(f"rope_scaling={self.rope_scaling!r} is not supported: set it to null")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta={self.rope_theta!r} must be positive")
        for layer in self.mem_layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_hidden_layers:
                raise ConfigError(
                    f"mem_layers={self.mem_layers} holds {layer!r}, outside [0, {self.num_hidden_layers}): "
                    "use layer indices of this model"
                )
        if len(set(self.mem_layers)) != len(self.mem_layers):
            raise ConfigError(f"mem_layers={self.mem_layers} repeats a layer: list each memory layer once")
        top_k = self.mem_top_k
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
            raise ConfigError(f"mem_top_k={top_k!r} must be a positive integer (memory keys per query) or null")
        if self.mem_retrieval not in MEM_RETRIEVALS:
            raise ConfigError(
                f"mem_retrieval={self.mem_retrieval!r} is not supported: use one of {', '.join(MEM_RETRIEVALS)}"
            )
        for name in ("mem_blocks", "mem_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        super_size = self.mem_super_size
        if not isinstance(super_size, int) or isinstance(super_size, bool) or super_size < 0:
            raise ConfigError(f"mem_super_size={super_size!r} must be a non-negative integer (0: one level)")
        recent = self.mem_recent_blocks
        if not isinstance(recent, int) or isinstance(recent, bool) or not 0 <= recent <= self.mem_blocks:
            raise ConfigError(
                f"mem_recent_blocks={recent!r} must be an integer from 0 to mem_blocks ({self.mem_blocks}): the "
                "recent blocks are part of the blocks read"
            )
        if self.mem_retrieval == "blocks" and top_k is not None:
            raise ConfigError(
                "mem_retrieval='blocks' and mem_top_k are two ways to read the memory: set mem_top_k to null "
                "(or mem_retrieval to 'dense')"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl={self.attn_impl!r} is not supported: use one of {', '.join(ATTN_IMPLS)}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization={self.quantization!r} is not supported: use one of {', '.join(QUANTIZATIONS)}"
            )
        if self.compile_elementwise not in (True, False, "auto"):
            raise ConfigError(f'compile_elementwise={self.compile_elementwise!r} must be true, false or "auto"')
        grouping = self.mem_attention_grouping
        if grouping is not None and (
            len(grouping) != 2 or any(not isinstance(g, int) or isinstance(g, bool) or g <= 0 for g in grouping)
        ):
            raise ConfigError(
                f"mem_attention_grouping={grouping!r} must be two positive integers "
                "(heads per chunk, queries per chunk), e.g. (4, 2048), or null"
            )

    @property
    def memory_dtype(self) -> torch.dtype:
        return MEM_DTYPES[self.mem_dtype]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("mem_attention_grouping") is not None:
            out["mem_attention_grouping"] = list(out["mem_attention_grouping"])
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # A model small enough for tests and CPU training in seconds.
    "tiny": dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        last_context_length=24,
        mem_layers=[1, 3],
        mem_dtype="float32",
    ),
    "3b": dict(
        vocab_size=32000,
        hidden_size=3200,
        intermediate_size=8640,
        num_hidden_layers=26,
        num_attention_heads=32,
        max_position_embeddings=2048,
        last_context_length=1024,
        mem_layers=[6, 12, 18],
    ),
    "code-7b": dict(
        vocab_size=32016,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
        last_context_length=2048,
        mem_layers=[8, 16, 24],
        rope_theta=1e6,
    ),
}


def preset(name: str, **overrides: Any) -> LongLlamaConfig:
    """A LongLlamaConfig for one of the named shapes ('tiny', '3b', 'code-7b'), with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return LongLlamaConfig(**{**PRESETS[name], **overrides})
