"""Retrieval memory (`mem_retrieval="blocks"`, retrieval.py, docs/retrieval.md).

References are independent of the code under test: dense memory attention (attention.attend, itself tested against
transformers) where every block is chosen; exact kNN memory (mem_top_k) where blocks are single keys and each
decoding step is its own query group; bounds and selections recomputed here by explicit loops.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_benchmark

from longllama import LongLlamaForCausalLM, retrieval
from longllama.attention import attend as dense_attend
from longllama.cli import main
from longllama.config import ConfigError, preset
from longllama.errors import InputError
from longllama.memory import MemoryCache
from longllama.plan import ExecutionPlan, check_changes
from longllama.retrieval import BlockChoice


def _memory(b, hkv, m, d, *, dtype=torch.float32, invalid=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, hkv, m, d, generator=g), torch.randn(b, hkv, m, d, generator=g)
    valid = torch.rand(b, m, generator=g) > 0.2 if invalid else None
    memory = MemoryCache(b, hkv, d, dtype=dtype, storage_dim=d + 8 if d % 8 else d)
    memory.append(keys[:, :, : m // 3], values[:, :, : m // 3], None if valid is None else valid[:, : m // 3])
    memory.track_blocks(8)  # summaries from here on, and for what was appended before
    memory.append(keys[:, :, m // 3 :], values[:, :, m // 3 :], None if valid is None else valid[:, m // 3 :])
    return memory


def _queries(rows, h, hkv, n, kv, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, h, n, d, generator=g)
    k, v = torch.randn(rows, hkv, kv, d, generator=g), torch.randn(rows, hkv, kv, d, generator=g)
    visible = (torch.arange(kv)[None, :] <= torch.arange(n)[:, None] + (kv - n))[None, None]
    return q, k, v, visible


@pytest.mark.parametrize(
    "heads, kv_heads, share, dtype, invalid, n",
    [
        (4, 4, 1, torch.float32, False, 70),  # 70 queries: two query groups, the second one partial
        (4, 2, 1, torch.float32, True, 5),  # grouped-query attention, padding in memory
        (4, 2, 2, torch.float32, False, 3),  # beams sharing one stored row
        (4, 4, 1, torch.bfloat16, False, 9),
        (2, 1, 1, torch.int8, True, 1),  # 8-bit memory: gathered int8 with its scales
    ],
)
def test_all_blocks_equal_dense_attention(heads, kv_heads, share, dtype, invalid, n):
    b, m, d, kv = 2, 203, 12, n + 4  # 203 keys: the last block of 8 holds 3
    memory = _memory(b, kv_heads, m, d, dtype=dtype, invalid=invalid)
    if share > 1:
        memory.expand(share)
    q, k, v, visible = _queries(b * share, heads, kv_heads, n, kv, d)
    n_blocks = -(-m // 8)
    out = retrieval.attend(q, k, v, visible=visible, memory=memory, choice=BlockChoice(n_blocks, 8))
    mem_k, mem_v, valid = memory.logical()
    if dtype == torch.int8:  # dense over the same (dequantized) numbers
        mem_k, mem_v = mem_k.float(), mem_v.float()
    ref, _ = dense_attend(q, k, v, visible=visible, mem_k=mem_k, mem_v=mem_v, mem_valid=None if valid.all() else valid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_summaries_bound_every_key_and_forks_keep_their_own():
    memory = _memory(2, 2, 150, 16, invalid=True)
    kmax, kmin, any_valid = memory.summaries(8)
    keys, valid = memory.keys, memory.valid
    assert kmax.shape == (2, 2, 19, 16) and any_valid.shape == (2, 19)
    q = torch.randn(2, 2, 16)
    for row in range(2):
        for head in range(2):
            for block in range(19):
                sel = valid[row, block * 8 : block * 8 + 8]
                ks = keys[row, head, block * 8 : block * 8 + 8][sel]
                assert bool(any_valid[row, block]) == bool(sel.any())
                if len(ks):
                    bound = torch.maximum(q[row, head] * kmax[row, head, block], q[row, head] * kmin[row, head, block])
                    assert float((ks @ q[row, head]).max()) <= float(bound.sum()) + 1e-5
                    torch.testing.assert_close(kmax[row, head, block], ks.max(dim=0).values)
    # Forks: each appends its own keys into (a copy of) the shared buffer; summaries follow each fork's keys.
    twin = memory.fork()
    extra = [torch.randn(2, 2, 30, 16) for _ in range(4)]
    memory.append(extra[0], extra[1])
    twin.append(extra[2], extra[3])
    for mem in (memory, twin):
        fresh = MemoryCache(2, 2, 16, dtype=torch.float32)
        fresh.append(mem.keys, mem.values, mem.valid)
        for got, want in zip(mem.summaries(8), fresh.summaries(8)):
            torch.testing.assert_close(got, want)


def test_selection_is_the_best_bounded_blocks():
    memory = _memory(1, 1, 160, 8)
    kmax, kmin, any_valid = memory.summaries(8)
    q = torch.randn(1, 1, 3, 8)  # one group of three queries
    qg = retrieval._grouped(q, 1, 4)
    real = torch.tensor([[True, True, True, False]])
    chosen = retrieval.select_blocks(qg, kmax, kmin, any_valid, 5, real)
    bounds = []
    for block in range(20):
        per_query = [
            sum(
                max(float(q[0, 0, i, j] * kmax[0, 0, block, j]), float(q[0, 0, i, j] * kmin[0, 0, block, j]))
                for j in range(8)
            )
            for i in range(3)
        ]
        bounds.append(max(per_query))
    want = sorted(sorted(range(20), key=lambda i: -bounds[i])[:5])
    assert chosen.flatten().tolist() == want


def _tiny(**overrides):
    torch.manual_seed(0)
    return LongLlamaForCausalLM(preset("tiny", **overrides)).eval()


def test_single_key_blocks_decode_as_knn_memory():
    """Blocks of one key, one query per group (a decoding step, no GQA): block retrieval is exact kNN memory."""
    model = _tiny()
    ids = torch.randint(1, 320, (2, 200), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(1, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(ids).past_key_values
        logits = {}
        for name, settings in (("knn", dict(mem_top_k=7)), ("blocks", dict(mem_retrieval="blocks", mem_blocks=7))):
            model.config.update({"mem_top_k": None, "mem_retrieval": "dense", "mem_block_size": 1, **settings})
            state, out = cache, []
            for t in range(steps.shape[1]):
                step = model(steps[:, t : t + 1], past_key_values=state)
                state = step.past_key_values
                out.append(step.logits)
            logits[name] = torch.cat(out, dim=1)
    assert model.plan.mem_retrieval == "blocks" and model.plan.mem_block_size == 1
    torch.testing.assert_close(logits["blocks"], logits["knn"], atol=1e-5, rtol=1e-5)


def test_model_reads_fewer_blocks_and_generates():
    dense = _tiny()
    blocks = _tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)
    ids = torch.randint(1, 320, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = dense(ids).logits, blocks(ids).logits
        # The first memory window's queries see at most 8 memory keys either way: equal; later ones differ.
        torch.testing.assert_close(out[:, :64], ref[:, :64], atol=1e-5, rtol=1e-5)
        assert (out - ref).abs().max() > 1e-3
        tokens = blocks.generate(ids[:, :250], max_new_tokens=50, do_sample=False)  # overflows into memory
        static = blocks.generate(ids[:, :250], max_new_tokens=50, do_sample=False, decoder="static")
        assert torch.equal(static, tokens)  # the static decoder's step reads the same blocks (StaticDecoder._attend)
        beams = blocks.generate(ids[:1, :250], max_new_tokens=8, num_beams=3, do_sample=False)
    assert tokens.shape == (2, 300) and beams.shape == (1, 258)
    with pytest.raises(InputError, match="output_attentions"):
        blocks(ids, output_attentions=True)


def test_offloaded_memory_reads_only_the_chosen_blocks():
    model = _tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4, mem_offload=True)
    dense = _tiny()
    ids = torch.randint(1, 320, (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids).past_key_values
        memory = cache.layers[1].memory
        assert memory.pin_memory and memory.length == 400 - 24
        before = memory.read_bytes
        q = torch.randn(1, 4, 1, 16)
        k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)
        retrieval.attend(q, k, v, visible=None, memory=memory, choice=BlockChoice(2, 4))
        # one query group per head, 2 blocks of 4 keys, keys and values in fp32: at most 4 heads x 8 keys x 2
        read = memory.read_bytes - before
        assert 0 < read <= 4 * 8 * 2 * 16 * 4
        full = 4 * 16 * memory.length * 2 * 4
        assert read < full / 40
        # and the model's outputs match the model without offloading
        again = _tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)
        torch.testing.assert_close(model(ids).logits, again(ids).logits, atol=1e-5, rtol=1e-5)
    assert dense.plan.mem_retrieval == "dense"


def test_settings_are_checked_and_recorded(tmp_path):
    with pytest.raises(ConfigError, match="mem_retrieval='bm25'"):
        preset("tiny", mem_retrieval="bm25")
    with pytest.raises(ConfigError, match="mem_blocks=0"):
        preset("tiny", mem_blocks=0)
    with pytest.raises(ConfigError, match="mem_top_k to null"):
        preset("tiny", mem_retrieval="blocks", mem_top_k=4)
    with pytest.raises(InputError, match="--mem-retrieval"):
        check_changes({"mem_retrieval": "blocks"})
    model = _tiny(mem_retrieval="blocks", mem_blocks=3)
    assert model.plan.to_dict()["mem_retrieval"] == "blocks" and model.plan.to_dict()["mem_blocks"] == 3
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    loaded = LongLlamaForCausalLM.from_pretrained(folder, mem_retrieval="blocks", mem_blocks=5)
    assert loaded.plan.mem_retrieval == "blocks" and loaded.plan.mem_blocks == 5


def test_cli_flags_reach_the_record(tmp_path):
    out = tmp_path / "passkey.json"
    argv = ["passkey", "--lengths", "1500", "--trials", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    assert main([*argv, "--mem-retrieval", "blocks", "--mem-blocks", "2"]) == 0
    plan = json.loads(out.read_text())["settings"]["plan"]
    assert (plan["mem_retrieval"], plan["mem_blocks"], plan["mem_block_size"]) == ("blocks", 2, 64)
    assert main([*argv, "--mem-retrieval", "blocks", "--mem-top-k", "8"]) == 2  # one-line error, usage status
    from longllama.cli import build_parser

    for task in (["ruler"], ["lm-eval", "--tasks", "x"]):  # eval tasks take the load options
        args = build_parser().parse_args(["eval", *task, "--mem-retrieval", "blocks", "--mem-blocks", "8"])
        assert (args.mem_retrieval, args.mem_blocks) == ("blocks", 8)


@pytest.mark.parametrize("mode", ["blocks-recent", "dense"])
def test_window_probe_runs_tiny(mode):
    """benchmarks/probe_ingest_windows.py on the CPU: one JSON object whose times are measured and whose memory
    settings are the mode's."""
    done = run_benchmark("probe_ingest_windows.py", "--tiny", "--device", "cpu", "--mode", mode, "--batch", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout[done.stdout.index("{") :])
    assert probe["mode"] == mode and probe["batch"] == 2 and probe["device"] == "cpu"
    assert (probe["mem_recent_blocks"] == 1) == (mode == "blocks-recent")
    assert probe["wall_ms_per_window"] > 0 and probe["kernel_ms_per_window"] > 0
    assert probe["top"] and all(entry["name"].startswith("aten::") and entry["calls"] > 0 for entry in probe["top"])
    host = probe["top_operators_host_ms"]
    assert probe["operators_per_window"] > 0 and host and all(entry["ms_per_window"] > 0 for entry in host)
    # a CPU reads values back too (item, bool of a tensor); it makes no CUDA calls
    assert set(probe["waits_per_window"]) <= {"aten::_local_scalar_dense"}


def test_benchmark_script_runs_tiny(tmp_path):
    out = tmp_path / "retrieval.json"
    done = run_benchmark(
        "bench_retrieval.py",
        "--tiny",
        "--device",
        "cpu",
        "--sections",
        "3b,passkey",
        "--recent-blocks",
        "2",
        "--super-size",
        "2",
        "--batch",
        "2",
        "--step-baseline",
        "--offload",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())
    offloaded = {r["impl"]: r["plan"]["offload_in_place"] for r in records if r["benchmark"] == "ingest"}
    assert offloaded["longllama-offload-in-place"] and not offloaded["longllama-offload"]
    passkey = [r for r in records if r["benchmark"] == "passkey" and r.get("mem_mode") == "blocks"]
    assert passkey and all(r["batch"] == 2 and len(r["seconds"]) == -(-r["trials"] // 2) for r in passkey)
    both = {r["benchmark"] for r in records if r.get("mem_mode") == "blocks2-recent"}
    assert both == {"ingest", "decode", "passkey"}
    baseline = [r for r in records if r.get("impl") == "longllama-step-pytorch"]
    assert baseline and all(r["benchmark"] == "decode" and not r["plan"]["block_kernel"] for r in baseline)
    kinds = {(r["benchmark"], r.get("mem_retrieval"), r.get("mem_top_k")) for r in records}
    assert {("ingest", "blocks", None), ("ingest", "dense", None), ("decode", "blocks", None)} <= kinds
    assert {("passkey", "blocks", None), ("passkey", "dense", None), ("passkey", "dense", 128)} <= kinds
    recent = {r["benchmark"] for r in records if r.get("mem_mode") == "blocks-recent" and r["mem_recent_blocks"] == 2}
    assert recent == {"ingest", "decode", "passkey"}
    control = [r for r in records if r.get("mem_mode") == "no-memory"]
    assert control and all(r["accuracy"] == 0 for r in control)


def test_passkey_at_32k_with_16_blocks_on_the_shipped_model():
    """kNN-like retrieval: the shipped model finds the pass key in a 32k-token prompt reading 16 blocks of 64 keys
    (1024 of up to 32k memory keys) per query group."""
    from longllama.cli import SHIPPED_MODEL
    from longllama.evals import passkey as task
    from longllama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(SHIPPED_MODEL)
    model = LongLlamaForCausalLM.from_pretrained(
        SHIPPED_MODEL, dtype=torch.float32, mem_retrieval="blocks", mem_blocks=16
    ).eval()
    n_garbage = task.n_garbage_for_tokens(tokenizer, 32768, seed=0)
    results = []
    for seed in (0, 1, 2):
        prompt, key = task.passkey_prompt(n_garbage, seed)
        with torch.no_grad():
            results.append(task.score_passkey(model, tokenizer, prompt, key, last_context_length=256)["correct"])
    assert results == [True, True, True]
    assert json.dumps(model.plan.to_dict())  # recordable


def _two_document_requests(model, length_b: int) -> list:
    """Two requests over two document memories (200 and `length_b` tokens), the first decoding past a window."""
    from test_batch import _memory_of

    g = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, 320, (200,), generator=g).tolist()
    doc_b = torch.randint(3, 320, (length_b,), generator=g).tolist()
    mem_a, mem_b = _memory_of(model, doc_a), _memory_of(model, doc_b)
    return [
        (torch.randint(3, 320, (5,), generator=g).tolist(), mem_a, 70),  # past a 64-token window
        (torch.randint(3, 320, (17,), generator=g).tolist(), mem_b, 30),
    ]


def test_batch_decoder_rows_read_blocks_as_alone():
    """The batch decoder (longllama serve) gives each row what block retrieval gives it alone."""
    from conftest import sharp_tiny
    from test_batch import _check_rows

    model = sharp_tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)
    requests = _two_document_requests(model, 330)
    requests.append((torch.randint(3, 320, (150,), generator=torch.Generator().manual_seed(2)).tolist(), None, 20))
    _check_rows(model, requests, steps_between=2)


def test_batch_decoder_reads_chosen_blocks_in_the_kernel(monkeypatch):
    """The batch decoder's Triton step (interpreter): rows under block retrieval give the decoding kernel their
    chosen blocks (retrieval.step_blocks) as their memory, and each row still gets what it gets alone."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from conftest import sharp_tiny
    from test_batch import _check_rows

    model = sharp_tiny(attn_impl="fast", mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)
    gathered = []
    real = retrieval.step_blocks

    def step_blocks(*args, **kwargs):
        out = real(*args, **kwargs)
        gathered.append(out is not None)
        return out

    monkeypatch.setattr(retrieval, "step_blocks", step_blocks)
    _check_rows(model, _two_document_requests(model, 332), steps_between=2, interpret=True)
    assert any(gathered)  # some steps read gathered blocks in the kernel


def _interpreting() -> bool:
    from longllama.fast import kernels

    return kernels.available() and kernels.interpreting()


@pytest.mark.parametrize(
    "heads, kv_heads, invalid, n, blocks, causal, recent",
    [
        (4, 4, False, 70, 5, True, 0),  # two query groups, the second partial; the last block of 8 holds 3 keys
        (4, 2, True, 9, 3, False, 2),  # grouped-query attention, padding in memory, after a local cache; recent
        (2, 1, False, 1, 26, True, 0),  # one query (a decoding step) reading every block
    ],
)
def test_block_kernel_equals_the_gathered_read(heads, kv_heads, invalid, n, blocks, causal, recent):
    """fast/block_attention.py (the Triton kernel under the interpreter, fp32) against retrieval.attend, which
    gathers the same chosen blocks: the same choice, the same softmax."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.fast import block_attention
    from longllama.plan import ExecutionPlan

    b, m, d = 2, 203, 20  # head dim 20: the kernel reads 32 columns, masked
    memory = _memory(b, kv_heads, m, d, invalid=invalid)
    kv = n if causal else n + 4
    q, k, v, visible = _queries(b, heads, kv_heads, n, kv, d)
    plan = ExecutionPlan(attention="fast", interpret_kernels=True, mem_retrieval="blocks", mem_blocks=blocks)
    plan = plan.replace(mem_block_size=8, mem_recent_blocks=recent)
    assert block_attention.applies(q, memory, plan)
    assert not block_attention.applies(q, memory, plan.replace(block_kernel=False))
    out = block_attention.attend(
        q, k, v, visible=None if causal else visible, is_causal=causal, memory=memory, plan=plan
    )
    ref = retrieval.attend(q, k, v, visible=visible, memory=memory, choice=BlockChoice(blocks, 8, recent=recent))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_model_reads_blocks_through_the_kernel():
    """A model whose plan takes the block kernel (interpreter) computes the logits of the gathered read."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.fast import block_attention

    model = _tiny(attn_impl="fast", mem_retrieval="blocks", mem_blocks=2, mem_block_size=8)
    ids = torch.randint(1, 320, (2, 300), generator=torch.Generator().manual_seed(0))
    calls = []
    real = block_attention.memory_part
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_attention, "memory_part", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        model.set_plan(interpret_kernels=True, block_kernel=False)
        ref = model(ids).logits
        assert not calls
        model.set_plan(interpret_kernels=True, block_kernel=True)
        out = model(ids).logits
    assert calls
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "heads, kv_heads, invalid, n",
    [
        (4, 4, False, 70),
        (4, 2, True, 9),
        (6, 2, False, 40),
        (4, 4, False, 1),  # a decoding step: one row per group (the step's kernel)
        (8, 2, True, 1),  # a step under GQA: four rows
        (6, 2, False, 2),  # two positions of three heads in one group of 16: six rows, still the step's kernel
    ],
)
def test_bounds_kernel_chooses_the_blocks_of_select_blocks(heads, kv_heads, invalid, n):
    """The bounds kernels (interpreter, fp32) pick each query group's blocks as select_blocks does in PyTorch: GQA
    (rows of several heads, 3 x 40 = 120 rows: not a power of two), padding rows of a partial group, padding in
    memory, a short last block; a single group of at most 8 rows (a decoding step) through step_bounds_kernel."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.fast import block_attention

    memory = _memory(2, kv_heads, 203, 20, invalid=invalid)
    q = _queries(2, heads, kv_heads, n, n, 20)[0]
    for group, recent in ((64, 0), (16, 0), (16, 2)):
        _, plain, _ = retrieval.choose(q, memory, BlockChoice(5, 8, recent=recent), group)
        _, fast, _ = retrieval.choose(q, memory, BlockChoice(5, 8, recent=recent), group, block_attention.best_bounds)
        assert torch.equal(fast, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_copies_the_chosen_blocks(dtype):
    """fast/block_attention.gather_blocks (interpreter) gives a decoding step the stored rows PyTorch's indexing
    gives (step_blocks with and without it): padded rows (head_dim 12 stored 20 wide), every row and head its own
    blocks, a capacity past the memory's length."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.fast import block_attention

    memory = _memory(2, 3, 200, 12, dtype=dtype)
    memory.reserve(300)
    q = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(3)).to(dtype)
    plain = retrieval.step_blocks(q, memory, BlockChoice(5, 8, recent=1))
    fast = retrieval.step_blocks(q, memory, BlockChoice(5, 8, recent=1), gather=block_attention.gather_blocks)
    assert fast[1] is None and plain[1] is None
    for a, b in zip(fast[0], plain[0]):
        assert a.shape == (2, 3, 40, 20) and torch.equal(a, b)
    _, chosen, _ = retrieval.choose(q[:, :, None], memory, BlockChoice(5, 8, recent=1))
    assert len({tuple(c) for c in chosen.reshape(6, 5).tolist()}) > 1  # heads chose differently


def _bound(q, kmax, kmin, rows, block) -> float:
    """The largest bound over `rows` queries of q (n, d) for one summary (d,) pair, by explicit loops."""
    return max(
        sum(max(float(q[i, j] * kmax[block, j]), float(q[i, j] * kmin[block, j])) for j in range(q.shape[1]))
        for i in range(rows)
    )


@pytest.mark.parametrize("invalid", [False, True])
def test_two_level_choice_ranks_superblocks_then_their_blocks(invalid):
    """select_two_level recomputed by loops: superblocks of 4 blocks (the last one short: 41 blocks) summarised by
    the max of maxima and min of minima, the best ceil(16 * 2 / 4) = 8 of them by bound, then the best 2 blocks
    inside; blocks without a valid key never chosen over valid ones."""
    memory = _memory(1, 1, 328, 8, invalid=invalid, seed=3)  # 41 blocks of 8 keys
    kmax, kmin, any_valid = memory.summaries(8)
    q = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(4))
    qg = retrieval._grouped(q, 1, 4)
    real = torch.tensor([[True, True, True, False]])
    chosen = retrieval.select_blocks(qg, kmax, kmin, any_valid, 2, real, super_size=4)
    km, kn, anyv, qq = kmax[0, 0], kmin[0, 0], any_valid[0], q[0, 0]
    supers = []
    for s in range(11):
        members = [b for b in range(4 * s, min(4 * s + 4, 41))]
        smax = torch.stack([km[b] for b in members]).amax(0)
        smin = torch.stack([kn[b] for b in members]).amin(0)
        valid = any(bool(anyv[b]) for b in members)
        supers.append(_bound(qq, smax[None], smin[None], 3, 0) if valid else float("-inf"))
    best_supers = sorted(range(11), key=lambda s: -supers[s])[:8]
    candidates = [b for s in best_supers for b in range(4 * s, min(4 * s + 4, 41))]
    scored = {b: (_bound(qq, km, kn, 3, b) if anyv[b] else float("-inf")) for b in candidates}
    want = sorted(sorted(candidates, key=lambda b: -scored[b])[:2])
    assert chosen.flatten().tolist() == want


def test_two_level_choice_keeps_distinct_blocks_inside_the_memory():
    """Many groups, GQA, a memory mostly invalid and a short last superblock: every group gets `blocks` distinct
    blocks of the memory, valid ones first; below the size where it pays (or with superblocks too large for the
    candidates to hold `blocks` blocks) the one-level choice is used."""
    g = torch.Generator().manual_seed(5)
    memory = MemoryCache(2, 2, 16, dtype=torch.float32)
    memory.track_blocks(8)
    valid = torch.rand(2, 8 * 300, generator=g) > 0.2
    valid[:, : 8 * 250] = False  # only the last 50 blocks hold valid keys
    memory.append(torch.randn(2, 2, 8 * 300, 16, generator=g), torch.randn(2, 2, 8 * 300, 16, generator=g), valid)
    q = _queries(2, 4, 2, 130, 130, 16)[0]
    _, chosen, _ = retrieval.choose(q, memory, BlockChoice(4, 8, super_size=16), 32)
    assert chosen.shape[-1] == 4 and bool((chosen[..., 1:] > chosen[..., :-1]).all()) and int(chosen.max()) < 300
    _, flat, _ = retrieval.choose(q, memory, BlockChoice(4, 8), 32)
    assert bool((chosen >= 250).all()) and bool((flat >= 250).all())  # valid blocks exist: no invalid one chosen
    small = _memory(1, 1, 8 * 60, 8)  # 60 blocks <= 16 * 4 candidates: one level
    qs = _queries(1, 1, 1, 10, 10, 8)[0]
    for size in (4, 61):  # a superblock of 61 blocks would leave fewer than 4 candidates inside the memory
        assert torch.equal(
            retrieval.choose(qs, small, BlockChoice(4, 8, size))[1], retrieval.choose(qs, small, BlockChoice(4, 8))[1]
        )
    big = _memory(1, 1, 8 * 200, 8)
    assert torch.equal(
        retrieval.choose(qs, big, BlockChoice(4, 8, 61))[1], retrieval.choose(qs, big, BlockChoice(4, 8))[1]
    )


def test_superblock_summaries_are_kept_until_the_next_append():
    """MemoryCache.super_summaries reduces once per state of the memory (every layer call and decoding step until
    the next append reads the same tensors), and an append or a fork's own append gives fresh ones."""
    from longllama.memory import reduce_superblocks

    memory = _memory(1, 2, 8 * 40 + 3, 8)
    first = memory.super_summaries(8, 4)
    assert memory.super_summaries(8, 4) is first
    for got, want in zip(first, reduce_superblocks(*memory.summaries(8), 4)):
        assert torch.equal(got, want)
    twin = memory.fork()
    g = torch.Generator().manual_seed(9)
    twin.append(torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g))
    assert memory.super_summaries(8, 4) is first
    for got, want in zip(twin.super_summaries(8, 4), reduce_superblocks(*twin.summaries(8), 4)):
        assert torch.equal(got, want)
    assert (
        twin.super_summaries(8, 4)[0].shape[2] == 12 and memory.super_summaries(8, 2)[0].shape[2] == 21
    )  # 45, 41 blocks


def test_two_level_setting_is_checked_recorded_and_read_by_the_model(tmp_path):
    with pytest.raises(ConfigError, match="mem_super_size=-1"):
        preset("tiny", mem_super_size=-1)
    with pytest.raises(InputError, match="--mem-retrieval"):
        check_changes({"mem_super_size": 4})
    from longllama.cli import build_parser

    args = build_parser().parse_args(["passkey", "--mem-retrieval", "blocks", "--mem-super-size", "16"])
    assert args.mem_super_size == 16
    seen = []
    original = retrieval.select_two_level

    def spy(*a, **k):
        seen.append(True)
        return original(*a, **k)

    model = _tiny(mem_retrieval="blocks", mem_blocks=1, mem_block_size=4, mem_super_size=2)
    assert model.plan.mem_super_size == 2
    ids = torch.randint(3, model.config.vocab_size, (1, 1200), generator=torch.Generator().manual_seed(0))
    retrieval.select_two_level = spy
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        retrieval.select_two_level = original
    assert seen and out.shape == (1, 1203)


def test_bounds_kernel_ranks_superblocks_as_pytorch_does():
    """The two-level choice with the bounds kernel (interpreter) ranking the superblocks picks what it picks with
    PyTorch's bounds: GQA and padding in memory, with and without a recent block kept."""
    if not _interpreting():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU machine)")
    from longllama.fast import block_attention

    memory = _memory(1, 2, 8 * 90, 20, invalid=True, seed=6)  # 90 blocks > 16 * 2 candidates
    q = _queries(1, 4, 2, 40, 40, 20)[0]
    for recent in (0, 1):
        _, plain, _ = retrieval.choose(q, memory, BlockChoice(2, 8, 4, recent), 16)
        _, fast, _ = retrieval.choose(q, memory, BlockChoice(2, 8, 4, recent), 16, block_attention.best_bounds)
        assert torch.equal(fast, plain)


def _recent_memory():
    """One row, one head, 41 blocks of 8 keys (the last short), blocks 36 and 38 without a valid key."""
    g = torch.Generator().manual_seed(7)
    memory = MemoryCache(1, 1, 8, dtype=torch.float32)
    memory.track_blocks(8)
    valid = torch.ones(1, 325, dtype=torch.bool)
    valid[:, 36 * 8 : 37 * 8] = False
    valid[:, 38 * 8 : 39 * 8] = False
    memory.append(torch.randn(1, 1, 325, 8, generator=g), torch.randn(1, 1, 325, 8, generator=g), valid)
    return memory


@pytest.mark.parametrize("recent, blocks", [(3, 5), (5, 5), (6, 7)])
def test_recent_blocks_are_read_whatever_their_bound(recent, blocks):
    """select_blocks with `recent`: the last `recent` blocks that hold a valid key, then the best of the others by
    bound (recomputed by loops); recent == blocks is a sliding window over the memory."""
    memory = _recent_memory()
    kmax, kmin, any_valid = memory.summaries(8)
    q = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(8))
    qg = retrieval._grouped(q, 1, 4)
    real = torch.tensor([[True, True, True, False]])
    chosen = retrieval.select_blocks(qg, kmax, kmin, any_valid, blocks, real, recent=recent)
    forced = [b for b in range(41 - recent, 41) if b not in (36, 38)]
    others = [b for b in range(41) if b not in forced and b not in (36, 38)]
    ranked = sorted(others, key=lambda b: -_bound(q[0, 0], kmax[0, 0], kmin[0, 0], 3, b))
    assert chosen.flatten().tolist() == sorted(forced + ranked[: blocks - len(forced)])
    plain = retrieval.select_blocks(qg, kmax, kmin, any_valid, blocks, real)
    assert not set(forced) <= set(plain.flatten().tolist())  # the bound alone would miss some of them


@pytest.mark.parametrize("recent", [0, 6])
def test_two_level_choice_keeps_the_recent_blocks(recent):
    """select_two_level with `recent`, recomputed by loops: the superblocks holding the last `recent` blocks join
    the candidates whatever their bound, and those blocks (where valid) are chosen among the `blocks`."""
    memory = _recent_memory()
    kmax, kmin, any_valid = memory.summaries(8)
    q = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(4))
    qg = retrieval._grouped(q, 1, 4)
    real = torch.tensor([[True, True, True, False]])
    chosen = retrieval.select_blocks(qg, kmax, kmin, any_valid, 8, real, super_size=16, recent=recent)
    km, kn, anyv, qq = kmax[0, 0], kmin[0, 0], any_valid[0], q[0, 0]
    members = [list(range(16 * s, min(16 * s + 16, 41))) for s in range(3)]
    supers = []
    for s, blocks in enumerate(members):
        smax = torch.stack([km[b] for b in blocks]).amax(0)
        smin = torch.stack([kn[b] for b in blocks]).amin(0)
        forced = recent and s >= (41 - recent) // 16
        supers.append(float("inf") if forced else _bound(qq, smax[None], smin[None], 3, 0))
    best_supers = sorted(range(3), key=lambda s: -supers[s])[: -(-16 * 8 // 16)]
    candidates = [b for s in best_supers for b in members[s]]

    def score(b: int) -> float:
        if not anyv[b]:
            return float("-inf")
        return float("inf") if b >= 41 - recent else _bound(qq, km, kn, 3, b)

    want = sorted(sorted(candidates, key=lambda b: -score(b))[:8])
    assert chosen.flatten().tolist() == want
    assert {b for b in range(41 - recent, 41) if b not in (36, 38)} <= set(want)


def test_recent_blocks_setting_is_checked_recorded_and_read_by_the_model():
    for bad in (-1, 3, True):
        with pytest.raises(ConfigError, match=f"mem_recent_blocks={bad!r} must be an integer from 0 to mem_blocks"):
            preset("tiny", mem_blocks=2, mem_recent_blocks=bad)
    with pytest.raises(InputError, match="--mem-recent-blocks"):
        check_changes({"mem_recent_blocks": 1})
    from longllama.cli import build_parser

    args = build_parser().parse_args(["passkey", "--mem-retrieval", "blocks", "--mem-recent-blocks", "8"])
    assert args.mem_recent_blocks == 8
    ids = torch.randint(1, 320, (2, 300), generator=torch.Generator().manual_seed(0))
    window = _tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4, mem_recent_blocks=2)
    bound = _tiny(mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)
    assert window.plan.to_dict()["mem_recent_blocks"] == 2 and bound.plan.mem_recent_blocks == 0
    with torch.no_grad():
        assert (window(ids).logits - bound(ids).logits).abs().max() > 1e-3
        tokens = window.generate(ids[:, :250], max_new_tokens=50, do_sample=False)  # overflows into memory
        static = window.generate(ids[:, :250], max_new_tokens=50, do_sample=False, decoder="static")
        other = bound.generate(ids[:, :250], max_new_tokens=50, do_sample=False)
    assert torch.equal(static, tokens) and not torch.equal(other, tokens)


def test_mem_offload_flag_keeps_the_memory_in_cpu_memory_with_the_same_tokens(tmp_path):
    """--mem-offload (every model command) loads the checkpoint with mem_offload: the memory is made in CPU memory,
    and block retrieval over it decodes the tokens of the memory kept with the model."""
    from longllama import cli

    assert cli.build_parser().parse_args(["passkey", "--mem-offload"]).mem_offload is True
    assert cli.build_parser().parse_args(["passkey"]).mem_offload is None  # the checkpoint's own setting
    torch.manual_seed(0)
    LongLlamaForCausalLM(preset("tiny", mem_retrieval="blocks", mem_blocks=2, mem_block_size=4)).save_pretrained(
        tmp_path / "m"
    )
    kept = cli.load_model(tmp_path / "m", cli.LoadOptions(device="cpu"))
    offloaded = cli.load_model(tmp_path / "m", cli.LoadOptions(device="cpu", mem_offload=True))
    assert offloaded.config.mem_offload and not kept.config.mem_offload
    ids = torch.randint(3, kept.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = offloaded(ids, use_cache=True)
        memory = next(layer.memory for layer in out.past_key_values.layers if layer.memory is not None)
        assert memory.device.type == "cpu" and memory.keys.shape[-2] > 0
        tokens = offloaded.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens, kept.generate(ids, max_new_tokens=8, do_sample=False))


def test_an_offloaded_memory_is_read_in_place_only_where_pinned_and_planned(monkeypatch):
    """block_attention.reads_in_place: a memory on the queries' device always; one in CPU memory from a CUDA device
    only where it is page-locked (which maps it into the GPU's addresses) and the plan's offload_in_place is on."""
    from longllama.fast import block_attention

    memory = MemoryCache(1, 2, 8, dtype=torch.float32, device="cpu", pin_memory=True)
    assert memory.pinned == torch.cuda.is_available()  # pinning needs CUDA: asked for, not given on a CPU machine
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    off, on = ExecutionPlan(offload_in_place=False), ExecutionPlan()
    assert on.offload_in_place  # on by default
    assert memory.mapped_to(cpu) and block_attention.reads_in_place(memory, cpu, off)
    monkeypatch.setattr(MemoryCache, "pinned", property(lambda self: False))
    assert not memory.mapped_to(cuda) and not block_attention.reads_in_place(memory, cuda, on)
    monkeypatch.setattr(MemoryCache, "pinned", property(lambda self: True))  # as on a CUDA machine
    assert memory.mapped_to(cuda)
    assert block_attention.reads_in_place(memory, cuda, on) and not block_attention.reads_in_place(memory, cuda, off)
