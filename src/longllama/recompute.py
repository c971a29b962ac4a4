"""Activation checkpointing of decoder layers whose forward writes to their state (local cache, memory).

A memory window appends its keys to the layer's memory inside the layer's forward. Recomputing that layer in the
backward pass must start from the state the first pass saw and must not append a second time, so the recomputation
runs on a copy of the state taken before the first pass. Both entry points use this one wrapper: the training loop
(training/parallel.py, `activation_checkpointing: true`) and transformers' `gradient_checkpointing_enable` (hf.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from longllama.cache import LayerState
from longllama.errors import InputError


def default_checkpoint() -> Callable[..., Any]:
    """torch's non-reentrant checkpoint: the first pass runs with gradients, so memory it writes stays attached."""
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, use_reentrant=False)


def checkpointed(forward: Callable[..., Any], checkpoint: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A decoder-layer forward `(x, *, state, **kwargs)` that keeps no activations and recomputes them in backward
    through `checkpoint(function, x)` (torch.utils.checkpoint.checkpoint or a partial of it)."""
    checkpoint = checkpoint or default_checkpoint()

    def run(x: torch.Tensor, *, state: LayerState, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(x, state=state, **kwargs)
        before = copy_state(state)
        calls = [0]

        def body(h: torch.Tensor) -> Any:
            first = calls[0] == 0
            if first and not torch.is_grad_enabled():
                # A reentrant checkpoint runs the first pass without gradients: memory written there would be
                # detached and later windows would get no gradient through it.
                raise InputError(
                    "activation checkpointing with use_reentrant=True cuts the gradient through memory: pass "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}"
                )
            target = state if first else copy_state(before)
            calls[0] += 1
            return forward(h, state=target, **kwargs)

        return checkpoint(body, x)

    return run


def copy_state(state: LayerState) -> LayerState:
    """The layer's state as it is now; the layer's later writes (new tensors, memory appends) leave it unchanged."""
    memory = None if state.memory is None else state.memory.fork()
    return LayerState(state.keys, state.values, state.positions, memory)


def chosen(layers: Sequence[nn.Module], every: int) -> list[nn.Module]:
    """The layers that are checkpointed: those whose index is a multiple of `every` (gradient_checkpoint_every_ith)."""
    if every < 1:
        raise InputError(f"gradient_checkpoint_every_ith={every} must be a positive integer (1: every layer)")
    return [layer for idx, layer in enumerate(layers) if idx % every == 0]


def wrap_layers(layers: Sequence[nn.Module], *, every: int = 1, checkpoint: Callable[..., Any] | None = None) -> int:
    """Checkpoint the chosen layers for good (the forward is wrapped on the instance, so the model code is untouched
    and FSDP / DDP hooks still run); returns how many were wrapped."""
    picked = chosen(layers, every)
    for layer in picked:
        layer.forward = checkpointed(layer.forward, checkpoint)
    return len(picked)


@contextlib.contextmanager
def checkpointing(
    layers: Sequence[nn.Module], *, every: int = 1, checkpoint: Callable[..., Any] | None = None
) -> Iterator[None]:
    """Checkpoint the chosen layers for the calls inside the block; their forwards are restored after it (the
    backward pass needs only the wrappers' closures, not the wrapped attributes)."""
    picked = chosen(layers, every)
    saved = [layer.__dict__.get("forward") for layer in picked]
    for layer in picked:
        layer.forward = checkpointed(layer.forward, checkpoint)
    try:
        yield
    finally:
        for layer, old in zip(picked, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
