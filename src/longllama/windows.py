"""Long inputs in windows (docs/inference.md#long-inputs-in-windows): everything but the last `last_context_length`
tokens goes
through the model in windows of the context window size (and, in memory layers, into memory); the final window stays
in the local cache. Memory windows of one sequence may go through several at a time, as a batch of windows (the
plan's window_group_tokens), and a memory window whose output the caller does not keep (`keep_last`) and which fills
no local cache only goes up to the last memory layer (the plan's skip_dead_layers): what the layers above would
compute is dropped unread.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from longllama.cache import LongLlamaCache
from longllama.errors import InputError
from longllama.fast import kernels
from longllama.model import forward_window
from longllama.plan import ExecutionPlan


@dataclass
class WindowsOutput:
    hidden: torch.Tensor | None  # (b, n, hidden) after the final norm; None when only memories were filled
    cache: LongLlamaCache
    all_hidden: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class TokenEmbeddings:
    """The embeddings of token ids (b, n), looked up one window at a time: run_windows reads `shape`, `device` and
    slices [:, beg:end], so a long input never holds all (b, n, hidden) embeddings at once (6 GiB for 1M tokens of
    the 3B model)."""

    def __init__(self, embed: torch.nn.Embedding, input_ids: torch.Tensor):
        self.embed, self.input_ids = embed, input_ids

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.input_ids.shape, self.embed.embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def __getitem__(self, index) -> torch.Tensor:
        return self.embed(self.input_ids[index])


def window_spans(n: int, *, window: int, last_context_length: int) -> list[tuple[int, int]]:
    """[beg, end) of each window of an n-token input: memory windows of `window` tokens, then the final one."""
    m = max(n - last_context_length, 0)
    spans = [(beg, min(m, beg + window)) for beg in range(0, m, window)]
    return spans + [(m, n)]


def default_positions(cache: LongLlamaCache, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Positions continue after the cached ones, or start at 0 (docs/inference.md#long-inputs-in-windows, step 2)."""
    start = cache.next_positions()
    steps = torch.arange(n, device=device)[None, :]
    if start is None:
        return steps.expand(batch, n)
    return start.to(device)[:, None] + steps


def run_windows(
    decoder,
    embeds: torch.Tensor | TokenEmbeddings,
    *,
    plan: ExecutionPlan,
    cache: LongLlamaCache,
    fresh: bool,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    use_cache: bool | None,
    default_use_cache: bool,
    window: int,
    last_context_length: int,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    progress=None,
    keep_last: int = 0,
    cross_batch=None,
    fill_memories: int | None = None,
) -> WindowsOutput:
    """Run an input of embeddings (b, n, hidden) through the decoder in windows, updating `cache` in place.

    `decoder` holds `config`, `layers`, `norm` and `rope` (LongLlamaModel); `plan` says how to run them (the
    model's plan for this device). `progress(tokens_done)`, if given, is called after
    each window. `keep_last` > 0 keeps only the hidden states of the last `keep_last` positions (long inputs whose
    logits are needed only at the end need not hold all of them). `cross_batch` (training) is handed to every
    window (model.Window.cross_batch). `fill_memories` = k: only the memory windows run, and only up to the k-th
    memory layer (which only writes its memory): a fresh cache gets the memories of its first k memory layers and
    nothing else, no hidden states (DocumentMemory.load reads the others from disk meanwhile)."""
    b, n, _ = embeds.shape
    p0 = cache.local_length
    fill_depth = None
    if fill_memories is not None:
        fill_depth = _fill_depth(decoder.config, cache, fill_memories, keep_last, output_hidden_states or
                                 output_attentions or cross_batch is not None)  # fmt: skip
    if attention_mask is not None:
        attention_mask = attention_mask[:, -(p0 + n) :]
        if attention_mask.shape != (b, p0 + n):
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({b}, {p0 + n}) = (batch, cached "
                "tokens + new tokens): pass a mask covering the cached and the new tokens"
            )
    final_use_cache = default_use_cache if use_cache is None else use_cache
    spans = window_spans(n, window=window, last_context_length=last_context_length)
    if fresh and fill_depth is None and cross_batch is None and not (output_hidden_states or output_attentions):
        _compile_ahead(decoder, embeds, plan, attention_mask, positions, final_use_cache, spans, window, keep_last)
    if fresh and cross_batch is None:  # cross-batch memory comes from the batch, not the cache
        added = n if not final_use_cache and fill_depth is None else spans[-1][0]  # (filling: not the final window)
        _reserve_memory(decoder, cache, b, added, embeds.device, plan, below=fill_depth)
    outputs, layer_hidden, attentions = [], [], None
    # Both reads below pick a faster path from values on the device; traced graphs (torch.compile, export) take the
    # general path instead of reading them back.
    tracing = torch.compiler.is_compiling()
    rope_length = None if tracing else _relative_span(cache, positions)
    if attention_mask is not None and attention_mask.shape[0] == 1 and not tracing and bool(attention_mask.all()):
        attention_mask = None  # all ones: the same as no mask (and lets memory windows go in groups)
    grouped = _groupable(
        decoder.config, plan, b, cache, attention_mask, output_hidden_states or output_attentions, cross_batch
    )
    group_windows = max(1, plan.window_group_tokens // window)
    done = 0  # spans read in groups
    while done < len(spans) - 1 and grouped:  # memory windows of one sequence, several at once
        group = [
            span for span in spans[done : done + group_windows][: len(spans) - 1 - done] if span[1] - span[0] == window
        ]
        if len(group) < 2 or cache.local_length:
            break
        beg, end = group[0][0], group[-1][1]
        g = len(group)
        kept = fill_depth is None and (not keep_last or end > n - keep_last)
        depth = fill_depth or _depth(decoder.config, plan, kept, False, per_layer=False)
        if depth != 0:
            h, _, _ = forward_window(
                decoder.layers,
                decoder.norm,
                decoder.rope,
                embeds[:, beg:end].reshape(g, window, -1),
                plan=plan,
                positions=positions[:, beg:end].reshape(g, window),
                mask=None,
                cache=cache,
                use_cache=False,
                rope_length=rope_length,
                grouped=True,
                depth=depth,
            )
            if kept:
                outputs.append(h.reshape(1, end - beg, -1))
        if progress is not None:
            progress(end)
        done += g
    for i, (beg, end) in enumerate(spans[done:], start=done):
        last = i == len(spans) - 1
        if last and fill_depth is not None:  # filling memories: the final window does not run
            break
        p_cur = cache.local_length
        if last:
            win_use_cache = final_use_cache
        else:
            # Memory windows of a fresh call never use the cache (they go to memory); continuations do.
            win_use_cache = bool(final_use_cache) if p_cur else False
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, p0 + beg - p_cur : p0 + end]
        kept = fill_depth is None and (not keep_last or end > n - keep_last)
        depth = fill_depth or _depth(
            decoder.config,
            plan,
            kept,
            bool(win_use_cache),
            per_layer=output_hidden_states or output_attentions or cross_batch is not None,
        )
        if depth != 0:
            h, hidden, attn = forward_window(
                decoder.layers,
                decoder.norm,
                decoder.rope,
                embeds[:, beg:end],
                plan=plan,
                positions=positions[:, beg:end],
                mask=mask,
                cache=cache,
                use_cache=bool(win_use_cache),
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions and last,
                cross_batch=cross_batch,
                rope_length=rope_length,
                depth=depth,
            )
            if kept:
                outputs.append(h)
            layer_hidden.append(hidden)
            attentions = attn
        if progress is not None:
            progress(end)
    if fill_depth is not None:
        return WindowsOutput(hidden=None, cache=cache)
    all_hidden = None
    if output_hidden_states:
        all_hidden = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*layer_hidden))
    hidden = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if keep_last:
        hidden = hidden[:, -keep_last:]
    return WindowsOutput(
        hidden=hidden, cache=cache, all_hidden=all_hidden, attentions=tuple(attentions) if output_attentions else None
    )


_AHEAD_DONE: weakref.WeakSet = weakref.WeakSet()  # decoders whose first fresh call had its dry pass


def _compile_ahead(decoder, embeds, plan: ExecutionPlan, mask, positions, use_cache, spans, window, keep_last) -> None:
    """Before a decoder's first fresh call in this process, where Triton kernels run: the same call over a shorter
    input and a throwaway cache as a dry pass (kernels.compile_ahead), so that the kernels compile side by side on a
    pool of threads instead of one after another as the windows reach them. The shorter input keeps the call's
    shapes: two groups of memory windows (the second reads the first's memory), the partial memory window and the
    final window, when the call has them. Kernels whose configuration depends on the memory's length may still
    compile later, in the real pass; a failure is left to the real call."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return  # (traced graphs: their kernels compile when the graph is built)
    if plan.memory_shard is not None or not kernels.ahead_applies(plan, embeds.device):
        return
    if kernels.compiling_ahead() or decoder in _AHEAD_DONE:
        return
    _AHEAD_DONE.add(decoder)
    n = embeds.shape[1]
    final = spans[-1][1] - spans[-1][0]
    partial = (n - final) % window
    head = min(n - final - partial, 2 * max(window, plan.window_group_tokens // window * window))
    short = head + partial + final
    kernels.dry_pass(
        lambda: run_windows(
            decoder,
            embeds[:, :short],
            plan=plan,
            cache=LongLlamaCache(len(decoder.layers)),
            fresh=True,
            attention_mask=None if mask is None else mask[:, :short],
            positions=positions[:, :short],
            use_cache=use_cache,
            default_use_cache=use_cache,
            window=window,
            last_context_length=final,
            keep_last=min(keep_last, short),
        ),
        "the ingest",
    )


def _depth(config, plan: ExecutionPlan, kept: bool, use_cache: bool, *, per_layer: bool) -> int | None:
    """How many layers a window goes through: all (None) where its output is kept, it fills local caches, per-layer
    outputs / training ask for every layer or the plan says so (skip_dead_layers off); else the memory layers'
    (their memory is all it leaves: the layers above change nothing but their dropped output), 0 with none."""
    if kept or use_cache or per_layer or not plan.skip_dead_layers:
        return None
    mem_layers = config.mem_layers
    return max(mem_layers) + 1 if mem_layers else 0


def _fill_depth(config, cache: LongLlamaCache, count: int, keep_last: int, per_layer: bool) -> int:
    """The depth of the memory windows of a call that fills only the first `count` memory layers' memories."""
    mem_layers = sorted(config.mem_layers)
    if not 1 <= count <= len(mem_layers):
        raise InputError(f"fill_memories={count}: this model has {len(mem_layers)} memory layers; pass 1 to that")
    if cache.local_length or cache.memory_length or keep_last or per_layer:
        raise InputError(
            "fill_memories reads a document's memory windows into a fresh cache: pass a new cache, no keep_last, no "
            "per-layer outputs"
        )
    return mem_layers[count - 1] + 1


def _groupable(
    config, plan: ExecutionPlan, batch: int, cache: LongLlamaCache, mask, per_layer_outputs: bool, cross_batch
) -> bool:
    """Whether memory windows go in groups (the plan's window_group_tokens at a time, as a batch of windows,
    model.Window.grouped: the same maths, larger matrix products, fewer kernel calls): a fresh call of batch 1 with
    no mask and fast attention, for inference."""
    return (
        batch == 1
        and mask is None
        and not per_layer_outputs
        and cross_batch is None
        and cache.local_length == 0
        and config.mem_top_k is None
        and plan.mem_retrieval == "dense"  # groups write their memory first; retrieval reads it window by window
        and plan.memory_shard is None
        and not config.mem_offload
        and all(layer.memory is None or layer.memory.all_valid() for layer in cache.layers)
        and config.mem_dtype != "int8"  # int8 memory is read piece by piece, not by the group kernels
        and plan.attention == "fast"
        and not torch.is_grad_enabled()
    )


def _relative_span(cache: LongLlamaCache, positions: torch.Tensor) -> int:
    """A bound above every relative position (position minus the window's oldest) of this call: the spread of all
    positions, cached ones included. Read back once per call instead of once per window (a host-device sync)."""
    lo, hi = positions.min(), positions.max()
    cached = cache.layers[0].positions
    if cached is not None and cached.numel():
        lo, hi = torch.minimum(lo, cached.min()), torch.maximum(hi, cached.max())
    return int(hi - lo) + 1


def _reserve_memory(
    decoder, cache: LongLlamaCache, batch: int, added: int, device, plan: ExecutionPlan, *, below: int | None = None
) -> None:
    """A fresh call knows how much memory it adds: allocate it once instead of growing (in the layers `below` that
    index only, when the call fills only theirs)."""
    if added == 0:
        return
    for layer, state in zip(decoder.layers[:below], cache.layers):
        attn = layer.self_attn
        if attn.is_memory_layer:
            if state.memory is None:
                state.memory = attn.new_memory(batch, device, plan)
            if plan.memory_shard is not None:  # this process stores every world-th window: its share, plus one
                added = -(-added // plan.memory_shard.world) + attn.config.context_window
            state.memory.reserve(state.memory.length + added)
