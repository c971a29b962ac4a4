"""Windows whose output nobody reads (logits_to_keep / generate's prompt) and which keep no local cache stop after the
last memory layer (windows._depth), and that layer only writes its memory (no attention, no MLP): the same logits and
the same memory as running every layer, less work."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_tiny


def _counters(model) -> tuple[list[int], list[int], list]:
    """Per layer, tokens through the whole layer and tokens through its key projection (a layer that only writes its
    memory projects keys and runs nothing else), and the hooks that count them."""
    n = model.config.num_hidden_layers
    whole, keys = [0] * n, [0] * n

    def counter(into: list[int], i: int):
        return lambda mod, args: into.__setitem__(i, into[i] + args[0].shape[0] * args[0].shape[1])

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(counter(whole, i)))
        hooks.append(layer.self_attn.k_proj.register_forward_pre_hook(counter(keys, i)))
    return whole, keys, hooks


def _run(model, ids, *, skip: bool, **kwargs):
    """Logits, cache and, per layer, tokens through the whole layer and through its key projection (the plan's
    skip_dead_layers as given)."""
    model.set_plan(skip_dead_layers=skip)
    whole, keys, hooks = _counters(model)
    try:
        with torch.no_grad():
            out = model(ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, whole, keys


def _same_memory(a, b):
    """Bitwise: the layers that still run do the same ops on the same inputs; skipping the rest changes nothing
    they compute."""
    for la, lb in zip(a.layers, b.layers):
        assert (la.memory is None) == (lb.memory is None)
        if la.memory is not None:
            assert la.memory.length == lb.memory.length > 0
            assert torch.equal(la.memory.keys, lb.memory.keys) and torch.equal(la.memory.values, lb.memory.values)
            assert torch.equal(la.memory.valid, lb.memory.valid)
        assert (la.keys is None) == (lb.keys is None)
        if la.keys is not None:
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.positions, lb.positions)


@pytest.mark.parametrize("impl,batch", [("eager", 1), ("eager", 2), ("fast", 1), ("fast", 2)])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mem_layers", [[1], [0, 1], []])
def test_dropped_windows_stop_after_the_last_memory_layer(impl, batch, use_cache, mem_layers):
    # tiny: 4 layers, window 64; 300 tokens with last_context_length 40: memory windows 64 x 4 + 4, final window 40.
    # "fast" on one row reads the memory windows in groups (window_group_tokens 128: two windows per group).
    model = sharp_tiny(mem_layers=mem_layers)
    model.set_plan(window_group_tokens=128)
    model.config.attn_impl = impl
    ids = torch.randint(3, 320, (batch, 300))
    kwargs = dict(use_cache=use_cache, last_context_length=40, logits_to_keep=5)
    full, full_tokens, full_keys = _run(model, ids, skip=False, **kwargs)
    fast, tokens, keys = _run(model, ids, skip=True, **kwargs)
    assert model.plan.window_group_tokens == 128
    assert torch.equal(full.logits, fast.logits)  # the final window runs every layer in both: the same ops
    _same_memory(full.past_key_values, fast.past_key_values)
    depth = max(mem_layers) + 1 if mem_layers else 0
    assert full_tokens == full_keys == [300 * batch] * 4
    # the final window runs every layer; memory windows run the layers below the last memory layer whole, and only
    # project that layer's keys and values
    assert keys == [300 * batch] * depth + [40 * batch] * (4 - depth)
    whole = max(depth - 1, 0)
    assert tokens == [300 * batch] * whole + [40 * batch] * (4 - whole)


def test_kept_outputs_and_per_layer_outputs_run_every_layer():
    model = sharp_tiny(mem_layers=[1])
    ids = torch.randint(3, 320, (1, 300))
    kept, tokens, keys = _run(
        model, ids, skip=True, use_cache=False, last_context_length=40, logits_to_keep=100
    )  # the last 100 positions reach into the memory window before the final
    assert keys == [300, 300, 108, 108]  # windows 192-256 and 256-260 run whole, then the final 40
    assert tokens == [300, 108, 108, 108]  # the earlier windows only write layer 1's memory
    full, _, _ = _run(model, ids, skip=True, use_cache=False, last_context_length=40)
    assert torch.equal(kept.logits, full.logits[:, -100:])  # lm_head rows of the same hidden states
    _, tokens, _ = _run(
        model, ids, skip=True, use_cache=False, last_context_length=40, logits_to_keep=1, output_hidden_states=True
    )
    assert tokens == [300] * 4


def test_a_continuation_that_fills_local_caches_runs_every_layer():
    # A call on top of a local cache with use_cache: its memory windows pass through the local caches of every layer.
    model = sharp_tiny(mem_layers=[1])
    ids = torch.randint(3, 320, (1, 200))
    with torch.no_grad():
        first = model(ids[:, :30], use_cache=True)
    out, tokens, _ = _run(
        model,
        ids[:, 30:],
        skip=True,
        past_key_values=first.past_key_values,
        use_cache=True,
        last_context_length=40,
        logits_to_keep=1,
    )
    assert tokens == [170] * 4
    ref, _, _ = _run(
        model,
        ids[:, 30:],
        skip=False,
        past_key_values=first.past_key_values,
        use_cache=True,
        last_context_length=40,
        logits_to_keep=1,
    )
    assert torch.equal(out.logits, ref.logits)  # every layer ran in both: the same computation


def test_generate_reads_its_prompt_through_the_memory_layers_only():
    model = sharp_tiny(mem_layers=[0, 1])
    ids = torch.randint(3, 320, (1, 300))
    outs = {}
    tokens, keys, hooks = _counters(model)
    try:
        for skip in (False, True):
            model.set_plan(skip_dead_layers=skip)
            tokens[:], keys[:] = [0] * len(tokens), [0] * len(keys)
            outs[skip] = model.generate(
                ids,
                max_new_tokens=8,
                do_sample=False,
                last_context_length=40,
                output_scores=True,
                return_dict_in_generate=True,
            )
            if skip:  # the memory windows (260 tokens) stop at layer 1's memory; the final 40 and 7 steps do not
                assert keys == [300 + 7] * 2 + [40 + 7] * 2
                assert tokens == [300 + 7] + [40 + 7] * 3
            else:
                assert tokens == keys == [300 + 7] * 4
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(outs[False].sequences, outs[True].sequences)
    # the skipped layers' outputs are never read: the same memory, then the same decoding
    assert torch.equal(torch.stack(outs[False].scores), torch.stack(outs[True].scores))


def test_fill_memories_fills_only_the_lower_memories_of_a_fresh_cache():
    from longllama.errors import InputError

    model = sharp_tiny(mem_layers=[1, 3])
    ids = torch.randint(3, 320, (1, 300))
    whole, keys, hooks = _counters(model)
    try:
        with torch.no_grad():
            full = model(ids, use_cache=True, last_context_length=40, logits_to_keep=1).past_key_values
            whole[:], keys[:] = [0] * 4, [0] * 4
            cache = model.model.new_cache()
            out = model.model.run(ids, cache=cache, use_cache=True, last_context_length=40, fill_memories=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.hidden is None and cache.local_length == 0
    assert keys == [260, 260, 0, 0] and whole == [260, 0, 0, 0]  # the memory windows, up to layer 1's keys
    assert cache.layers[3].memory is None
    assert torch.equal(cache.layers[1].memory.keys, full.layers[1].memory.keys)
    assert torch.equal(cache.layers[1].memory.values, full.layers[1].memory.values)
    for count, options, hint in (
        (0, {}, "2 memory layers"),
        (3, {}, "2 memory layers"),
        (1, {"keep_last": 1}, "fresh cache"),
        (1, {"cache": cache}, "fresh cache"),
    ):
        kwargs = {"cache": model.model.new_cache(), "last_context_length": 40, **options}
        with pytest.raises(InputError, match=hint):
            model.model.run(ids, fill_memories=count, **kwargs)
