"""The HTTP routes of `edgepeft serve` (FastAPI), OpenAI's shapes, vLLM's adapter endpoints.

    BodyLimit (413) ─► FastAPI ─► check_key (401, bearer, constant-time compare)
      GET  /health                       {"status", "waiting", "running"}   (no key needed)
      GET  /metrics                      Prometheus text (metrics.py)
      GET  /v1/models                    the base, then every loaded adapter
      POST /v1/completions               ┐ model ─► adapter (404 lists the names)
      POST /v1/chat/completions          ┘ max_tokens ≤ limit (400) ─► Scheduler.submit (429)
                                           ─► first event: an error is a JSON error; else
                                              JSON, or SSE chunks ... data: [DONE]
      POST /v1/load_lora_adapter         {"lora_name", "lora_path"}  Engine.load_adapter
      POST /v1/unload_lora_adapter       {"lora_name"}               Engine.unload_adapter
    errors anywhere ─► {"error": {"message", "type", "param", "code"}} (errors.py)

The worker thread hands events to this event loop (`_Channel`); a handler waiting for them
also watches its client and its deadline, and cancels the ticket when either goes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from edgepeft.serve import schemas
from edgepeft.serve.config import ServeConfig
from edgepeft.serve.errors import (
    ApiError,
    RequestCancelledError,
    RequestTimeoutError,
    api_error,
    unknown_model,
)
from edgepeft.serve.metrics import Metrics
from edgepeft.serve.scheduler import Failed, Finished, Job, Piece, Scheduler, Ticket

POLL_S = 0.25
"""How often a waiting handler checks its client and deadline."""


def base_model_name(manifest) -> str:
    """The base's default `model` name: a hub id as is, a local path's folder name."""
    base = str(manifest.base)
    if base.startswith((".", "/", "~")) or "\\" in base or Path(base).exists():
        return Path(base).name or base
    return base


class _Channel:
    """Events from the worker thread into this event loop's queue.

    `pieces=False` (a JSON answer) drops the text pieces: the handler waits for the result
    alone and so wakes every POLL_S to check its client, not once per token.
    """

    def __init__(self, pieces: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pieces = pieces

    def __call__(self, event) -> None:
        if self.pieces or not isinstance(event, Piece):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before any route reads it.

    The body is read here (at most `limit` bytes are held) and replayed to the app; later
    receive() calls go to the server, so handlers still see the client disconnect.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode() or "0"
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._too_large(send, declared)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left while sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send, f"more than {len(body)}")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: str) -> None:
        error = ApiError(
            413,
            f"the request body has {size} bytes, more than this server's limit of {self.limit} "
            "(edgepeft serve --max-body-bytes)",
            code="body_too_large",
        )
        payload = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class Server:
    """What the routes share: the engine, its scheduler and metrics, and the names."""

    def __init__(self, engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            engine,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            batch_context=config.batch_context,
            timeout_s=config.request_timeout_s,
            metrics=self.metrics,
        )
        self.base_name = config.model_name or base_model_name(engine.manifest)
        if self.base_name in engine.adapters():
            raise ValueError(
                f"an adapter is named {self.base_name!r}, the base's name; rename the adapter "
                "or pass another --served-model-name"
            )
        self.created = int(time.time())

    # ------------------------------------------------------------ names

    def names(self) -> list[str]:
        return [self.base_name, *self.engine.adapters()]

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.engine.adapters():
            return model
        raise unknown_model(model, self.names())

    # ------------------------------------------------------------ generation

    def job(self, body: schemas.GenerationRequest, prompt, max_tokens: int | None) -> Job:
        unsupported = body.unsupported()
        if unsupported is not None:
            raise ApiError(400, unsupported[1], param=unsupported[0], code="unsupported")
        adapter = self.adapter_for(body.model)
        vocab = self.engine.manifest.vocab_size
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:  # onnxruntime's Gather would fail as a 500
                raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                               param="prompt")  # fmt: skip
        limit = self.config.max_tokens_limit
        wanted = max_tokens if max_tokens is not None else self.config.default_max_tokens
        if wanted > limit:
            raise ApiError(
                400,
                f"max_tokens {wanted} is above this server's limit of {limit} "
                "(edgepeft serve --max-tokens)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if body.min_tokens > wanted:
            raise ApiError(400, f"min_tokens {body.min_tokens} > max_tokens {wanted}",
                           param="min_tokens")  # fmt: skip
        options = dict(
            max_new_tokens=wanted,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
            min_new_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
        )
        return Job(prompt=prompt, adapter=adapter, model=body.model, options=options)

    async def next_event(self, channel: _Channel, ticket: Ticket, request: Request | None):
        """The ticket's next event; meanwhile a gone client cancels it, its deadline times it out.

        Raises:
            RequestCancelledError: `request`'s client disconnected (the ticket is cancelled).
        """
        getter = asyncio.ensure_future(channel.queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                if done:
                    return getter.result()
                if request is not None and await request.is_disconnected():
                    self.scheduler.cancel(ticket)
                    raise RequestCancelledError("the client went away")
                if time.monotonic() > ticket.deadline and not ticket.cancelled.is_set():
                    # still queued behind long requests: the worker would time it out only
                    # when its turn comes
                    self.scheduler.cancel(ticket, RequestTimeoutError(
                        f"the request waited longer than the server's --timeout "
                        f"{self.config.request_timeout_s:g} s; retry when it is less busy"
                    ))  # fmt: skip
        finally:
            getter.cancel()

    async def generate(self, request: Request, job: Job, chat: bool, stream: bool, usage: bool):
        channel = _Channel(pieces=stream)
        ticket = self.scheduler.submit(job, channel)
        try:
            first = await self.next_event(channel, ticket, request)
        except BaseException:  # the client left, the server stops: the worker stops too
            self.scheduler.cancel(ticket)
            raise
        param = "messages" if chat else "prompt"
        if isinstance(first, Failed):
            raise api_error(first.error, param)
        if stream:
            sse = self._sse(channel, ticket, first, job.model, chat, usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
        rid = schemas.new_id("chatcmpl" if chat else "cmpl")
        build = schemas.chat_completion if chat else schemas.completion
        return JSONResponse(build(rid, job.model, first.result))  # Finished: no pieces here

    async def _sse(self, channel, ticket, first, model: str, chat: bool, usage: bool):
        """OpenAI's server-sent events: chunks, the finish chunk, [usage], data: [DONE].

        A client that goes away mid-stream cancels this generator (Starlette watches the
        connection); `finally` then cancels the ticket and the worker stops generating.
        """
        rid = schemas.new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion.chunk" if chat else "text_completion"
        event = first
        try:
            if chat:
                yield _data(schemas.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while True:
                if isinstance(event, Piece):
                    yield _data(
                        schemas.chat_chunk(rid, model, {"content": event.text})
                        if chat
                        else schemas.completion_chunk(rid, model, event.text)
                    )
                elif isinstance(event, Finished):
                    reason = schemas.finish_reason(event.result)
                    yield _data(
                        schemas.chat_chunk(rid, model, {}, reason)
                        if chat
                        else schemas.completion_chunk(rid, model, "", reason)
                    )
                    if usage:
                        yield _data(schemas.usage_chunk(rid, model, kind, event.result))
                    break
                else:  # headers are sent: the error goes in the stream, as OpenAI's does
                    yield _data(api_error(event.error).body())
                    break
                event = await self.next_event(channel, ticket, None)
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(ticket)

    # ------------------------------------------------------------ adapters

    async def load(self, body: schemas.LoadLoraRequest) -> dict:
        self._check_loading()
        name = body.lora_name
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base's name; choose another lora_name",
                           param="lora_name")  # fmt: skip
        if name in self.engine.adapters():
            raise ApiError(
                400,
                f"an adapter named {name!r} is loaded already "
                f"({self.engine.adapters()[name].file}); unload it first or choose another name",
                param="lora_name",
                code="adapter_exists",
            )
        path = Path(body.lora_path).expanduser()
        if not path.is_file():
            raise ApiError(
                404,
                f"lora_path {str(path)!r} is not a file on the server (expected an "
                "*.onnx_adapter or *.kvprefix.safetensors file of this export's base)",
                param="lora_path",
                code="adapter_file_not_found",
            )
        try:
            info = await asyncio.to_thread(self.engine.load_adapter, path, name)
        except (ValueError, OSError) as e:
            raise ApiError(400, str(e), param="lora_path", code="adapter_load_failed") from e
        return {"status": "ok", "lora_name": info.name, "kind": info.kind, "rank": info.rank,
                "bytes": info.bytes, "file": info.file}  # fmt: skip

    async def unload(self, body: schemas.UnloadLoraRequest) -> dict:
        self._check_loading()
        name = body.lora_name
        if name == self.base_name:
            raise ApiError(400, f"{name!r} is the base, which cannot be unloaded",
                           param="lora_name")  # fmt: skip
        if name not in self.engine.adapters():
            raise unknown_model(name, self.names())
        self.engine.unload_adapter(name)  # requests running with it finish with it
        return {"status": "ok", "lora_name": name}

    def _check_loading(self) -> None:
        if not self.config.allow_adapter_loading:
            raise ApiError(
                403,
                "this server does not load or unload adapters (started with "
                "--disable-adapter-loading)",
                "permission_error",
                code="adapter_loading_disabled",
            )


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an edgepeft.runtime.Engine) under `config`.

    `app.state.server` holds the Server (its scheduler and metrics). The worker starts
    with the app's lifespan and, at shutdown, finishes what is queued and running.
    """
    config = config or ServeConfig()
    server = Server(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.close, config.request_timeout_s)

    app = FastAPI(
        title="edgepeft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        good = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not good:
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the "
                "server was started with (--api-key or EDGEPEFT_API_KEY)",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    keyed = [Depends(check_key)]

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        error = ApiError(400, f"invalid request: {message}", param=".".join(loc) or None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        error = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestCancelledError)
    async def _gone(request, exc):  # nobody reads it; uvicorn needs some response
        return JSONResponse(api_error(exc).body(), status_code=499)

    @app.get("/health")
    async def health():
        s = server.scheduler
        status = "draining" if s.closing else "ok"
        return JSONResponse({"status": status, "waiting": s.waiting, "running": s.running},
                            status_code=503 if s.closing else 200)  # fmt: skip

    @app.get("/metrics", dependencies=keyed)
    async def metrics():
        s = server.scheduler
        text = server.metrics.render(
            waiting=s.waiting, running=s.running, adapters=len(engine.adapters())
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        cards = [schemas.model_card(server.base_name, server.created)]
        cards += [
            schemas.model_card(n, server.created, server.base_name) for n in engine.adapters()
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: schemas.CompletionRequest, request: Request):
        try:
            prompt = body.the_prompt()
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from e
        job = server.job(body, prompt, body.max_tokens)
        return await _generate(request, job, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        try:
            messages = body.chat()
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        job = server.job(body, messages, body.max_completion_tokens or body.max_tokens)
        return await _generate(request, job, body, chat=True)

    async def _generate(request, job, body, chat):
        try:
            return await server.generate(request, job, chat, body.stream, body.include_usage)
        except (ApiError, RequestCancelledError):
            raise
        except Exception as e:  # QueueFullError, ShuttingDownError, ...
            raise api_error(e) from e

    @app.post("/v1/load_lora_adapter", dependencies=keyed)
    async def load_lora_adapter(body: schemas.LoadLoraRequest):
        return await server.load(body)

    @app.post("/v1/unload_lora_adapter", dependencies=keyed)
    async def unload_lora_adapter(body: schemas.UnloadLoraRequest):
        return await server.unload(body)

    return app


__all__ = ["BodyLimit", "Server", "base_model_name", "create_app"]
