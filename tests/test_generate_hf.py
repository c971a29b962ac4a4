"""transformers' generation vocabulary in LongLLaMA's `generate`: beam search, processors and stopping criteria
against transformers' LlamaForCausalLM on the same weights (a prompt that fits the final window, where the two
models compute the same logits), and beams sharing one memory on prompts longer than the window, checked against
the same model run row by row without sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ForcedTokens
from test_invariants import hf_llama, tiny
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

import longllama
from longllama import LongLlamaForCausalLM
from longllama.config import preset
from longllama.errors import InputError
from longllama.tokenizer import load_tokenizer

SMALL = Path(longllama.__file__).parent / "models" / "small"


@pytest.fixture(scope="module")
def pair():
    model = tiny()
    return model, hf_llama(model)


def prompt(batch: int = 2, n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


def both(pair, ids, **kwargs):
    model, llama = pair
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        theirs = llama.generate(ids, pad_token_id=0, **kwargs)
    return ours, theirs


def eos_hit(pair, ids, **kwargs) -> int:
    """A token that transformers' own beam search produces early, so that eos cases really end hypotheses."""
    _, llama = pair
    with torch.no_grad():
        out = llama.generate(ids, max_new_tokens=4, pad_token_id=0, **kwargs)
    return int(out[0, ids.shape[1] + 1])


# -- beam search -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        dict(num_beams=2),
        dict(num_beams=4, eos=True),
        dict(num_beams=4, eos=True, length_penalty=0.5, num_return_sequences=2),
        dict(num_beams=4, length_penalty=1.5, num_return_sequences=2),
        dict(num_beams=3, eos=True, early_stopping=True),
        dict(num_beams=3, eos=True, early_stopping="never", length_penalty=2.0),
    ],
)
def test_beam_search_equals_transformers(pair, case):
    case = dict(case)
    ids = prompt()
    if case.pop("eos", False):
        case["eos_token_id"] = eos_hit(pair, ids, num_beams=case["num_beams"])
    ours, theirs = both(pair, ids, max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **case)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.beam_indices, theirs.beam_indices)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=0)
    assert len(ours.scores) == len(theirs.scores)
    model, llama = pair
    for normalize in (False, True):
        mine = model.compute_transition_scores(ours.sequences, ours.scores, ours.beam_indices, normalize)
        ref = llama.compute_transition_scores(theirs.sequences, theirs.scores, theirs.beam_indices, normalize)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_beam_sampling_and_sampled_sequences_equal_transformers(pair):
    ids = prompt(batch=1)
    for kwargs in (
        dict(num_beams=3, do_sample=True, top_k=20),
        dict(do_sample=True, num_return_sequences=3, temperature=0.7, top_p=0.9),
    ):
        model, llama = pair
        with torch.no_grad():
            torch.manual_seed(7)
            ours = model.generate(ids, max_new_tokens=6, **kwargs)
            torch.manual_seed(7)
            theirs = llama.generate(ids, max_new_tokens=6, pad_token_id=0, **kwargs)
        assert torch.equal(ours, theirs), kwargs


# -- processors and stopping criteria --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(no_repeat_ngram_size=2),
        dict(bad_words_ids=[[17], [40, 41]]),
        dict(repetition_penalty=1.3, suppress_tokens=[5, 6], begin_suppress_tokens=[7]),
        dict(min_length=16, eos_token_id=1, forced_eos_token_id=3),
        dict(sequence_bias={(9,): 4.0}, renormalize_logits=True),
        dict(num_beams=2, no_repeat_ngram_size=2, bad_words_ids=[[17]]),
    ],
)
def test_processors_equal_transformers(pair, kwargs):
    ids = prompt(seed=3)
    ours, theirs = both(pair, ids, max_new_tokens=10, **kwargs)
    assert torch.equal(ours, theirs)


def test_generation_config_fields_are_the_settings(pair):
    ids = prompt(seed=4)
    config = GenerationConfig(max_new_tokens=7, no_repeat_ngram_size=1, num_beams=2)
    ours, theirs = both(pair, ids, generation_config=config)
    assert torch.equal(ours, theirs) and ours.shape[1] == ids.shape[1] + 7


class StopAfter(StoppingCriteria):
    """Per-row stop once `token` appears in the generated part."""

    def __init__(self, token: int, start: int):
        self.token, self.start = token, start

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.start :] == self.token).any(dim=1)


def test_stopping_criteria_stop_where_transformers_stops(pair):
    ids = prompt(seed=5)
    model, llama = pair
    with torch.no_grad():
        free = llama.generate(ids, max_new_tokens=12, pad_token_id=0)
    token = int(free[1, ids.shape[1] + 4])  # row 1 reaches it after 5 tokens
    for extra in (dict(), dict(eos_token_id=int(free[0, ids.shape[1] + 2]))):
        criteria = StoppingCriteriaList([StopAfter(token, ids.shape[1])])
        ours, theirs = both(pair, ids, max_new_tokens=12, stopping_criteria=criteria, **extra)
        assert torch.equal(ours, theirs)
        assert ours.shape[1] < ids.shape[1] + 12 or not extra  # with eos ending row 0, row 1's criterion ends it


@pytest.fixture(scope="module")
def text_pair():
    tokenizer = load_tokenizer(SMALL)
    torch.manual_seed(0)
    model = LongLlamaForCausalLM(preset("tiny", vocab_size=len(tokenizer))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model, hf_llama(model), tokenizer


def test_stop_strings_and_lm_eval_criteria(text_pair):
    from lm_eval.models.utils_hf import stop_sequences_criteria

    model, llama, tokenizer = text_pair
    ids = tokenizer(["the cat sat on", "a long time ago"], return_tensors="pt").input_ids
    n = ids.shape[1]
    with torch.no_grad():
        free = llama.generate(ids, max_new_tokens=16, pad_token_id=0)
    # one stop string from each row's free continuation, so that both rows stop early
    stop = [tokenizer.decode(free[row, n + 4 + row : n + 6 + row]).strip() for row in range(2)]
    assert all(stop)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=16, stop_strings=stop, tokenizer=tokenizer)
        theirs = llama.generate(ids, max_new_tokens=16, pad_token_id=0, stop_strings=stop, tokenizer=tokenizer)
        assert torch.equal(ours, theirs) and ours.shape[1] < n + 16
        ours = model.generate(ids, max_new_tokens=16, stopping_criteria=stop_sequences_criteria(tokenizer, stop, n, 2))
        theirs = llama.generate(
            ids, max_new_tokens=16, pad_token_id=0, stopping_criteria=stop_sequences_criteria(tokenizer, stop, n, 2)
        )
    assert torch.equal(ours, theirs)
    with pytest.raises(InputError, match="tokenizer="):
        model.generate(ids, max_new_tokens=2, stop_strings=stop)


# -- beams sharing the memory ----------------------------------------------------------------------------------
def teacher_forced_log_probs(model, ids: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `generated` (1, g) after `ids` (1, n): the model alone, one row, no sharing."""
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=generated.shape[1],
            logits_processor=[ForcedTokens(torch.cat([ids, generated], dim=1))],
            output_logits=True,
            return_dict_in_generate=True,
            decoder="dynamic",
        )
    logits = torch.stack(out.logits, dim=1)[0].log_softmax(-1)
    return logits.gather(1, generated[0, :, None])[:, 0]


@pytest.mark.parametrize("impl", [{}, {"torch_attention": True}, {"attn_impl": "fast"}])
@pytest.mark.parametrize("new", [20, 50])  # 50 > window - last_context_length: a beam's cache overflows to memory
def test_beams_share_the_memory(impl, new):
    model = tiny(**impl)
    ids = prompt(batch=1, n=150, seed=6)  # 150 tokens, window 64: memory in use
    with torch.no_grad():
        alone = model(ids, use_cache=True).cache
        out = model.generate(
            ids, num_beams=3, num_return_sequences=2, max_new_tokens=new, length_penalty=0.0,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
    shares = [s.memory.share for s in out.cache.layers if s.memory is not None]
    if new == 20:
        assert shares == [3, 3]
        assert out.cache.memory_bytes() == alone.memory_bytes()  # one copy of the prompt's memory, not three
    else:
        assert shares == [1, 1]  # materialised when the beams' caches moved into memory
    n = ids.shape[1]
    for row in range(2):
        generated = out.sequences[row : row + 1, n:]
        lp = teacher_forced_log_probs(model, ids, generated)
        # length_penalty 0: the sequence score is the sum of its tokens' log-probabilities
        torch.testing.assert_close(lp.sum(), out.sequences_scores[row], atol=1e-4, rtol=0)


def test_one_beam_equals_greedy_with_memory():
    model = tiny()
    ids = prompt(batch=2, n=150, seed=8)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=12)
        sampled_rows = model.generate(ids, max_new_tokens=12, num_beams=1)
    assert torch.equal(greedy, sampled_rows)


@pytest.mark.parametrize(
    "impl", [{}, {"torch_attention": True}, {"attn_impl": "fast"}, {"mem_top_k": 8}, {"mem_attention_grouping": (2, 1)}]
)
def test_shared_memory_reads_equal_copied_memory(impl):
    model = tiny(**impl)
    ids = prompt(batch=2, n=150, seed=9)
    new = prompt(batch=6, n=5, seed=10)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        shared, copied = cache.fork(), cache.fork()
        shared.expand_rows(3)
        copied.expand_rows(3)
        for s in copied.layers:
            if s.memory is not None:
                s.memory.materialise()
        for tokens in (new, new[:, :1]):  # a window of a few queries, and one decoding step
            a = model(tokens, cache=shared).logits
            b = model(tokens, cache=copied).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(s.memory.share == 3 for s in shared.layers if s.memory is not None)


# -- refusals ----------------------------------------------------------------------------------------------------
def test_unsupported_options_are_one_line_errors(pair):
    model, _ = pair
    ids = prompt(batch=1)
    cases = {
        "penalty_alpha": dict(penalty_alpha=0.6, top_k=4),
        "num_beam_groups": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
        "force_words_ids": dict(num_beams=2, force_words_ids=[[5]]),
        "assistant_model": dict(assistant_model=model),
        "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=3),
        "cache_implementation": dict(cache_implementation="static"),
        "num_return_sequences": dict(num_return_sequences=2),
        "streamer": dict(num_beams=2, streamer=object()),
        "unsupported argument": dict(no_such_option=1),
    }
    for hint, kwargs in cases.items():
        with pytest.raises(InputError) as info:
            model.generate(ids, max_new_tokens=2, **kwargs)
        message = str(info.value)
        assert "\n" not in message and hint in message, (hint, message)


def test_shared_memory_exports_and_selections_are_per_row(tmp_path):
    from longllama import MemoryCache

    model = tiny()
    with torch.no_grad():
        cache = model(prompt(batch=2, n=150, seed=11), use_cache=True).cache
    mem = next(s.memory for s in cache.layers if s.memory is not None)
    keys = mem.keys.clone()
    shared = cache.fork()
    shared.expand_rows(3)
    legacy = shared.to_legacy()
    layer = next(i for i, s in enumerate(shared.layers) if s.memory is not None)
    assert torch.equal(legacy[layer][3], keys.repeat_interleave(3, dim=0))  # one row per beam in exports
    memory = shared.layers[layer].memory
    memory.save(tmp_path / "m.safetensors")
    assert torch.equal(MemoryCache.load(tmp_path / "m.safetensors").keys, keys.repeat_interleave(3, dim=0))
    memory.index_select(torch.tensor([2, 0, 1, 5, 5, 3]))  # beams reordered within their prompt: still shared
    assert memory.share == 3 and memory.keys.data_ptr() == mem.keys.data_ptr()
    memory.index_select(torch.tensor([4, 0]))  # rows across prompts: the selected rows become stored rows
    assert memory.share == 1 and torch.equal(memory.keys, keys[[1, 0]])
