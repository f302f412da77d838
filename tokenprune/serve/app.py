"""FastAPI application: OpenAI-compatible routes over the batching scheduler.

Routes: ``POST /v1/chat/completions`` (plain and ``stream=true`` server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Every error body is
OpenAI-style ``{"error": {"message", "type", "param", "code"}}``; client mistakes are 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import APIError
from .metrics import CONTENT_TYPE, ServerMetrics
from .model import Encoded, ModelRunner
from .protocol import ChatRequest, parse_chat, parse_json
from .scheduler import AsyncSink, Job, Scheduler

log = logging.getLogger("tokenprune.serve")
MAX_BODY_BYTES = 64 * 1024 * 1024
BODY_TIMEOUT_S = 30.0


def create_app(
    runner: ModelRunner,
    *,
    max_batch: int = 16,
    window: float = 0.01,
    max_queue: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The server application for ``runner``'s model; the scheduler's worker starts and stops with
    the application (lifespan). A request body must arrive within ``body_timeout`` seconds (408)."""
    metrics = ServerMetrics()

    def run_batch(key: Hashable, jobs: Sequence[Job]) -> None:
        reduction, sampling = key
        runner.generate(reduction, sampling, [j.payload for j in jobs], [j.sink for j in jobs])

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.batch_seconds.observe(seconds)

    scheduler = Scheduler(run_batch, max_batch=max_batch, window=window, max_queue=max_queue, on_batch=on_batch)
    metrics.queue.read = lambda: scheduler.depth

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="tokenprune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner = runner
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(str(exc.detail), status=exc.status_code, type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = APIError(f"invalid request: {exc.errors()}", status=400)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = APIError(f"internal error: {type(exc).__name__}", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": runner.name, "queue_depth": scheduler.depth, "batches": scheduler.batches}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": runner.name,
            "object": "model",
            "created": created,
            "owned_by": "tokenprune",
            "tokenprune": {"default": runner.default.describe(), "context_length": runner.context_length},
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            check_json_type(request.headers.get("content-type"))
            body = parse_json(await _read_body(request, max_body_bytes, body_timeout))
            req, enc, reduction = await run_in_threadpool(_prepare, runner, body)
            sink = AsyncSink(asyncio.get_running_loop())
            scheduler.submit(Job((reduction, req.sampling), enc, sink))
        except APIError as exc:
            _count_error(metrics, exc.status)
            raise
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(
                _stream(runner, metrics, req, enc, sink, cid, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        while True:
            event = await sink.events.get()
            if event[0] == "error":
                _count_error(metrics, event[1].status)
                raise event[1]
            if event[0] == "done":
                result = event[1]
                break
        _record(metrics, enc, sink, result, t0)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": runner.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["text"]},
                        "finish_reason": result["finish_reason"],
                        "logprobs": None,
                    }
                ],
                "usage": _usage(result),
            }
        )

    return app


def check_json_type(content_type: str | None) -> None:
    """A 415 unless the body is declared JSON (``application/json`` or a ``*/*+json`` type): a web
    page can send other types to a loopback server without a CORS preflight."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not ("/" in media and media.endswith("+json")):
        raise APIError(
            f"Content-Type: must be application/json (or a */*+json type), got {content_type!r}",
            status=415,
            param="Content-Type",
            code="unsupported_media_type",
        )


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, or a 413 once it is over ``limit`` bytes (declared or streamed), a 408 when
    it has not fully arrived after ``timeout`` seconds, a 499 when the client went away mid-body."""
    too_large = APIError(f"request body over {limit} bytes", status=413, code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(f"request body not received within {timeout:g} s", status=408, code="request_timeout") from None
    except ClientDisconnect:  # nobody is left to answer; counted as a client error, never logged as a server one
        raise APIError("client left before sending the whole body", status=499, code="client_disconnected") from None
    return b"".join(chunks)


def _prepare(runner: ModelRunner, body: dict[str, Any]) -> tuple[ChatRequest, Encoded, Any]:
    """Parse, check and encode a request (threadpool: decodes images, runs the processor)."""
    req = parse_chat(body, runner.limits, runner.prompt_format)
    if req.model != runner.name:
        raise APIError(
            f"model: {req.model!r} is not served here; available: [{runner.name!r}]",
            status=404,
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    reduction = runner.resolve(req.reduction)
    return req, runner.encode(req), reduction


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "tokenprune": result["tokenprune"]}


def _count_error(metrics: ServerMetrics, status: int) -> None:
    metrics.requests.inc(status="error")
    metrics.errors.inc(code=str(status))


def _record(metrics: ServerMetrics, enc: Encoded, sink: AsyncSink, result: dict[str, Any], t0: float) -> None:
    ext = result["tokenprune"]
    metrics.requests.inc(status="ok")
    metrics.prompt_tokens.inc(result["prompt_tokens"])
    metrics.completion_tokens.inc(result["completion_tokens"])
    metrics.visual_tokens.inc(ext["visual_tokens"], method=ext["method"])
    metrics.kept_tokens.inc(ext["kept_visual_tokens"], method=ext["method"])
    if sink.first_token_at is not None:
        metrics.ttft.observe(sink.first_token_at - t0)
    metrics.latency.observe(result["finished_at"] - t0)


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(
    runner: ModelRunner,
    metrics: ServerMetrics,
    req: ChatRequest,
    enc: Encoded,
    sink: AsyncSink,
    cid: str,
    t0: float,
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content deltas, a finish chunk, optionally a usage chunk,
    then ``[DONE]``. An error after the stream started is sent as an ``{"error": ...}`` event."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": runner.name}
        return {**out, "choices": [choice], **extra}

    finished = False
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            event = await sink.events.get()
            if event[0] == "delta":
                yield _sse(chunk({"content": event[1]}))
            elif event[0] == "error":
                _count_error(metrics, event[1].status)
                finished = True
                yield _sse(event[1].body())
                break
            elif event[0] == "done":
                result = event[1]
                finished = True
                _record(metrics, enc, sink, result, t0)
                yield _sse(chunk({}, result["finish_reason"], tokenprune=result["tokenprune"]))
                if req.include_usage:
                    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": runner.name}
                    yield _sse({**out, "choices": [], "usage": _usage(result)})
                break
        yield _sse("[DONE]")
    finally:
        if not finished:  # the client went away: stop generating its row
            sink.cancelled = True
            _count_error(metrics, 499)
