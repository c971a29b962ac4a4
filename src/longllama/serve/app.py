"""The OpenAI-compatible web app (docs/serve.md): completions and chat completions, streamed or not, over plain
prompts or over document memories read once.

Request handlers only check input and queue jobs: all model work runs on the ModelWorker thread; a job's text comes
back through an asyncio queue, as server-sent events or as one answer."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from longllama.batch import BatchGenerator
from longllama.chat_format import ChatFormat, chat_format
from longllama.errors import CheckpointError, InputError
from longllama.serve.config import ServeConfig
from longllama.serve.memories import MemoryStore, valid_id
from longllama.serve.prefix import PrefixCache
from longllama.serve.schemas import UNSUPPORTED, ChatBody, CompletionBody, MemoryBody
from longllama.serve.worker import Generated, ModelWorker, QueueFull, start_text

logger = logging.getLogger(__name__)

_OPEN_PATHS = ("/health", "/")  # answered without the API key (the page asks for the key itself)
_MEMORY_UPLOAD = "/v1/memories"


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def _error_of(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InputError):
        return APIError(400, _one_line(exc))
    if isinstance(exc, CheckpointError):
        return APIError(500, f"a memory could not be read: {_one_line(exc)}", type="server_error")
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}): see the server log", type="server_error")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _Guard:
    """ASGI middleware in front of every route: the API key (constant-time comparison), then the body size limit
    (Content-Length, then the bytes actually received), before any handler reads the request."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.key = None if config.api_key is None else config.api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.key is not None and path not in _OPEN_PATHS and not self._authorized(scope):
            error = APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's --api-key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await error.response()(scope, receive, send)
        limit = self.config.max_upload_bytes if path == _MEMORY_UPLOAD else self.config.max_body_bytes
        too_big = APIError(
            413,
            f"the request body exceeds this server's limit of {limit} bytes: send less"
            + (" (memory uploads: --max-upload-bytes)" if path == _MEMORY_UPLOAD else " (--max-body-bytes)"),
            code="request_too_large",
        )
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_big.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_big.response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: list[dict] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}): send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    for field, defaults in UNSUPPORTED.items():
        if field in data and data[field] not in defaults:
            raise APIError(400, f"'{field}' is not implemented by this server: drop it", param=field)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"'{param}': {first['msg']}", param=param, code="invalid_value") from None


def _usage(prompt_tokens: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class _Outbox:
    """Events from the model's thread to the requests' queues on the event loop. One wake-up of the loop carries
    every event that came since the last: each wake-up has the loop's thread take the interpreter from the model's
    thread, and one per token and stream would grow with the number of streams. Text pieces (`wake=False`) wait for
    `flush()`, which the model's thread calls while the GPU computes a step (BatchGenerator's on_wait) and before it
    idles: the loop then sends them while the model's thread waits anyway, not while it launches the next step (on
    an H100 the server's decoding steps ran 14 % slower than the engine's alone)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []
        self._scheduled = False  # a delivery is queued on the loop

    def put(self, events: asyncio.Queue, event: tuple, *, wake: bool = True) -> None:
        with self._lock:
            self._items.append((events, event))
            wake = wake and not self._scheduled
            self._scheduled |= wake
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def flush(self) -> None:
        """Wake the loop for the events waiting, if any (and no wake-up is queued already)."""
        with self._lock:
            wake = bool(self._items) and not self._scheduled
            self._scheduled |= wake
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for events, event in items:
            events.put_nowait(event)


class _Server:
    """The state behind the routes: model, tokenizer, worker, memory store and the chat formats built so far."""

    def __init__(self, model, tokenizer, config: ServeConfig, *, model_thread: bool = True):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._temp = None
        folder = config.memory_dir
        if folder is None:
            self._temp = tempfile.TemporaryDirectory(prefix="longllama-memories-")
            folder = self._temp.name
        self.store = MemoryStore(
            folder, model, tokenizer, budget=config.memory_budget, recompute_layers=config.memory_recompute_layers
        )
        self._outbox: _Outbox | None = None  # before the worker, whose thread flushes it
        self.engine = BatchGenerator(model, max_rows=config.max_batch, on_wait=self._flush)
        self.worker = ModelWorker(
            config.queue,
            self.engine,
            own_thread=model_thread,
            on_idle=self._flush,
            gather=config.batch_wait_ms / 1000,
        )
        self.prefixes = PrefixCache(model, config.prefix_cache_bytes)
        self._formats: dict[tuple[str | None, str | None], ChatFormat] = {}
        self.created = int(time.time())
        chat_format(tokenizer, config.template)  # a bad --template fails at start

    def _flush(self) -> None:  # the model's thread, between its launches (see _Outbox)
        if self._outbox is not None:
            self._outbox.flush()

    def _outbox_of(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        return self._outbox

    def close(self) -> None:
        self.worker.close()
        if self._temp is not None:
            self._temp.cleanup()

    # -- building prompts (worker thread) ------------------------------------------------------------------------
    def _format(self, template: str | None, system: str | None) -> ChatFormat:
        key = (template, system)
        if key not in self._formats:
            if len(self._formats) >= 64:  # system texts come from requests: keep the cache bounded
                self._formats.clear()
            self._formats[key] = chat_format(self.tokenizer, template, system=system)
        return self._formats[key]

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = int(self.model.config.vocab_size)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})", param=param)
        if not ids:
            raise APIError(400, "the prompt is empty: send some text or token ids", param=param)
        if len(ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, this server takes at most {self.config.max_prompt_tokens} "
                "(--max-prompt-tokens): shorten it, or read the document into a memory (POST /v1/memories)",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def completion_prompt(self, body: CompletionBody, with_memory: bool) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: send a string or one list of token ids", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            return self._check_ids([int(i) for i in prompt], "prompt")
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False, verbose=False)) if prompt else []
        if not with_memory:
            ids.insert(0, self.tokenizer.bos_token_id)  # a memory's document already follows BOS
        return self._check_ids(ids, "prompt")

    def chat_prompt(self, body: ChatBody, memory) -> tuple[list[int], tuple[str, ...]]:
        messages = [(m.role, m.text()) for m in body.messages]
        systems = []
        while messages and messages[0][0] in ("system", "developer"):
            systems.append(messages.pop(0)[1])
        system = "\n\n".join(systems) if systems else None
        if any(role in ("system", "developer") for role, _ in messages):
            raise APIError(400, "system messages go before the conversation's first user message", param="messages")
        roles = [role for role, _ in messages]
        expected = ["user", "assistant"] * (len(roles) // 2 + 1)
        if not roles or roles != expected[: len(roles)] or roles[-1] != "user":
            raise APIError(
                400,
                "messages must alternate user and assistant, starting and ending with a user message",
                param="messages",
            )
        if memory is not None:
            fmt, ids = memory.format, []
            if system is not None and system != (fmt.system or ""):
                raise APIError(
                    400,
                    "this memory was built with its own system text: drop the system message, or create the memory "
                    "with that 'system'",
                    param="messages",
                )
        else:
            fmt = self._format(self.config.template, system)
            ids = list(fmt.prefix_ids)
        for i, (role, text) in enumerate(messages):
            if role == "user":
                ids += fmt.turn_ids(text, first=i == 0)
            else:
                ids += list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False)) + list(fmt.end_ids)
        return self._check_ids(ids, "messages"), fmt.stop_strings

    # -- running requests ----------------------------------------------------------------------------------------
    def max_tokens(self, given: int | None, default: int, param: str) -> int:
        value = default if given is None else given
        if value < 1 or value > self.config.max_tokens:
            raise APIError(
                400,
                f"'{param}' is {value}: pass 1 to {self.config.max_tokens} (the server's --max-tokens)",
                param=param,
                code="invalid_value",
            )
        return value

    def check_common(self, body) -> None:
        if body.model is not None and body.model != self.config.model_id:
            raise APIError(
                404,
                f"model '{body.model}' is not served here: use '{self.config.model_id}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n}: this server returns one choice per request; pass n=1", param="n")
        if body.memory is not None and self.store.info(body.memory) is None:
            raise APIError(
                404,
                f"no memory with id '{body.memory}': list them with GET /v1/memories",
                param="memory",
                code="memory_not_found",
            )

    async def run(
        self,
        request: Request,
        body,
        prepare: Callable[[Any], tuple[list[int], tuple[str, ...]]],
        max_tokens: int,
        answer: Callable[[Generated, dict[str, Any]], dict[str, Any]],
        chunk: Callable[[str | None, str | None], dict[str, Any]],
    ) -> Response:
        """Queue the request's job; answer it whole, or as server-sent events when it asks to stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stops):
            raise APIError(400, "'stop' holds an empty string: drop it", param="stop")

        outbox = self._outbox_of(loop)

        def emit(*event) -> None:
            outbox.put(events, event)

        def job() -> None:
            try:
                memory = None
                if body.memory is not None:
                    memory = self.store.get(body.memory)
                    if memory is None:  # deleted while this request waited
                        raise APIError(404, f"no memory with id '{body.memory}'", param="memory")
                ids, format_stops = prepare(memory)
                if memory is not None:
                    cache, lcl, cached = memory.cache, memory.last_context_length, memory.tokens
                    prompt_tokens = len(ids) + memory.tokens
                else:
                    cache, read, cached = self.prefixes.read(ids)
                    lcl, prompt_tokens, ids = None, len(ids), ids[read:]
                emit("ready", prompt_tokens, cached)
                start_text(
                    self.engine,
                    self.tokenizer,
                    ids,
                    cache=cache,
                    last_context_length=lcl,
                    max_tokens=max_tokens,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    stop=tuple(dict.fromkeys(format_stops + stops)),
                    seed=body.seed,
                    cancelled=cancelled,
                    ignore_eos=body.ignore_eos,
                    on_text=lambda text: outbox.put(events, ("text", text), wake=False),
                    on_done=lambda result: emit("done", result),
                    on_error=lambda exc: emit("error", exc),
                )
            except BaseException as exc:
                emit("error", exc)

        try:
            self.worker.submit(job, cancelled, generation=True)
        except QueueFull:
            raise APIError(
                429,
                f"the server is busy ({self.config.queue} requests waiting): retry in a moment",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        try:
            event = await self._next(events, request)
        except BaseException:
            cancelled.set()
            raise
        if event[0] == "error":
            raise _error_of(event[1])
        _, prompt_tokens, cached = event
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self._events(events, cancelled, chunk, usage, prompt_tokens, cached),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while (event := await self._next(events, request))[0] == "text":
                pass
        except BaseException:
            cancelled.set()
            raise
        if event[0] == "error":
            raise _error_of(event[1])
        result = event[1]
        return JSONResponse(answer(result, _usage(prompt_tokens, cached, result.completion_tokens)))

    @staticmethod
    async def _next(events: asyncio.Queue, request: Request) -> tuple:
        """The job's next event; a client that has gone away stops the wait (and, through the caller, the job)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone from None

    @staticmethod
    async def _events(
        events: asyncio.Queue, cancelled: threading.Event, chunk, usage: bool, prompt_tokens: int, cached: int
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            first = chunk(None, None)
            if usage:
                first["usage"] = None
            yield _sse(first)
            held = None  # an event taken while joining text pieces, handled next
            while True:
                kind, *rest = held or await events.get()
                held = None
                if kind == "text":
                    text = rest[0]
                    while not events.empty():  # pieces that came while the last chunk was sent: one chunk
                        event = events.get_nowait()
                        if event[0] != "text":
                            held = event
                            break
                        text += event[1]
                    piece = chunk(text, None)
                    if usage:
                        piece["usage"] = None
                    yield _sse(piece)
                    continue
                done = True
                if kind == "error":  # the status line is sent already: the error goes in the stream
                    yield _sse(_error_of(rest[0]).body())
                    break
                result: Generated = rest[0]
                last = chunk(None, result.finish_reason)
                if usage:
                    last["usage"] = None
                yield _sse(last)
                if usage:
                    final = chunk(None, None)
                    final["choices"] = []
                    final["usage"] = _usage(prompt_tokens, cached, result.completion_tokens)
                    yield _sse(final)
                break
            yield _sse("[DONE]")
        finally:
            if not done:  # the client went away: the worker stops at its next token
                cancelled.set()


def create_app(model, tokenizer, config: ServeConfig | None = None, *, model_thread: bool = True) -> FastAPI:
    """The FastAPI app serving `model` (a LongLlamaForCausalLM) and `tokenizer` with `config`. The model's work
    runs on a thread of its own, or with `model_thread=False` on the thread that calls run_server(app)."""
    config = config or ServeConfig()
    server = _Server(model, tokenizer, config, model_thread=model_thread)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="longllama serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, type=kind).response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the connection is closed

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_of(exc).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = server.engine  # plain reads of counters the worker keeps
        return {
            "status": "ok",
            "model": config.model_id,
            "decoding": engine.active,
            "most_decoding": engine.most_active,
            "max_batch": engine.max_rows,
            "engine": engine.stats(),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        from longllama.serve.page import PAGE

        return HTMLResponse(PAGE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": config.model_id, "object": "model", "created": server.created, "owned_by": "longllama"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str) -> dict[str, Any]:
        if model_id != config.model_id:
            raise APIError(404, f"model '{model_id}' is not served here", param="model", code="model_not_found")
        return {"id": config.model_id, "object": "model", "created": server.created, "owned_by": "longllama"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionBody = _parse(CompletionBody, await request.body())
        server.check_common(body)
        max_tokens = server.max_tokens(body.max_tokens, 16, "max_tokens")
        ident, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def head() -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": config.model_id}

        def answer(result: Generated, usage: dict[str, Any]) -> dict[str, Any]:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
            return {**head(), "choices": [choice], "usage": usage}

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {**head(), "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        def prepare(memory) -> tuple[list[int], tuple[str, ...]]:
            return server.completion_prompt(body, memory is not None), ()

        return await server.run(request, body, prepare, max_tokens, answer, chunk)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatBody = _parse(ChatBody, await request.body())
        server.check_common(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "pass max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        given, param = (
            (body.max_completion_tokens, "max_completion_tokens")
            if body.max_completion_tokens is not None
            else (body.max_tokens, "max_tokens")
        )
        max_tokens = server.max_tokens(given, min(config.default_chat_tokens, config.max_tokens), param)
        ident, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def head(kind: str) -> dict[str, Any]:
            return {"id": ident, "object": kind, "created": created, "model": config.model_id}

        def answer(result: Generated, usage: dict[str, Any]) -> dict[str, Any]:
            message = {"role": "assistant", "content": result.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
            return {**head("chat.completion"), "choices": [choice], "usage": usage}

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            if text is None and finish is None:
                delta = {"role": "assistant", "content": ""}
            else:
                delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head("chat.completion.chunk"), "choices": [choice]}

        def prepare(memory) -> tuple[list[int], tuple[str, ...]]:
            return server.chat_prompt(body, memory)

        return await server.run(request, body, prepare, max_tokens, answer, chunk)

    @app.post("/v1/memories")
    async def create_memory(request: Request) -> Response:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            text, template, system = await _uploaded(request)
        else:
            body: MemoryBody = _parse(MemoryBody, await request.body())
            text, template, system = body.text, body.template, body.system
        if not text.strip():
            raise APIError(400, "the document is empty: send some text", param="text")
        template = config.template if template is None else template
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stream = request.query_params.get("stream", "").lower() in ("1", "true")

        def progress(done: int, total: int) -> None:
            if stream:
                loop.call_soon_threadsafe(events.put_nowait, ("progress", done, total))

        def job() -> None:
            try:
                info = server.store.create(text, template=template, system=system, progress=progress)
                loop.call_soon_threadsafe(events.put_nowait, ("done", info))
            except BaseException as exc:
                loop.call_soon_threadsafe(events.put_nowait, ("error", exc))

        try:
            server.worker.submit(job)
        except QueueFull:
            raise APIError(
                429,
                "the server is busy: retry in a moment",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        first = await events.get()  # a document that cannot be read is an error status, not a stream event
        if first[0] == "error":
            raise _error_of(first[1])
        if not stream:
            return JSONResponse(first[1].as_json(loaded=server.store.is_loaded(first[1].id)))

        async def reading() -> AsyncIterator[bytes]:
            event = first
            while True:
                if event[0] == "progress":
                    yield _sse({"object": "memory.progress", "tokens": event[1], "total": event[2]})
                elif event[0] == "error":
                    yield _sse(_error_of(event[1]).body())
                    break
                else:
                    yield _sse(event[1].as_json(loaded=server.store.is_loaded(event[1].id)))
                    break
                event = await events.get()
            yield _sse("[DONE]")

        return StreamingResponse(reading(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/memories")
    async def list_memories() -> dict[str, Any]:
        infos = server.store.list()
        return {"object": "list", "data": [info.as_json(loaded=server.store.is_loaded(info.id)) for info in infos]}

    @app.get("/v1/memories/{memory_id}")
    async def get_memory(memory_id: str) -> dict[str, Any]:
        info = server.store.info(memory_id)
        if info is None:
            raise APIError(404, f"no memory with id '{memory_id}'", param="memory_id", code="memory_not_found")
        return info.as_json(loaded=server.store.is_loaded(memory_id))

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: str) -> dict[str, Any]:
        if not valid_id(memory_id) or server.store.info(memory_id) is None:
            raise APIError(404, f"no memory with id '{memory_id}'", param="memory_id", code="memory_not_found")
        try:
            future = server.worker.submit(lambda: server.store.delete(memory_id))
        except QueueFull:
            raise APIError(
                429, "the server is busy: retry in a moment", type="rate_limit_error", headers={"Retry-After": "1"}
            ) from None
        await asyncio.wrap_future(future)
        return {"id": memory_id, "object": "memory.deleted", "deleted": True}

    app.add_middleware(_Guard, config=config)
    return app


async def _uploaded(request: Request) -> tuple[str, str | None, str | None]:
    """(text, template, system) of a multipart upload: the 'file' part's bytes as UTF-8 (never a path)."""
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:
        raise APIError(400, f"cannot read the multipart form ({_one_line(exc)})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "the form has no file: send the document as the 'file' part", param="file")
    data = await upload.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"the file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8", param="file"
        ) from None
    fields = []
    for name in ("template", "system"):
        value = form.get(name)
        fields.append(value if isinstance(value, str) and value else None)
    return text, fields[0], fields[1]


def model_id_of(folder: str | Path) -> str:
    return Path(folder).resolve().name or "longllama"


def run_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, graceful_seconds: int = 5) -> None:
    """Serve `app`, made by create_app(..., model_thread=False): uvicorn on a thread of its own, the model's work on
    the calling thread, which should be the one that loaded the model (ModelWorker says why). Returns when the
    server stops: Ctrl-C, or `app.state.http.should_exit = True`. A server that cannot start (the port is taken)
    raises a RuntimeError naming the address."""
    import uvicorn

    worker: ModelWorker = app.state.server.worker
    http = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_seconds)
    )
    app.state.http = http

    def serve() -> None:
        try:
            http.run()
        except SystemExit:  # uvicorn's exit when it cannot start; it has logged why, and the caller raises
            pass
        finally:  # the app's shutdown closes the worker too; this covers a server that never started
            worker.close()

    def stop(signum, frame) -> None:  # Ctrl-C or SIGTERM: a graceful stop, then the worker ends with the app
        if http.should_exit and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait
        http.should_exit = True

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=serve, name="longllama-http", daemon=True)
    thread.start()
    try:
        worker.run()
    except KeyboardInterrupt:
        http.should_exit = True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    thread.join(timeout=graceful_seconds + 5)
    if not http.started:
        raise RuntimeError(f"the server could not start on {host}:{port} (the error is above): choose another --port")
