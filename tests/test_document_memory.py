"""DocumentMemory: a saved and loaded memory predicts bitwise what the document read again predicts; loading checks
the model, tokenizer, settings and every tensor file with one-line errors; a save is never seen half-written;
conversations fork the memory and never change it; chat formats give the tokenizer's chat template ids."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from longllama import LongLlamaForCausalLM, document_memory
from longllama.chat_format import chat_format
from longllama.cli import SHIPPED_MODEL
from longllama.config import preset
from longllama.document_memory import DocumentMemory
from longllama.errors import CheckpointError, InputError
from longllama.tokenizer import TOKENIZER_FILE, load_tokenizer, write_tokenizer_files

WORDS = "river stone lamp paper window garden silver music orange cloud bridge forest".split()
DOCUMENT = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(400))  # several windows of the tiny model


def _folder(root: Path, name: str, *, seed: int = 0, **overrides) -> Path:
    """A tiny fp32 LongLLaMA (random weights) with the shipped model's tokenizer."""
    folder = root / name
    torch.manual_seed(seed)
    LongLlamaForCausalLM(preset("tiny", vocab_size=8192, **overrides)).save_pretrained(folder)
    shutil.copy(SHIPPED_MODEL / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("docmem")
    return {
        "tiny": _folder(root, "tiny"),
        "other_weights": _folder(root, "other_weights", seed=1),
        "other_config": _folder(root, "other_config", rms_norm_eps=1e-5),
        "int8_memory": _folder(root, "int8_memory", mem_dtype="int8"),
    }


def _load(folder: Path, **options):
    return LongLlamaForCausalLM.from_pretrained(folder, **options).eval(), load_tokenizer(folder)


@pytest.fixture(scope="module")
def tiny(folders):
    return _load(folders["tiny"])


def _next_logits(model, cache, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[0, -1]


def test_save_load_gives_bitwise_the_logits_of_reading_again(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    assert memory.cache.memory_length > 0 and memory.cache.local_length == model.config.last_context_length
    path = memory.save(tmp_path / "mem")
    loaded = DocumentMemory.load(path, model, tokenizer)
    again = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    # The independent path: the model's own forward over the same ids, its cache continued.
    ids = list(memory.format.prefix_ids) + memory.format.document_ids(DOCUMENT)
    assert len(ids) == memory.tokens == loaded.tokens
    with torch.no_grad():
        direct = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    assert torch.equal(memory.next_logits, direct.logits[0, -1])
    question = tokenizer.encode("silver music", add_special_tokens=False)
    want = _next_logits(model, direct.cache, question)
    for other in (memory, loaded, again):
        assert torch.equal(_next_logits(model, other.cache, question), want)
    assert loaded.ask("river stone", max_new_tokens=5) == memory.ask("river stone", max_new_tokens=5)


def test_conversations_fork_the_memory_and_never_change_it(tiny) -> None:
    model, tokenizer = tiny
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT)  # the default chat template
    question = tokenizer.encode("lamp", add_special_tokens=False)
    before = _next_logits(model, memory.cache, question)
    lengths = (memory.cache.local_length, memory.cache.memory_length)
    talk = memory.conversation(max_new_tokens=6, stop=())
    first = talk.ask("What is the garden?")
    second = talk.ask("And the river?")
    assert len(talk.turns) == 2 and talk.cache is not memory.cache
    assert "".join(memory.stream("What is the garden?", max_new_tokens=6, stop=())) == first
    talk.reset()
    assert talk.ask("What is the garden?") == first
    assert isinstance(second, str)
    assert (memory.cache.local_length, memory.cache.memory_length) == lengths
    assert torch.equal(_next_logits(model, memory.cache, question), before)


def test_a_second_turn_continues_the_conversation(tiny) -> None:
    """The state a Conversation reaches after one answer predicts what the model reading the document, the turn,
    the answer and the format's end of answer predicts (fp32: equal up to the rounding of other window splits)."""
    model, tokenizer = tiny
    # A short final window leaves room for both turns in the local cache: no overflow into memory, which would
    # happen at different tokens when the turns are read at once.
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, last_context_length=8)
    fmt = memory.format
    for stop in ((), ("e",)):  # an answer ended by max_new_tokens, then one cut at a stop string
        talk = memory.conversation(max_new_tokens=6, stop=stop)
        talk.ask("What is the garden?")
        turn1 = fmt.turn_ids("What is the garden?", first=True)
        turn2 = fmt.turn_ids("And?", first=False)
        conversation = turn1 + talk.answer_ids[0] + list(fmt.end_ids) + turn2
        want = _next_logits(model, memory.cache, conversation)
        got = _next_logits(model, talk.cache, talk.pending + turn2)
        assert 8 + len(conversation) <= model.config.context_window
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if stop:
            assert "e" not in talk.turns[0][1]


def test_chat_format_matches_the_tokenizers_chat_template(tiny) -> None:
    _, tokenizer = tiny
    fmt = chat_format(tokenizer)
    conversation = [
        {"role": "user", "content": "Hi there?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Again?"},
    ]
    want = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
    mine = (
        list(fmt.prefix_ids)
        + fmt.turn_ids("Hi there?", first=True)
        + tokenizer.encode("Yes.", add_special_tokens=False)
        + list(fmt.end_ids)
        + fmt.turn_ids("Again?", first=False)
    )
    assert mine == want
    single = chat_format(tokenizer, "openorca-3b", system="Be brief.")
    want = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, conversation[0]], add_generation_prompt=True, return_dict=False
    )
    assert want[: len(single.prefix_ids)] == list(single.prefix_ids)
    with pytest.raises(InputError, match="one question per conversation"):
        single.turn_ids("Again?", first=False)
    with pytest.raises(InputError, match="not one of this tokenizer's"):
        chat_format(tokenizer, "no-such-template")
    plain = chat_format(tokenizer, "none")
    assert list(plain.prefix_ids) == [tokenizer.bos_token_id] and plain.stop_strings == ("\n",)


def test_files_become_one_document_with_their_checksums(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    (tmp_path / "a.txt").write_text("river stone lamp\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "paper window"}) + "\n", encoding="utf-8")
    memory = DocumentMemory.from_files(model, tokenizer, [tmp_path / "a.txt", tmp_path / "b.jsonl"], template="none")
    text = "river stone lamp\n" + "\n\n" + "paper window"
    assert memory.tokens == 1 + len(tokenizer.encode(text, add_special_tokens=False))
    digest = hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    assert memory.sources[0] == {"name": "a.txt", "bytes": 17, "sha256": digest}
    with pytest.raises(InputError, match="does not exist"):
        DocumentMemory.from_files(model, tokenizer, [tmp_path / "missing.txt"])


def _one_line_error(call, hint: str) -> None:
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and hint in message, message
    assert "build" in message or "load it with" in message or "run with" in message, message  # names the fix


def test_a_memory_checked_in_many_chunks_loads_as_saved(tiny, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = tiny
    monkeypatch.setattr(document_memory, "_CHECK_CHUNK", 1000)  # many checksum chunks, read side by side
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    path = memory.save(tmp_path / "mem")
    entries = json.loads((path / "manifest.json").read_text())["files"]
    assert all(len(e["sha256_chunks"]) == -(-e["bytes"] // 1000) for e in entries.values())
    assert max(len(e["sha256_chunks"]) for e in entries.values()) > 3
    loaded = DocumentMemory.load(path, model, tokenizer)
    for mine, theirs in zip(memory.cache.layers, loaded.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.positions, theirs.positions)
        if mine.memory is not None:
            assert all(torch.equal(a, b) for a, b in zip(mine.memory.padded(), theirs.memory.padded()))
    tensor = path / "memory.layer1.safetensors"
    data = bytearray(tensor.read_bytes())
    data[2500] ^= 0x01  # a byte of the third chunk
    tensor.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        DocumentMemory.load(path, model, tokenizer)


def test_loading_refuses_other_models_settings_and_damaged_files(tiny, folders, tmp_path: Path) -> None:
    model, tokenizer = tiny
    saved = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none").save(tmp_path / "mem")
    for name in ("other_weights", "other_config"):
        other, other_tokenizer = _load(folders[name])
        _one_line_error(lambda m=other, t=other_tokenizer: DocumentMemory.load(saved, m, t), "another model")
    bf16, _ = _load(folders["tiny"], dtype=torch.bfloat16)
    _one_line_error(lambda: DocumentMemory.load(saved, bf16, tokenizer), "dtype")
    bf16_memory, _ = _load(folders["tiny"], mem_dtype="bfloat16")
    _one_line_error(lambda: DocumentMemory.load(saved, bf16_memory, tokenizer), "mem_dtype")
    no_memory, _ = _load(folders["tiny"], mem_layers=[1])
    _one_line_error(lambda: DocumentMemory.load(saved, no_memory, tokenizer), "mem_layers")
    blocks, _ = _load(folders["tiny"], mem_retrieval="blocks")
    _one_line_error(lambda: DocumentMemory.load(saved, blocks, tokenizer), "mem_retrieval")
    # A memory saved before the retrieval settings were recorded was read with dense memory attention.
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    manifest = json.loads((older / "manifest.json").read_text())
    for key in ("mem_retrieval", "mem_blocks", "mem_block_size"):
        del manifest["settings"][key]
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert DocumentMemory.load(older, model, tokenizer).tokens == DocumentMemory.load(saved, model, tokenizer).tokens
    _one_line_error(lambda: DocumentMemory.load(older, blocks, tokenizer), "mem_retrieval")
    # A block-retrieval memory saved before mem_super_size was recorded loads with one level, not with two.
    saved_blocks = DocumentMemory.build(blocks, tokenizer, DOCUMENT, template="none").save(tmp_path / "blocks")
    older_blocks = tmp_path / "older-blocks"
    shutil.copytree(saved_blocks, older_blocks)
    manifest = json.loads((older_blocks / "manifest.json").read_text())
    assert manifest["settings"].pop("mem_super_size") is None
    assert manifest["settings"].pop("mem_recent_blocks") is None  # likewise, read without recent blocks kept
    (older_blocks / "manifest.json").write_text(json.dumps(manifest))
    assert (
        DocumentMemory.load(older_blocks, blocks, tokenizer).tokens
        == DocumentMemory.load(saved_blocks, blocks, tokenizer).tokens
    )
    two_level, _ = _load(folders["tiny"], mem_retrieval="blocks", mem_super_size=4)
    _one_line_error(lambda: DocumentMemory.load(older_blocks, two_level, tokenizer), "mem_super_size")
    recent, _ = _load(folders["tiny"], mem_retrieval="blocks", mem_recent_blocks=2)
    _one_line_error(lambda: DocumentMemory.load(older_blocks, recent, tokenizer), "mem_recent_blocks")
    _one_line_error(lambda: DocumentMemory.load(saved, model, tokenizer, template="default"), "template")

    def damaged(change) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, copy)
        change(copy)
        return copy

    def truncate(folder: Path) -> None:
        path = folder / "memory.layer3.safetensors"
        path.write_bytes(path.read_bytes()[:-100])

    def flip(folder: Path) -> None:
        path = folder / "memory.layer1.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    cases = {
        "truncated": (truncate, "truncated"),
        "flipped byte": (flip, "sha256"),
        "missing manifest": (lambda folder: (folder / "manifest.json").unlink(), "manifest.json"),
        "missing file": (lambda folder: (folder / "local.safetensors").unlink(), "missing"),
    }
    for change, hint in cases.values():
        folder = damaged(change)
        _one_line_error(lambda folder=folder: DocumentMemory.load(folder, model, tokenizer), hint)


class _FailingMemory:
    """Stands in for a memory layer's memory: writing it fails, as a crash in the middle of a save would."""

    length = 10

    def tensors(self):  # what a save reads of a memory
        raise RuntimeError("disk gone")


def _same_cache(a, b) -> None:
    for mine, theirs in zip(a.layers, b.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert torch.equal(mine.positions, theirs.positions)
        assert (mine.memory is None) == (theirs.memory is None)
        if mine.memory is not None:
            assert mine.memory.length == theirs.memory.length > 0
            assert all(torch.equal(x, y) for x, y in zip(mine.memory.padded(), theirs.memory.padded()))
            scales = mine.memory.scales()  # an int8 memory's (key, value) scales, else None
            assert (scales is None) == (theirs.memory.scales() is None)
            if scales is not None:
                assert all(torch.equal(x, y) for x, y in zip(scales, theirs.memory.scales()))


@pytest.mark.parametrize("impl, folder", [("eager", "tiny"), ("fast", "tiny"), ("fast", "int8_memory")])
def test_recomputed_lower_layers_give_the_memory_that_was_saved(folders, impl: str, folder: str, tmp_path) -> None:
    # tiny: memory layers 1 and 3. recompute_layers=1 computes layer 1's memory from the saved tokens (the memory
    # windows stop there) while layer 3's file is read; 2 reads no memory file. The same kernels on the same inputs
    # as the build: bitwise the same caches, and the same prediction after the document. "fast" reads the memory
    # windows in groups of two (an int8 memory window by window, quantized as it is written).
    model, tokenizer = _load(folders[folder])
    model.config.attn_impl = impl
    model.set_plan(window_group_tokens=128)
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    assert (memory.cache.layers[1].memory.scales() is not None) == (folder == "int8_memory")
    path = memory.save(tmp_path / "mem")
    ids = torch.tensor(list(memory.format.prefix_ids) + memory.format.document_ids(DOCUMENT), dtype=torch.int32)
    for k in (0, 1, 2):
        loaded = DocumentMemory.load(path, model, tokenizer, recompute_layers=k)
        assert torch.equal(loaded.ids, ids) and loaded.tokens == memory.tokens
        _same_cache(memory.cache, loaded.cache)
        if k:
            assert torch.equal(loaded.next_logits, memory.next_logits)
    assert loaded.ask("river stone", max_new_tokens=5) == memory.ask("river stone", max_new_tokens=5)
    # What is recomputed is not read: a damaged layer-1 file does not stop recompute_layers=1, layer 3's does.
    layer1, layer3 = path / "memory.layer1.safetensors", path / "memory.layer3.safetensors"
    good = layer1.read_bytes()
    layer1.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    _one_line_error(lambda: DocumentMemory.load(path, model, tokenizer), "sha256")
    _same_cache(memory.cache, DocumentMemory.load(path, model, tokenizer, recompute_layers=1).cache)
    layer1.write_bytes(good)
    data = layer3.read_bytes()
    layer3.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _one_line_error(lambda: DocumentMemory.load(path, model, tokenizer, recompute_layers=1), "sha256")
    _same_cache(memory.cache, DocumentMemory.load(path, model, tokenizer, recompute_layers=2).cache)


def test_an_offloading_model_loads_a_saved_memory_into_its_cpu_memory(folders, tmp_path: Path) -> None:
    """With mem_offload (--mem-offload) a saved memory is loaded where that model keeps its memories: page-locked
    CPU memory, as the memories it reads itself (also the layers recomputed), and it answers as the memory loaded
    beside the weights."""
    blocks = dict(mem_retrieval="blocks", mem_blocks=2, mem_block_size=8)
    kept, tokenizer = _load(folders["tiny"], **blocks)
    offloading, _ = _load(folders["tiny"], **blocks, mem_offload=True)
    path = DocumentMemory.build(kept, tokenizer, DOCUMENT, template="none").save(tmp_path / "mem")
    want = DocumentMemory.load(path, kept, tokenizer)
    assert all(not layer.memory.pin_memory for layer in want.cache.layers if layer.memory is not None)
    for k in (0, 1):
        loaded = DocumentMemory.load(path, offloading, tokenizer, recompute_layers=k)
        memories = [layer.memory for layer in loaded.cache.layers if layer.memory is not None]
        assert len(memories) == 2 and all(m.pin_memory and m.device.type == "cpu" for m in memories)
        assert loaded.ask("river stone", max_new_tokens=5) == want.ask("river stone", max_new_tokens=5)


def test_recomputing_needs_the_saved_tokens_and_a_memory_layer_count(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    for k in (-1, 3):
        with pytest.raises(InputError, match="2 memory layers") as info:
            DocumentMemory.load(memory.save(tmp_path / "mem"), model, tokenizer, recompute_layers=k)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="load onto that device"):
        DocumentMemory.load(memory.save(tmp_path / "mem"), model, tokenizer, recompute_layers=1, device="meta")
    memory.ids = None  # as memories saved before the tokens were kept
    path = memory.save(tmp_path / "old")
    assert not (path / document_memory.TOKENS_FILE).exists()
    with pytest.raises(InputError, match="without its tokens.*recompute_layers=0"):
        DocumentMemory.load(path, model, tokenizer, recompute_layers=1)
    assert DocumentMemory.load(path, model, tokenizer).ids is None
    # A document shorter than the final window has no memory: nothing to read, nothing to recompute.
    short = DocumentMemory.build(model, tokenizer, "river stone", template="none")
    assert short.cache.memory_length == 0
    reloaded = DocumentMemory.load(short.save(tmp_path / "short"), model, tokenizer, recompute_layers=1)
    assert reloaded.cache.memory_length == 0
    assert torch.equal(reloaded.next_logits, short.next_logits)


def test_a_failed_save_leaves_nothing_half_written(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    memory = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    broken = DocumentMemory.build(model, tokenizer, DOCUMENT, template="none")
    broken.cache.layers[3].memory = _FailingMemory()  # the last file: local and layer 1 are already written
    with pytest.raises(RuntimeError, match="disk gone"):
        broken.save(tmp_path / "mem")
    assert list(tmp_path.iterdir()) == []
    first = memory.save(tmp_path / "mem")
    manifest = (first / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="disk gone"):
        broken.save(tmp_path / "mem")
    assert (first / "manifest.json").read_text() == manifest  # the earlier memory is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]
    DocumentMemory.load(first, model, tokenizer)
    memory.save(tmp_path / "mem")  # replacing a saved memory works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a saved document memory"):
        memory.save(tmp_path / "plain")


@pytest.mark.parametrize("stop", [(), ("\n",), ("key is", "zz")])
def test_streamed_answer_text_is_the_whole_decode_piece_by_piece(stop) -> None:
    """The answer streamer's pieces (tokenizers' incremental decoder) join to what decoding the ids at once gives, cut
    at the first stop string, with nothing shown that a later piece takes back; `stopped` agrees with the text."""
    tokenizer = load_tokenizer(SHIPPED_MODEL)
    text = "The pass key is 71432.\nÜnïcödé 日本語 🎉 text, then\n\nmore   spaces and key is here"
    specials = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(0)
    random_ids = [i for i in torch.randint(0, len(tokenizer), (300,), generator=g).tolist() if i not in specials]
    for ids in (tokenizer.encode(text, add_special_tokens=False), random_ids):
        pieces: list[str] = []
        streamer = document_memory._AnswerText(tokenizer, stop, pieces.append)
        assert streamer._stream is not None  # the incremental path is the one tested
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min([whole.find(s) for s in stop if s in whole] or [len(whole)])
        for k, i in enumerate(ids):
            streamer.add([i])
            shown = "".join(pieces)
            assert whole.startswith(shown) and len(shown) <= cut
            so_far = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
            assert streamer.stopped() == any(s in so_far for s in stop)
        streamer.end()
        assert "".join(pieces) == whole[:cut]
