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
    GET  /v1/models             OpenAI's model list (clients read the name requests must carry from it)

Bad input is a 4xx JSON error ``{"error": {"message", "type", "code"}}``; a full queue, work over
the admission budgets (:mod:`surgery.serve.admission`: image pixels being decoded, text bytes being
tokenized), warm-up and shutdown are 503 with ``Retry-After``. An unexpected failure is a 500 JSON
error: the server goes on answering. On shutdown, a request still running at the deadline
(:meth:`AppState.begin_shutdown`) is answered 503 and its work is abandoned on its daemon thread.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from surgery.serve.admission import HEAVY_PIXELS, HEAVY_TEXT_BYTES, Budget
from surgery.serve.batcher import Batcher, BatchOptions, QueueFull, ShutDown
from surgery.serve.bodies import field as body_field
from surgery.serve.bodies import json_body, media_type, multipart_files
from surgery.serve.limits import RequestError, ServeLimits, check_texts, decode_base64, decode_image, image_size
from surgery.serve.metrics import ServeMetrics
from surgery.serve.runtime import EncoderPair
from surgery.serve.threads import DaemonPool

log = logging.getLogger(__name__)
STARTED = int(time.time())  # OpenAI's 'created' of the served model: when this process imported the app
# Decoding and tokenizing run on two pools: a heavy request (admission.HEAVY_PIXELS / HEAVY_TEXT_BYTES of work:
# a 2000 x 2000 image, 64 KB of text) waits for the one heavy thread, so heavy requests take at most one core
# and never queue ahead of ordinary ones (admission bounds what they hold while they wait).
PREP_THREADS = 3
HEAVY_THREADS = 1
HEAVY_NICE = 19  # the heavy thread's scheduling priority (Linux): ordinary requests' work runs first


@dataclass
class AppState:
    """What the routes share: the pair, one batcher per tower, limits, admission budgets, metrics, and
    the lifecycle flags."""
    pair: EncoderPair
    batch: BatchOptions
    limits: ServeLimits
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    ready: bool = False  # warm-up done
    failed: str | None = None  # the warm-up's error (create_app without a warmed pair)
    draining: bool = False  # shutting down: new embedding requests are refused
    pixels: Budget | None = None  # image pixels being decoded, all requests
    text_bytes: Budget | None = None  # UTF-8 bytes of text being tokenized, all requests
    prep: DaemonPool = field(default_factory=lambda: DaemonPool(PREP_THREADS, "clipsurgery-prep"))
    prep_heavy: DaemonPool = field(default_factory=lambda: DaemonPool(HEAVY_THREADS, "clipsurgery-prep-heavy",
                                                                      nice=HEAVY_NICE))
    cut: asyncio.Event | None = None  # set at the shutdown deadline: requests still running get 503
    loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self.pixels = Budget("image pixels being decoded", self.limits.max_decode_pixels, HEAVY_PIXELS,
                             self.limits.retry_after_s)
        self.text_bytes = Budget("bytes of text being tokenized", self.limits.max_text_bytes, HEAVY_TEXT_BYTES,
                                 self.limits.retry_after_s)

    def begin_shutdown(self, deadline_s: float) -> None:
        """Refuse new requests now; at ``deadline_s`` from now, answer the ones still running 503.
        Safe to call from a signal handler or another thread."""
        self.draining = True
        if self.loop is not None and self.cut is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self.loop.call_soon_threadsafe(self.loop.call_later, deadline_s, self.cut.set)

    @property
    def abandoned(self) -> int:
        """Calls still running on daemon threads (a shutdown cut them off)."""
        return self.prep.busy + self.prep_heavy.busy + sum(b.abandoned for b in self.batchers.values())


def create_app(pair: EncoderPair, batch: BatchOptions | None = None, limits: ServeLimits | None = None, *,
               warmed: bool = False) -> Starlette:
    """The app over ``pair``. ``warmed``: :meth:`EncoderPair.warm_up` already ran (``build_app`` does it
    before listening), so /readyz is 200 at once; otherwise it runs in the background."""
    state = AppState(pair=pair, batch=batch or BatchOptions(), limits=limits or ServeLimits(), ready=warmed)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.loop, state.cut = asyncio.get_running_loop(), asyncio.Event()
        for tower in pair.towers:
            batcher = Batcher(lambda rows, t=tower: pair.embed(t, rows), state.batch,
                              on_batch=lambda n, s, t=tower: _observe_batch(state.metrics, t, n, s),
                              on_queue=lambda d, t=tower: state.metrics.queue_depth.labels(t).set(d))
            batcher.start()
            state.batchers[tower] = batcher
        warm = None if state.ready else asyncio.get_running_loop().create_task(_warm_up(state))
        yield
        state.draining = True
        if warm is not None:
            warm.cancel()
        for batcher in state.batchers.values():
            await batcher.drain(state.cut)
        state.prep.shutdown()
        state.prep_heavy.shutdown()
        if state.abandoned:
            log.warning("shutdown deadline passed: %d call(s) abandoned on their threads", state.abandoned)

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
        Route("/v1/models", lambda request: JSONResponse(_model_list(state)), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.serve = state
    return app


def _model_list(state) -> dict:
    """OpenAI's ``GET /v1/models`` answer: the one served model, under the name requests must carry."""
    return {"object": "list", "data": [{"id": state.pair.name, "object": "model", "created": STARTED,
                                        "owned_by": "clipsurgery"}]}


def _observe_batch(metrics: ServeMetrics, tower: str, n: int, seconds: float) -> None:
    metrics.batch_size.labels(tower).observe(n)
    metrics.inference.labels(tower).observe(seconds)


async def _warm_up(state: AppState) -> None:
    try:
        await state.prep.run(state.pair.warm_up)
    except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log, one line
        state.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("warm-up failed: %s", state.failed)
        return
    state.ready = True
    log.info("warm-up done: ready")


def _readyz(state: AppState) -> JSONResponse:
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.failed:
        return JSONResponse({"status": "failed", "error": state.failed}, status_code=503)
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
    return _error(404, f"no route {request.url.path}; see GET /v1/model, /v1/models and the /v1/embeddings routes",
                  "not_found")


async def _not_allowed(request: Request, exc) -> JSONResponse:
    return _error(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")


def _shutting_down(state: AppState, message: str) -> RequestError:
    return RequestError(503, message, "shutting_down",
                        {"Retry-After": str(state.limits.retry_after_s), "Connection": "close"})


def _endpoint(state: AppState, route: str, handler):
    """Wrap an embedding handler: refuse while warming up or draining, turn RequestError into a
    JSON error, anything unexpected into a 500, answer 503 to a request still running at the
    shutdown deadline, and count and time every answer."""

    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        state.metrics.in_flight.inc()
        try:
            if state.draining:
                raise _shutting_down(state, "the server is shutting down; retry on another replica")
            if not state.ready:
                raise RequestError(503, "the model is warming up; retry shortly", "warming_up",
                                   {"Retry-After": str(state.limits.retry_after_s)})
            response = await _until_cut(state, handler(state, request))
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


async def _until_cut(state: AppState, work) -> Response:
    """``await work``, unless the shutdown deadline comes first: then the work is cancelled (its
    thread, if any, is abandoned) and the request is answered 503."""
    task = asyncio.ensure_future(work)
    if state.cut is None:
        return await task
    cut = asyncio.ensure_future(state.cut.wait())
    try:
        await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cut.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise _shutting_down(state, "the server shut down before this request finished; retry on another replica")


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
    except ShutDown:
        raise _shutting_down(state, "the server shut down before this request finished; retry on another "
                                    "replica") from None


async def _prepare(state: AppState, budget: Budget, amount: int, fn, *args):
    """``fn(*args)`` on a prep thread (the heavy one for a heavy request), holding ``amount`` of ``budget``
    until it ends (503 / 413 first when it does not fit)."""
    share = budget.take(amount)
    gauge = state.metrics.admitted.labels(budget.what)
    gauge.set(budget.used)

    def done() -> None:
        share.release()
        gauge.set(budget.used)

    return await (state.prep_heavy if share.heavy else state.prep).run(fn, *args, on_done=done)


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
    kind = media_type(request)
    if kind == "multipart/form-data":
        blobs = await multipart_files(request, state.limits)
    elif kind == "application/json":
        blobs = decode_base64(body_field(await json_body(request, state.limits), "images"), "images", state.limits)
    else:
        raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted here; send multipart/form-data "
                                "files or application/json {\"images\": [base64, ...]}", "unsupported_media_type")
    sizes = [image_size(blob, i, state.limits) for i, blob in enumerate(blobs)]  # headers only: nothing decoded yet
    rows = await _prepare(state, state.pixels, sum(w * h for w, h in sizes), _pixels, state, blobs)  # (n, 3, H, W)
    return _answer(state, await _submit(state, "vision", rows), 0)


def _pixels(state: AppState, blobs: list[bytes]) -> np.ndarray:
    return np.stack([state.pair.pixels(decode_image(blob, i, state.limits)) for i, blob in enumerate(blobs)])


async def _texts(state: AppState, texts: list[str]) -> tuple[np.ndarray, int]:
    _need(state, "text")
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    tokens = await _prepare(state, state.text_bytes, size, state.pair.tokens, texts)  # (n, ctx)
    return await _submit(state, "text", tokens), int((tokens != 0).sum())


def _refuse_large_text_now(state: AppState, request: Request) -> None:
    """A JSON body longer than the heavy threshold can only carry a heavy text request (its texts' UTF-8
    bytes are about its length); while the heavy share is full it is refused before it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > HEAVY_TEXT_BYTES:
        state.text_bytes.refuse_heavy_now()


async def _text_embeddings(state: AppState, request: Request) -> Response:
    _need(state, "text")
    _refuse_large_text_now(state, request)
    texts = check_texts(body_field(await json_body(request, state.limits), "texts"), "texts", state.limits)
    emb, usage = await _texts(state, texts)
    return _answer(state, emb, usage)


async def _openai_embeddings(state: AppState, request: Request) -> Response:
    _need(state, "text")
    _refuse_large_text_now(state, request)
    data = await json_body(request, state.limits)
    model = data.get("model")
    if model is not None and model != state.pair.name:
        shown = repr(model)[:100]
        raise RequestError(404, f"model {shown} is not served here; this server serves '{state.pair.name}' "
                                "(GET /v1/model)", "model_not_found")
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError(400, f"encoding_format {encoding!r} is not supported; use 'float' or 'base64'",
                           "invalid_field")
    if data.get("dimensions") is not None:
        raise RequestError(400, "'dimensions' is not supported: the encoder's output size is fixed", "invalid_field")
    texts = check_texts(body_field(data, "input"), "input", state.limits)
    emb, usage = await _texts(state, texts)
    return _answer(state, emb, usage, encoding)
