"""The server's settings, apart from the app so that the command line reads their defaults without importing
FastAPI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """The server's settings (the `longllama serve` options)."""

    model_id: str = "longllama"
    api_key: str | None = None
    memory_dir: str | None = None  # None: a temporary folder, removed at shut-down
    queue: int = 8  # requests waiting for the model (besides those it decodes)
    max_batch: int = 8  # generations decoded together
    batch_wait_ms: int = 5  # an idle worker's wait for more requests after one arrives, read in the same pass
    max_prompt_tokens: int = 32768  # per request, besides a memory's document
    max_tokens: int = 2048  # new tokens per request
    default_chat_tokens: int = 512  # chat requests that name no max_tokens
    memory_budget: int = 4 << 30  # bytes of memories kept loaded
    prefix_cache_bytes: int = 1 << 30  # memory of recent prompts' whole windows, for prompts that repeat them (0: off)
    max_body_bytes: int = 1 << 20  # JSON requests
    max_upload_bytes: int = 64 << 20  # memory uploads
    template: str | None = None  # the chat format of chat requests without a memory (None: the tokenizer's)
    memory_recompute_layers: int = 0  # memory layers computed again from a memory's tokens as the rest is read
