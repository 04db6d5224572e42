"""The HTTP application (Starlette): embeddings, health, readiness, metrics and the model card.

Routes (every embedding answer has OpenAI's shape ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": [...]}], "model": ..., "usage": {...}}``):

    POST /v1/embeddings/image   multipart/form-data (one or more files), or JSON {"images": ["<base64>", ...]}
    POST /v1/embeddings/text    JSON {"texts": ["...", ...]}
    POST /v1/embeddings         OpenAI-compatible: JSON {"input": "..." | ["...", ...], "encoding_format": "float" | "base64"}
    GET  /healthz               200 while the process answers
    GET  /readyz                200 after warm-up; 503 while warming up or draining
    GET  /metrics               Prometheus text format
    GET  /v1/model              towers, plan, provenance, preprocessing and tokenizer from the files' metadata

Bad input is a 4xx JSON error ``{"error": {"message", "type", "code"}}``; a full queue, warm-up
and shutdown are 503 with ``Retry-After``. An unexpected failure is a 500 JSON error: the server
goes on answering.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from surgery.serve.batcher import Batcher, BatchOptions, QueueFull
from surgery.serve.limits import RequestError, ServeLimits, check_count, check_texts, decode_base64, open_image
from surgery.serve.metrics import ServeMetrics
from surgery.serve.runtime import EncoderPair

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the routes share: the pair, one batcher per tower, limits, metrics, and the lifecycle flags."""
    pair: EncoderPair
    batch: BatchOptions
    limits: ServeLimits
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    ready: bool = False  # warm-up done
    draining: bool = False  # shutting down: new embedding requests are refused


def create_app(pair: EncoderPair, batch: BatchOptions | None = None, limits: ServeLimits | None = None) -> Starlette:
    state = AppState(pair=pair, batch=batch or BatchOptions(), limits=limits or ServeLimits())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        for tower in pair.towers:
            batcher = Batcher(lambda rows, t=tower: pair.embed(t, rows), state.batch,
                              on_batch=lambda n, s, t=tower: _observe_batch(state.metrics, t, n, s),
                              on_queue=lambda d, t=tower: state.metrics.queue_depth.labels(t).set(d))
            batcher.start()
            state.batchers[tower] = batcher
        warm = asyncio.get_running_loop().create_task(_warm_up(state))
        yield
        state.draining = True
        warm.cancel()
        for batcher in state.batchers.values():
            await batcher.drain()

    routes = [
        Route("/v1/embeddings/image", _endpoint(state, "image", _image_embeddings), methods=["POST"]),
        Route("/v1/embeddings/text", _endpoint(state, "text", _text_embeddings), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(state, "openai", _openai_embeddings), methods=["POST"]),
        Route("/healthz", lambda request: JSONResponse({"status": "ok"}), methods=["GET"]),
        Route("/readyz", lambda request: _readyz(state), methods=["GET"]),
        Route("/metrics", lambda request: Response(state.metrics.render(), media_type=state.metrics.content_type),
              methods=["GET"]),
        Route("/v1/model", lambda request: JSONResponse({**pair.describe(), "serving": _serving(state)}),
              methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.serve = state
    return app


def _observe_batch(metrics: ServeMetrics, tower: str, n: int, seconds: float) -> None:
    metrics.batch_size.labels(tower).observe(n)
    metrics.inference.labels(tower).observe(seconds)


async def _warm_up(state: AppState) -> None:
    await run_in_threadpool(state.pair.warm_up)
    state.ready = True
    log.info("warm-up done: ready")


def _readyz(state: AppState) -> JSONResponse:
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready"})


def _serving(state: AppState) -> dict:
    return {"max_batch": state.batch.max_batch, "max_wait_ms": state.batch.max_wait_s * 1000,
            "workers": state.batch.workers, "limits": vars(state.limits)}


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)


async def _not_found(request: Request, exc) -> JSONResponse:
    return _error(404, f"no route {request.url.path}; see GET /v1/model and the /v1/embeddings routes", "not_found")


async def _not_allowed(request: Request, exc) -> JSONResponse:
    return _error(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")


def _endpoint(state: AppState, route: str, handler):
    """Wrap an embedding handler: refuse while warming up or draining, turn RequestError into a
    JSON error, anything unexpected into a 500, and count and time every answer."""

    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        state.metrics.in_flight.inc()
        try:
            if state.draining:
                raise RequestError(503, "the server is shutting down; retry on another replica", "shutting_down",
                                   {"Retry-After": str(state.limits.retry_after_s), "Connection": "close"})
            if not state.ready:
                raise RequestError(503, "the model is warming up; retry shortly", "warming_up",
                                   {"Retry-After": str(state.limits.retry_after_s)})
            response = await handler(state, request)
        except RequestError as exc:
            response = _error(exc.status, exc.message, exc.code, exc.headers)
            state.metrics.errors.labels(route, exc.code).inc()
        except Exception:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("request to %s failed", request.url.path)
            response = _error(500, "internal error while embedding; see the server log", "internal_error")
            state.metrics.errors.labels(route, "internal_error").inc()
        finally:
            state.metrics.in_flight.dec()
        state.metrics.requests.labels(route, str(response.status_code)).inc()
        state.metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    return endpoint


# ------------------------------------------------------------------------------------ request bodies
async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refused with 413 past ``max_body_bytes`` (from Content-Length, or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "Content-Length is not a number", "invalid_header")
        if int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"the body is {int(declared):,} bytes; at most {limits.max_body_bytes:,}",
                               "body_too_large", {"Connection": "close"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise RequestError(413, f"the body is over {limits.max_body_bytes:,} bytes", "body_too_large",
                               {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request, limits: ServeLimits) -> dict:
    if _media_type(request) != "application/json":
        raise RequestError(415, f"content type {_media_type(request) or '(none)'!r} is not accepted here; send "
                                "application/json", "unsupported_media_type")
    body = await _read_body(request, limits)
    if not body:
        raise RequestError(400, "the body is empty; send a JSON object", "empty_body")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})",
                           "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object", "invalid_json")
    return data


def _field(data: dict, name: str):
    if name not in data:
        raise RequestError(400, f"missing field '{name}'", "missing_field")
    return data[name]


async def _multipart_files(request: Request, limits: ServeLimits) -> list[bytes]:
    body = await _read_body(request, limits)
    if not body:
        raise RequestError(400, "the body is empty; send one or more image files", "empty_body")
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_items, max_fields=limits.max_items)
    except Exception as exc:  # noqa: BLE001 - python-multipart / Starlette parse errors vary by version
        raise RequestError(400, f"the multipart body cannot be parsed ({str(exc)[:200]})", "invalid_multipart") from None
    try:
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        check_count(len(files), "image files", limits)
        return [await f.read() for f in files]
    finally:
        await form.close()  # the parser's spooled temporary files


# ------------------------------------------------------------------------------------------ handlers
def _need(state: AppState, tower: str) -> Batcher:
    if tower not in state.batchers:
        what = "image" if tower == "vision" else "text"
        raise RequestError(404, f"this server has no {what} encoder (the pair was exported without it)", "no_tower")
    return state.batchers[tower]


async def _submit(state: AppState, tower: str, rows: np.ndarray) -> np.ndarray:
    try:
        return await _need(state, tower).submit(rows)
    except QueueFull:
        raise RequestError(503, "the server is at capacity (queue full); retry after a moment", "queue_full",
                           {"Retry-After": str(state.limits.retry_after_s)}) from None


def _answer(state: AppState, emb: np.ndarray, usage: int, encoding: str = "float") -> JSONResponse:
    """OpenAI's embeddings shape; ``emb`` (n, D) float32."""
    if encoding == "base64":
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()}
                for i, row in enumerate(emb)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(emb)]
    return JSONResponse({"object": "list", "data": data, "model": state.pair.name,
                         "usage": {"prompt_tokens": usage, "total_tokens": usage}})


async def _image_embeddings(state: AppState, request: Request) -> Response:
    _need(state, "vision")
    kind = _media_type(request)
    if kind == "multipart/form-data":
        blobs = await _multipart_files(request, state.limits)
    elif kind == "application/json":
        blobs = decode_base64(_field(await _json_body(request, state.limits), "images"), "images", state.limits)
    else:
        raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted here; send multipart/form-data "
                                "files or application/json {\"images\": [base64, ...]}", "unsupported_media_type")
    rows = await run_in_threadpool(_pixels, state, blobs)  # (n, 3, H, W)
    return _answer(state, await _submit(state, "vision", rows), 0)


def _pixels(state: AppState, blobs: list[bytes]) -> np.ndarray:
    return np.stack([state.pair.pixels(open_image(blob, i, state.limits)) for i, blob in enumerate(blobs)])


async def _texts(state: AppState, texts: list[str]) -> tuple[np.ndarray, int]:
    _need(state, "text")
    tokens = await run_in_threadpool(state.pair.tokens, texts)  # (n, ctx)
    return await _submit(state, "text", tokens), int((tokens != 0).sum())


async def _text_embeddings(state: AppState, request: Request) -> Response:
    _need(state, "text")
    texts = check_texts(_field(await _json_body(request, state.limits), "texts"), "texts", state.limits)
    emb, usage = await _texts(state, texts)
    return _answer(state, emb, usage)


async def _openai_embeddings(state: AppState, request: Request) -> Response:
    _need(state, "text")
    data = await _json_body(request, state.limits)
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(400, f"encoding_format {encoding!r} is not supported; use 'float' or 'base64'",
                           "invalid_field")
    if data.get("dimensions") is not None:
        raise RequestError(400, "'dimensions' is not supported: the encoder's output size is fixed", "invalid_field")
    texts = check_texts(_field(data, "input"), "input", state.limits)
    emb, usage = await _texts(state, texts)
    return _answer(state, emb, usage, encoding)
