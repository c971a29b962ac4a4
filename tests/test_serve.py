"""`longllama serve` as a client sees it: a real server (the shipped model, CPU) on a loopback port in a subprocess,
driven by the official openai client and by httpx. A 16k-token pass key is answered from a memory read once, the
memory survives a restart and a server killed mid-upload; bad input gets OpenAI-format errors and the server keeps
serving; a crowd of clients is answered or refused with 429, none lost; a client that leaves mid-stream frees the
worker at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from longllama.cli import SHIPPED_MODEL  # noqa: E402
from longllama.evals import passkey  # noqa: E402
from longllama.tokenizer import load_tokenizer  # noqa: E402

KEY = "test-key-0123456789"
QUESTION = passkey.QUESTION_LINE  # "What is the pass key? The pass key is"
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`longllama serve` in a subprocess; `url` once /health answers."""

    def __init__(self, memory_dir: Path, *extra: str, key_in_environment: bool = False):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.setdefault("OMP_NUM_THREADS", "1")
        args = ["--port", str(self.port), "--memory-dir", str(memory_dir), "--device", "cpu"]
        if key_in_environment:
            env["LONGLLAMA_API_KEY"] = KEY
        else:
            args += ["--api-key", KEY]
        self.log = open(memory_dir.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "longllama.cli", "serve", *args, *extra], env=env, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not start: " + Path(self.log.name).read_text())

    def client(self, **options):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **options)

    def http(self, method: str, path: str, **options) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **options.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **options)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def haystack(tokenizer) -> tuple[str, int]:
    """A 16k-token pass-key document (the evaluation's prompt without its question line) and its key."""
    prompt, key = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 16384, seed=0), 3)
    assert prompt.endswith("\n" + QUESTION)
    return prompt[: -len(QUESTION)], key


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "memories"


@pytest.fixture(scope="module")
def server(memory_dir, bf16_cpu_attention):  # the shipped model answers in bf16
    running = Server(memory_dir, "--queue", "2", "--max-tokens", "1024", "--max-prompt-tokens", "4096")
    yield running
    running.stop()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_completions_and_chat_with_the_openai_client(server, tokenizer):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["small"]
    prompt = "Once upon a time there was a"
    out = client.completions.create(model="small", prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(ids) + 1  # BOS, then the prompt
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == len(ids) + 13
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    # The same prompt as token ids (BOS included) is the same request.
    again = client.completions.create(model="small", prompt=[1, *ids], max_tokens=12, temperature=0)
    assert again.choices[0].text == out.choices[0].text

    pieces, usage = [], None
    stream = client.completions.create(
        model="small", prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        pieces.extend(choice.text for choice in chunk.choices)
    assert "".join(pieces) == out.choices[0].text and usage.completion_tokens == 12

    # A stop string ends the text before it; with a seed, sampling repeats.
    first_word = out.choices[0].text.strip().split()[0]
    stopped = client.completions.create(model="small", prompt=prompt, max_tokens=12, temperature=0, stop=[first_word])
    assert first_word not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="small", prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=5)
        for _ in range(2)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="small", messages=messages, max_completion_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    assert chat.usage.prompt_tokens > len(tokenizer.encode("Name a colour.", add_special_tokens=False))
    deltas, usage = [], None
    for chunk in client.chat.completions.create(
        model="small",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        deltas.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(deltas) == chat.choices[0].message.content
    assert usage.prompt_tokens == chat.usage.prompt_tokens and usage.completion_tokens == chat.usage.completion_tokens


def test_raw_stream_is_openai_server_sent_events(server):
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    response = server.http("POST", "/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[-1]["choices"][0]["finish_reason"]


def test_a_pass_key_answered_from_a_memory(server, haystack, tokenizer):
    text, key = haystack
    created = server.http("POST", "/v1/memories", json={"text": text, "template": "none"})
    assert created.status_code == 200, created.text
    memory = created.json()
    assert memory["object"] == "memory" and memory["id"].startswith("mem-") and len(memory["id"]) > 30
    assert memory["tokens"] == 1 + len(tokenizer.encode(text, add_special_tokens=False))  # BOS + the document
    assert server.http("GET", f"/v1/memories/{memory['id']}").json()["tokens"] == memory["tokens"]
    assert memory["id"] in [m["id"] for m in server.http("GET", "/v1/memories").json()["data"]]

    client = server.client()
    answer = client.completions.create(
        model="small", prompt=QUESTION, max_tokens=6, temperature=0, extra_body={"memory": memory["id"]}
    )
    assert answer.choices[0].text.strip().startswith(str(key)), (key, answer.choices[0].text)
    question_tokens = len(tokenizer.encode(QUESTION, add_special_tokens=False))
    assert answer.usage.prompt_tokens_details.cached_tokens == memory["tokens"]
    assert answer.usage.prompt_tokens == memory["tokens"] + question_tokens

    # An uploaded file is the same document: the same tokens, the same answer.
    upload = server.http(
        "POST", "/v1/memories", files={"file": ("haystack.txt", text.encode())}, data={"template": "none"}
    )
    assert upload.status_code == 200 and upload.json()["tokens"] == memory["tokens"]
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="small",
            prompt=QUESTION,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"memory": upload.json()["id"]},
        )
        if chunk.choices
    )
    assert streamed == answer.choices[0].text
    deleted = server.http("DELETE", f"/v1/memories/{upload.json()['id']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    _error(server.http("GET", f"/v1/memories/{upload.json()['id']}"), 404)
    server.passkey = (memory["id"], answer.choices[0].text)


def test_reading_a_memory_streams_its_progress(server, tokenizer):
    text, _ = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 2000, seed=2), 1)
    response = server.http("POST", "/v1/memories?stream=true", json={"text": text, "template": "none"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [event for event in response.text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    data = [json.loads(event[6:]) for event in events[:-1]]
    progress, memory = data[:-1], data[-1]
    total = 1 + len(tokenizer.encode(text, add_special_tokens=False))
    assert len(progress) >= 2 and all(p["object"] == "memory.progress" and p["total"] == total for p in progress)
    done = [p["tokens"] for p in progress]
    assert done == sorted(done) and done[-1] == total
    assert memory["object"] == "memory" and memory["tokens"] == total
    assert server.http("DELETE", f"/v1/memories/{memory['id']}").status_code == 200
    # A document that cannot be read is an error status, not an event of a started stream.
    _error(server.http("POST", "/v1/memories?stream=true", json={"text": "x", "template": "no-such"}), 400)


def test_a_repeated_long_prompt_reuses_the_memory_of_its_whole_windows(server, tokenizer):
    import torch

    from longllama.cli import LoadOptions, load_model

    model = load_model(SHIPPED_MODEL, LoadOptions(device="cpu"))
    window, local = model.config.context_window, model.config.last_context_length
    first, _ = passkey.passkey_prompt(passkey.n_garbage_for_tokens(tokenizer, 2200, seed=1), 11)
    second = first.replace(QUESTION, "Answer with digits. " + QUESTION)
    client = server.client()
    answers = []
    for prompt in (first, first, second):
        out = client.completions.create(model="small", prompt=prompt, max_tokens=6, temperature=0)
        answers.append((out.choices[0].text, out.usage))
    ids = {text: [1, *tokenizer.encode(text, add_special_tokens=False)] for text in (first, second)}
    for text, (answer, usage) in zip((first, first, second), answers):
        # The reference: the whole prompt read at once in this process.
        prompt_ids = torch.tensor([ids[text]])
        with torch.no_grad():
            expected = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=6)
        assert answer == tokenizer.decode(expected[0, prompt_ids.shape[1] :], skip_special_tokens=True)
        assert usage.prompt_tokens == len(ids[text])
    windows = lambda n: (n - local) // window  # noqa: E731  whole memory windows before the final one
    assert answers[0][1].prompt_tokens_details.cached_tokens == 0
    assert answers[1][1].prompt_tokens_details.cached_tokens == windows(len(ids[first])) * window > 0
    common = next(i for i, (a, b) in enumerate(zip(ids[first], ids[second])) if a != b)
    shared = min(common // window, windows(len(ids[second])))
    assert shared > 0 and answers[2][1].prompt_tokens_details.cached_tokens == shared * window


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server):
    post = lambda path, **kw: server.http("POST", path, **kw)  # noqa: E731
    _error(post("/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"}), 400)
    _error(post("/v1/completions", content=b'["not", "an", "object"]'), 400)
    assert _error(post("/v1/completions", json={"prompt": "x", "max_tokens": "5"}), 400)["param"] == "max_tokens"
    assert _error(post("/v1/completions", json={"prompt": 5}), 400)["param"].startswith("prompt")
    assert _error(post("/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert _error(post("/v1/completions", json={"prompt": "x", "max_tokens": 10**9}), 400)["param"] == "max_tokens"
    assert _error(post("/v1/completions", json={"prompt": "x", "temperature": 5}), 400)["param"] == "temperature"
    assert _error(post("/v1/completions", json={"prompt": "x", "n": 2}), 400)["param"] == "n"
    assert _error(post("/v1/completions", json={"prompt": [1, 99999]}), 400)["param"] == "prompt"
    assert _error(post("/v1/completions", json={"prompt": [1, -3]}), 400)["param"] == "prompt"
    assert _error(post("/v1/completions", json={"prompt": "x", "logprobs": 2}), 400)["param"] == "logprobs"
    assert _error(post("/v1/completions", json={"prompt": "word " * 5000}), 400)["code"] == "context_length_exceeded"
    assert _error(post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)["code"] == "model_not_found"
    unknown = "mem-" + "A" * 32
    assert _error(post("/v1/completions", json={"prompt": "x", "memory": unknown}), 404)["param"] == "memory"
    _error(post("/v1/completions", json={"prompt": "x", "memory": "../../etc"}), 404)
    _error(server.http("GET", "/v1/memories/..%2F..%2Fetc"), 404)
    _error(server.http("DELETE", f"/v1/memories/{unknown}"), 404)
    _error(post("/v1/chat/completions", json={"messages": "hi"}), 400)
    _error(post("/v1/chat/completions", json={"messages": []}), 400)
    _error(post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]}), 400)
    _error(post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}), 400)
    _error(post("/v1/memories", json={"text": ""}), 400)
    _error(post("/v1/memories", files={"file": ("x.bin", b"\xff\xfe\x00binary")}), 400)
    _error(post("/v1/memories", json={"text": "some text", "template": "no-such-template"}), 400)
    assert _error(post("/v1/completions", content=b"x" * (10 << 20)), 413)["code"] == "request_too_large"
    _error(server.http("GET", "/v1/nothing-here"), 404)
    # The API key: missing, wrong, or another scheme.
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        assert _error(server.http("GET", "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()

    ok = post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_many_clients_are_answered_or_refused_and_none_is_lost(server):
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            for i in range(4):
                body = {"prompt": f"Count {i}:", "max_tokens": 2, "temperature": 0, "stream": i % 2 == 1}
                response = http.post(f"{server.url}/v1/completions", json=body)
                retry = response.headers.get("retry-after")
                if response.status_code == 200 and body["stream"]:
                    assert response.text.endswith("data: [DONE]\n\n")
                if response.status_code == 429:
                    assert response.json()["error"]["code"] == "rate_limit_exceeded"
                with lock:
                    results.append((response.status_code, retry))

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert len(results) == 128
    statuses = {status for status, _ in results}
    assert statuses == {200, 429}, statuses  # 32 clients at once overflow a queue of 2
    assert all(retry is not None for status, retry in results if status == 429)


@pytest.fixture(scope="module")
def fp32_server(tmp_path_factory):
    """The shipped model in fp32: rows read and decoded together agree with each alone to ~1e-6, so greedy answers
    are the same text (in bf16 the batch's products round differently and near-ties can flip)."""
    running = Server(tmp_path_factory.mktemp("serve-fp32") / "memories", "--queue", "2", "--dtype", "float32")
    yield running
    running.stop()


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(fp32_server):
    server = fp32_server
    prompts = [f"Story {i}: once upon a time" + " there was" * i for i in range(4)]
    body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    alone = [server.http("POST", "/v1/completions", json={**body, "prompt": p}).json() for p in prompts]
    assert server.http("GET", "/health").json()["decoding"] == 0
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        while (
            response := server.http("POST", "/v1/completions", json={**body, "prompt": prompts[i]})
        ).status_code == 429:
            time.sleep(0.05)  # the queue (2 here) is full: come back, as Retry-After says
        results[i] = response.json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i in range(4):  # greedy: each answer is the one it got alone (the same maths, row by row, in fp32)
        assert results[i]["choices"][0]["text"] == alone[i]["choices"][0]["text"], i
    health = server.http("GET", "/health").json()
    assert health["most_decoding"] >= 2 and health["max_batch"] == 8, health  # decoded together, not in turn
    engine = health["engine"]  # counters since the start: at least these four prompts and their tokens' steps
    assert engine["prompts"] >= 4 and engine["steps"] >= 7 and engine["layouts"] >= 1 and engine["captures"] == 0


def test_a_client_leaving_mid_stream_frees_the_worker(server):
    body = {"prompt": "Once upon a time", "max_tokens": 1024, "temperature": 0, "ignore_eos": True, "stream": True}
    # The time per token here, from a short run: the 1024 tokens would take about 16 times as long.
    start = time.monotonic()
    short = server.http("POST", "/v1/completions", json={**body, "max_tokens": 64, "stream": False})
    full_seconds = (time.monotonic() - start) * 1024 / 64
    assert short.json()["usage"]["completion_tokens"] == 64  # EOS suppressed: every token generated
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        began = time.monotonic()
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            pieces = 0
            for line in lines:  # text comes while the generation runs, not all at its end
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    pieces += 1
                    if pieces == 2:
                        break
            assert time.monotonic() - began < full_seconds / 3, (time.monotonic() - began, full_seconds)
        # leaving the block closes the connection mid-stream
    start = time.monotonic()
    after = server.http("POST", "/v1/completions", json={"prompt": "Next", "max_tokens": 1, "temperature": 0})
    waited = time.monotonic() - start
    assert after.status_code == 200
    assert waited < max(full_seconds / 3, 1.0), (waited, full_seconds)  # not the rest of the long generation
    assert server.http("GET", "/health").json()["decoding"] == 0  # the abandoned generation left the batch


def test_memories_survive_a_restart_and_a_kill_mid_upload(server, memory_dir, haystack):
    if not hasattr(server, "passkey"):  # run alone: the pass-key memory of the test before
        test_a_pass_key_answered_from_a_memory(server, haystack, load_tokenizer(SHIPPED_MODEL))
    memory_id, answer = server.passkey
    # A big upload in flight when the server is killed (SIGKILL).
    big = (haystack[0] + "\n") * 6

    def upload() -> None:
        try:
            server.http("POST", "/v1/memories", json={"text": big, "template": "none"})
        except httpx.TransportError:
            pass

    uploading = threading.Thread(target=upload)
    uploading.start()
    time.sleep(1.5)
    server.stop(signal.SIGKILL)
    uploading.join(timeout=30)
    # What a kill during DocumentMemory.save leaves: a temporary folder, and (simulated) a memory whose tensor file
    # was cut short after its manifest was written.
    leftover = memory_dir / f".mem-{'b' * 32}.1234abcd.tmp"
    leftover.mkdir()
    (leftover / "local.safetensors").write_bytes(b"\x00" * 100)
    damaged = memory_dir / ("mem-" + "C" * 32)
    shutil.copytree(memory_dir / memory_id, damaged)
    tensor = next(p for p in damaged.iterdir() if p.suffix == ".safetensors")
    tensor.write_bytes(tensor.read_bytes()[:-10])
    # ... and one whose bytes changed in place (same size): a start checks sizes only, its load the checksums.
    flipped = memory_dir / ("mem-" + "D" * 32)
    shutil.copytree(memory_dir / memory_id, flipped)
    tensor = max(flipped.glob("memory.layer*.safetensors"))  # the upper memory layer's: read, never recomputed
    data = bytearray(tensor.read_bytes())
    data[-1] ^= 0xFF
    tensor.write_bytes(bytes(data))

    # A budget of one byte: only the memory used last stays loaded, the other is read from disk again (its lower
    # memory layer computed from its tokens meanwhile).
    restarted = Server(
        memory_dir, "--queue", "2", "--memory-budget", "1", "--memory-recompute-layers", "1", key_in_environment=True
    )
    try:
        listed = {m["id"]: m for m in restarted.http("GET", "/v1/memories").json()["data"]}
        # The killed upload is not listed (on a machine fast enough to finish it first, it would be, complete).
        assert memory_id in listed and damaged.name not in listed and flipped.name in listed, listed
        assert len(listed) <= 3, listed
        assert not any(m["loaded"] for m in listed.values())
        _error(restarted.http("GET", "/v1/memories", headers={"Authorization": "Bearer wrong"}), 401)
        assert not leftover.exists()
        client = restarted.client()
        ask = lambda memory: client.completions.create(  # noqa: E731
            model="small", prompt=QUESTION, max_tokens=6, temperature=0, extra_body={"memory": memory}
        )
        corrupt = restarted.http(
            "POST", "/v1/completions", json={"prompt": QUESTION, "max_tokens": 2, "memory": flipped.name}
        )
        assert "sha256" in _error(corrupt, 500)["message"]
        again = ask(memory_id)
        assert again.choices[0].text == answer
        info = restarted.http("GET", f"/v1/memories/{memory_id}").json()
        assert again.usage.prompt_tokens_details.cached_tokens == info["tokens"] and info["loaded"]
        other = restarted.http("POST", "/v1/memories", json={"text": "The pass key is 123.", "template": "none"})
        assert other.status_code == 200 and other.json()["loaded"]
        assert not restarted.http("GET", f"/v1/memories/{memory_id}").json()["loaded"]  # unloaded: over budget
        assert ask(memory_id).choices[0].text == answer  # read back from disk
        assert not restarted.http("GET", f"/v1/memories/{other.json()['id']}").json()["loaded"]
    finally:
        restarted.stop()


def test_serve_refuses_bad_options_in_one_line(tmp_path, capsys):
    from conftest import assert_one_line_errors

    from longllama.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["serve", "--model", str(SHIPPED_MODEL), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_errors(
        run,
        {
            "memory dir is a file": (["--memory-dir", str(a_file)], "is a file"),
            "unknown template": (["--template", "nope"], "not one of"),
            "queue of zero": (["--queue", "0"], "--queue"),
            "negative port": (["--port", "-1"], "--port"),
            "recompute too many": (["--memory-recompute-layers", "3"], "2 memory layers"),
        },
    )
