"""The FastAPI application: OpenAI's ``POST /v1/chat/completions`` (JSON or
server-sent events), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``.

Every fault is a JSON ``{"error": {...}}`` with a 4xx status (5xx only for a
fault of the server's own) and one line of message; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from blindsight.serve.engine import Engine, TextStream, log
from blindsight.serve.protocol import ApiError, conversation, parse_request


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="bs-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    limits = engine.limits
    # the body may hold max_images base64 images (4/3 of their bytes) and the text
    max_body = limits.max_images * ((limits.max_image_bytes * 4) // 3 + 64) + 1024 * 1024

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(ApiError(404, f"no route {request.method} {request.url.path}; this server has "
                                        f"POST /v1/chat/completions, GET /v1/models, /health and /metrics"))
        if exc.status_code == 405:
            return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return _error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return _error(ApiError(500, f"internal error: {type(exc).__name__}"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "pid": os.getpid(), "sparse": engine.pipeline.sparse, "running": engine.running,
                "waiting": engine.waiting, "capacity": engine.capacity, "context_length": engine.max_context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "blindsight"}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            response = await _chat(request)
        except ApiError as exc:
            engine.metrics.requests.labels(code=str(exc.status)).inc()
            return _error(exc)
        except Exception as exc:  # a fault of the server's own: one line in the log and to the client
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            engine.metrics.requests.labels(code="500").inc()
            return _error(ApiError(500, f"internal error: {type(exc).__name__}"))
        engine.metrics.requests.labels(code="200").inc()
        return response

    async def _read_body(request: Request) -> bytes:
        size = int(request.headers.get("content-length") or 0)
        if size > max_body:
            raise ApiError(413, f"the request body is {size} bytes, over {max_body} (bs-serve --max-images, "
                                f"--max-image-bytes)", code="body_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise ApiError(413, f"the request body is over {max_body} bytes (bs-serve --max-images, "
                                    f"--max-image-bytes)", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _chat(request: Request):
        req = parse_request(await _read_body(request))
        if req.model != engine.name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {engine.name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")
        conv = conversation(req, limits)
        max_tokens = req.max_completion_tokens or req.max_tokens
        job = engine.submit(conv, max_tokens)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            kind, value = await job.events.get()  # "started" or a fault found before the first token
            if kind == "error":
                raise value
            if kind == "cancelled":
                raise ApiError(499, "the client closed the request")
            prompt_tokens = value
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                return await _complete(job, rid, created, prompt_tokens)
            finally:
                watcher.cancel()
                job.cancel()
        watcher.cancel()  # from here on the streaming response notices a client that goes
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(job, rid, created, prompt_tokens, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _complete(job, rid, created, prompt_tokens):
        while True:
            kind, value = await job.events.get()
            if kind == "token":
                continue
            if kind == "error":
                raise value
            if kind == "cancelled":
                raise ApiError(499, "the client closed the request")
            result, saved = value
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result), "logprobs": None}],
                "usage": _usage(prompt_tokens, result),
                "blindsight": _extra(result, saved, job),
            }

    def _chunk(rid, created, delta: dict, finish=None, **extra) -> str:
        doc = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(doc)}\n\n"

    async def _stream(job, rid, created, prompt_tokens, usage: bool):
        text = TextStream(engine.pipeline.prompts.decode)
        first = True
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "token":
                    delta = text.push(value)
                    if first:  # the role rides on the first token's chunk: its arrival is the time to first token
                        yield _chunk(rid, created, {"role": "assistant", "content": delta})
                        first = False
                    elif delta:
                        yield _chunk(rid, created, {"content": delta})
                    continue
                if kind == "error":  # after the status line: an error event, as OpenAI's API sends one
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                if kind == "cancelled":
                    break
                result, saved = value
                rest = text.finish(result.text)
                if rest:
                    yield _chunk(rid, created, {"content": rest})
                yield _chunk(rid, created, {}, _finish(result), blindsight=_extra(result, saved, job))
                if usage:
                    doc = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                           "choices": [], "usage": _usage(prompt_tokens, result)}
                    yield f"data: {json.dumps(doc)}\n\n"
                yield "data: [DONE]\n\n"
                break
        finally:  # the client went away (or the stream ended): stop the job, free its slot
            job.cancel()

    def _finish(result) -> str:
        return "stop" if result.token_ids and result.token_ids[-1] in engine.pipeline.eos else "length"

    def _usage(prompt_tokens: int, result) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

    def _extra(result, saved: int, job) -> dict:
        return {"time_to_first_token_s": job.first_token_s, "prefill_s": result.prefill_s,
                "decode_tokens_per_s": result.tokens_per_s, "attention_flops_saved": saved,
                "image_spans": result.image_spans, "token_ids": result.token_ids, "sparse": engine.pipeline.sparse}

    return app


async def _watch_disconnect(request: Request, job) -> None:
    """Cancel a job whose client has gone (while it waits or before its stream starts)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.1)
