"""`kd-client serve`: an OpenAI-compatible endpoint over the neurons (kd_client/neurons.py).

    POST /v1/chat/completions   POST /v1/completions   (streaming SSE or not)
    GET  /v1/models             GET  /health

`model` names the neuron: a published domain, or `base` (the student without an adapter).
Every response says which adapter produced it: the header `X-KD-Adapter: memory/v3` and the
JSON field `"kd": {"domain": "memory", "version": 3}` (in every SSE chunk). The handlers never
touch MLX: they queue a job for the MLX thread and relay its events.

Limits: loopback by default; `KD_SERVE_API_KEY` (a Bearer token) is required to bind anywhere
else; request bodies, `max_tokens`, prompt length and the waiting queue are bounded. A bad
request gets a 4xx in OpenAI's error shape and the server carries on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from jobs.errors import ConfigError
from kd_client.dashboard.security import is_loopback
from kd_client.neurons import BASE, Neurons
from kd_client.servejobs import Chunk, Event, Failed, Finished, Job, Sampling, ServeError, Started
from kd_client.settings import ClientSettings

log = structlog.get_logger(__name__)

HEADER = "X-KD-Adapter"


# --- request bodies: the subset of fields mlx_lm.server accepts ----------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class CompletionFields(BaseModel):
    """Unknown fields are ignored (OpenAI clients send many); known ones are checked."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    repetition_context_size: int = Field(default=20, ge=1, le=4096)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(default=None, max_length=300)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 4 stop strings of up to 256 characters")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            seed=self.seed,
        )


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)


class TextRequest(CompletionFields):
    prompt: str = Field(min_length=1)


# --- helpers ----------------------------------------------------------------------------------------
class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def check_binding(host: str, api_key: str | None) -> None:
    """Anything beyond loopback needs an API key (ConfigError otherwise)."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"refusing to serve on {host!r} without an API key: set KD_SERVE_API_KEY to a secret "
            "(clients send it as 'Authorization: Bearer ...'), or bind 127.0.0.1"
        )


def adapter_label(neuron: str, version: int) -> dict[str, Any]:
    return {"domain": neuron, "version": None if neuron == BASE else version}


def header_value(neuron: str, version: int) -> str:
    return BASE if neuron == BASE else f"{neuron}/v{version}"


class BearerAuth:
    """Every request must carry `Authorization: Bearer <KD_SERVE_API_KEY>` (pure ASGI, streams untouched)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                resp = error_response(
                    401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error"
                )
                resp.headers["WWW-Authenticate"] = "Bearer"
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(
            413, f"request body of {declared} bytes is over the limit of {limit} (KD_SERVE_MAX_BODY_BYTES)"
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPProblem(413, f"request body is over the limit of {limit} bytes (KD_SERVE_MAX_BODY_BYTES)")
    try:
        return json.loads(body)
    except ValueError as e:
        raise HTTPProblem(400, f"the body is not valid JSON: {e}") from e


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """A client that leaves while its request waits or runs frees the MLX thread for the others."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def parse(model: type[CompletionFields], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise HTTPProblem(400, f"invalid request: {problems}") from e


# --- the app ------------------------------------------------------------------------------------------
class Endpoint:
    """The request handlers, bound to one Neurons and the limits of ClientSettings."""

    def __init__(self, neurons: Neurons, settings: ClientSettings):
        self.neurons, self.settings = neurons, settings

    async def health(self, request: Request) -> Response:
        n = self.neurons
        active = n.active
        body = {
            "status": "ok" if n.alive else "failing",
            "model": str(n.model_dir),
            "served": {d: s.version for d, s in sorted(n.served.items())},
            "observed": dict(n.observed),
            "refused": n.refusals(),
            "active": None if active is None else active.__dict__,
            "queued": len(n.queue),
            "switches": n.switches,
            "switch_ms_total": round(n.switch_s * 1000, 3),
            "prompt_cache": list(n.cache_view),
            "error": n.error,
        }
        return JSONResponse(body, status_code=200 if n.alive else 503)

    async def models(self, request: Request) -> Response:
        created = int(time.time())
        rows = [
            {"id": BASE, "object": "model", "created": created, "owned_by": "kd-daemon", "kd": adapter_label(BASE, 0)}
        ]
        refused = self.neurons.refusals()
        for domain, s in sorted(self.neurons.served.items()):
            row = {"id": domain, "object": "model", "created": int(s.installed_at), "owned_by": "kd-daemon"}
            rows.append({**row, "kd": {**adapter_label(domain, s.version), "refused": refused.get(domain)}})
        return JSONResponse({"object": "list", "data": rows})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, ChatRequest)

    async def text(self, request: Request) -> Response:
        return await self._complete(request, TextRequest)

    async def _complete(self, request: Request, kind: type[CompletionFields]) -> Response:
        try:
            req = parse(kind, await read_body(request, self.settings.serve_max_body_bytes))
            job, events = self._submit(req)
        except HTTPProblem as e:
            return error_response(e.status, e.message, e.kind)
        except ServeError as e:
            return error_response(e.status, str(e), "model_not_found" if e.status == 404 else "server_error")
        gone = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            first = await events.get()
            if isinstance(first, Failed):
                return error_response(first.status, first.message)
            if not isinstance(first, Started):
                return error_response(500, f"unexpected first event {first!r}", "server_error")
            reply = Reply(req, first, job.id, isinstance(req, ChatRequest))
            headers = {HEADER: header_value(first.neuron, first.version)}
            if req.stream:  # StreamingResponse listens for the disconnect itself from here on
                gone.cancel()
                return StreamingResponse(reply.sse(events, job), media_type="text/event-stream", headers=headers)
            return await reply.whole(events, headers)
        finally:
            gone.cancel()
            if not req.stream:
                job.cancelled.set()  # a no-op once finished; stops the generation if this task was cancelled

    def _submit(self, req: CompletionFields) -> tuple[Job, asyncio.Queue[Event]]:
        limit = self.settings.serve_max_tokens
        max_tokens = req.max_completion_tokens or req.max_tokens or min(self.settings.serve_default_max_tokens, limit)
        if max_tokens > limit:
            raise HTTPProblem(400, f"max_tokens={max_tokens} is over the limit of {limit} (KD_SERVE_MAX_TOKENS)")
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

        def emit(event: Event) -> None:  # MLX thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        job = Job(
            neuron=req.model,
            max_tokens=max_tokens,
            emit=emit,
            messages=[m.as_template() for m in req.messages] if isinstance(req, ChatRequest) else None,
            prompt=req.prompt if isinstance(req, TextRequest) else None,
            stop=req.stops(),
            stream=req.stream,
            sampling=req.sampling(),
        )
        self.neurons.submit(job)
        return job, events


class Reply:
    """OpenAI response bodies for one request, whole or as SSE chunks, each naming its adapter."""

    def __init__(self, req: CompletionFields, started: Started, job_id: str, chat: bool):
        self.req, self.started, self.chat = req, started, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
        self.created = int(time.time())
        self.kd = adapter_label(started.neuron, started.version)

    def _head(self, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model, "kd": self.kd}

    def _choice(self, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish}
        if stream:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    @staticmethod
    def _usage(done: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        }

    async def whole(self, events: asyncio.Queue[Event], headers: dict[str, str]) -> Response:
        parts = []
        while True:
            event = await events.get()
            if isinstance(event, Chunk):
                parts.append(event.text)
            elif isinstance(event, Failed):
                return error_response(event.status, event.message, "server_error")
            elif isinstance(event, Finished):
                body = {
                    **self._head(False),
                    "choices": [self._choice("".join(parts), event.finish_reason, False)],
                    "usage": self._usage(event),
                }
                return JSONResponse(body, headers=headers)

    async def sse(self, events: asyncio.Queue[Event], job: Job) -> AsyncIterator[str]:
        try:
            if self.chat:  # OpenAI's first chunk: the role
                yield self._data({**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            while True:
                event = await events.get()
                if isinstance(event, Chunk):
                    yield self._data({**self._head(True), "choices": [self._choice(event.text, None, True)]})
                elif isinstance(event, Failed):
                    yield self._data({"error": {"message": event.message, "type": "server_error"}, "kd": self.kd})
                    break
                elif isinstance(event, Finished):
                    yield self._data({**self._head(True), "choices": [self._choice(None, event.finish_reason, True)]})
                    if self.req.stream_options is not None and self.req.stream_options.include_usage:
                        yield self._data({**self._head(True), "choices": [], "usage": self._usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away (or the stream ended): stop generating

    @staticmethod
    def _data(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def http_problem(request: Request, exc: Exception) -> Response:
    """Routing errors (404, 405) in OpenAI's error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return error_response(status, exc.detail if isinstance(exc, HTTPException) else str(exc))


async def server_problem(request: Request, exc: Exception) -> Response:
    log.error("request_failed", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def create_app(neurons: Neurons, settings: ClientSettings) -> ASGIApp:
    """The ASGI app: routes, plus Bearer auth when KD_SERVE_API_KEY is set."""
    ep = Endpoint(neurons, settings)
    app = Starlette(
        routes=[
            Route("/health", ep.health, methods=["GET"]),
            Route("/v1/models", ep.models, methods=["GET"]),
            Route("/v1/chat/completions", ep.chat, methods=["POST"]),
            Route("/v1/completions", ep.text, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_problem, Exception: server_problem},
    )
    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    return BearerAuth(app, key) if key else app


def serve(model: str, adapters: str, host: str, port: int, settings: ClientSettings) -> None:
    """Load the neurons, then serve until SIGINT/SIGTERM (uvicorn's graceful shutdown)."""
    import uvicorn

    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    check_binding(host, key)
    from kd_client.mirror import Mirror

    mirror = Mirror.from_settings(settings, Path(adapters)) if settings.adapters_source == "redis" else None
    neurons = Neurons(
        Path(model),
        Path(adapters),
        max_queued=settings.serve_max_queued,
        max_skips=settings.serve_max_skips,
        max_prompt_tokens=settings.serve_max_prompt_tokens,
        cache_entries=settings.serve_prompt_cache_entries,
        debounce_ms=settings.serve_watch_debounce_ms,
        force_polling=settings.serve_force_polling or None,
        mirror=mirror,
    ).start()
    try:
        config = uvicorn.Config(
            create_app(neurons, settings),
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,  # then open requests are cancelled, which stops their generations
        )
        log.info("serve_listening", host=host, port=port, model=model, adapters=adapters, auth=key is not None)
        uvicorn.Server(config).run()
    finally:
        neurons.stop()
