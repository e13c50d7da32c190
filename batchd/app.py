"""The HTTP API (Starlette). Maps batchd's errors to status codes in one table.

Decoding and preprocessing run in a bounded thread pool; the model runs on its batcher's
thread; the event loop only moves bytes and futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd import __version__
from batchd.auth import BearerAuthMiddleware, resolve_token
from batchd.config import Config
from batchd.errors import (
    BadInput,
    BatchdError,
    DeadlineExceeded,
    InvalidParameter,
    ModelFailed,
    ModelOverloaded,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
    WorkerDead,
)
from batchd.metrics import Metrics
from batchd.payload import BodyLimitMiddleware, read_image_payload
from batchd.runtime import ModelSlot, Runtime

logger = logging.getLogger("batchd.app")
T = TypeVar("T")

TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; only ever seen in metrics

# The one place where errors become HTTP status codes. 503s carry Retry-After.
STATUS_FOR_ERROR: list[tuple[type[BatchdError], int]] = [
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InvalidParameter, 422),
    (BadInput, 400),
    (Unauthorized, 401),
    (UnknownModel, 404),
    (QueueFull, 503),
    (QueueTimeout, 503),
    (ModelOverloaded, 503),
    (ShuttingDown, 503),
    (WorkerDead, 503),
    (NotReady, 503),
    (DeadlineExceeded, 504),
    (ModelFailed, 500),
]


def status_for(error: BatchdError) -> int:
    for error_type, status in STATUS_FOR_ERROR:
        if isinstance(error, error_type):
            return status
    return 500


def error_response(error: BatchdError, headers: dict[str, str] | None = None) -> JSONResponse:
    status = status_for(error)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    return JSONResponse({"error": str(error), "reason": error.reason}, status, headers=headers)


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the server is starting")
    return runtime


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    try:
        runtime = runtime_of(request)
    except NotReady:
        return JSONResponse({"status": "starting"}, 503, headers={"Retry-After": RETRY_AFTER_S})
    reasons = runtime.not_ready_reasons()
    if reasons:
        return JSONResponse({"status": "not ready", "reasons": reasons}, 503,
                            headers={"Retry-After": RETRY_AFTER_S})
    return JSONResponse({"status": "ready"})


def describe(slot: ModelSlot) -> dict[str, Any]:
    batching = slot.config.batching
    pre = slot.config.preprocess
    return {
        "name": slot.name,
        "input_shape": list(slot.model.input_shape),
        "labels": list(slot.model.labels),
        "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": list(pre.mean),
                       "std": list(pre.std), "color_mode": pre.color_mode},
        "batching": {"max_batch_size": batching.max_batch_size,
                     "max_wait_ms": batching.max_wait_ms,
                     "buckets": list(batching.bucket_sizes),
                     "max_queue_size": batching.max_queue_size,
                     "queue_timeout_ms": batching.queue_timeout_ms},
        "device": str(slot.model.device),
        "compiled": slot.config.runtime.compile,
        "ready": slot.ready,
    }


async def list_models(request: Request) -> Response:
    runtime = runtime_of(request)
    default = runtime.config.server.default_model
    return JSONResponse({"default": default,
                         "models": [describe(slot) for slot in runtime.slots.values()]})


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def parse_top_k(request: Request, num_labels: int) -> int:
    raw = request.query_params.get("top_k", "3")
    try:
        top_k = int(raw)
    except ValueError:
        raise InvalidParameter(f"top_k must be an integer, not {raw!r}") from None
    if not 1 <= top_k <= num_labels:
        raise InvalidParameter(f"top_k must be between 1 and {num_labels}, not {top_k}")
    return top_k


def parse_timeout(request: Request) -> float | None:
    """The client's queue deadline in seconds, from the timeout header (may only shorten)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        timeout_ms = float(raw)
    except ValueError:
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    if not timeout_ms > 0:
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be positive")
    return timeout_ms / 1000.0


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def cancel_on_disconnect(
    request: Request, work: Coroutine[Any, Any, T]
) -> tuple[bool, T | None]:
    """Await `work`, cancelling it if the client goes away first. Returns (disconnected, result).

    Only call once the body has been read: after that, receive() yields nothing but the
    disconnect message.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watcher, work_task):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    if work_task.cancelled():
        return True, None
    return False, work_task.result()


async def predict(request: Request) -> Response:
    started = time.perf_counter()
    runtime = runtime_of(request)
    name = request.path_params.get("name", runtime.config.server.default_model)
    headers = {"X-Request-ID": request_id_of(request)}
    slot = runtime.slots.get(name)
    if slot is None:
        return error_response(UnknownModel(f"no model named {name!r}"), headers)
    metrics: Metrics = request.app.state.metrics
    with runtime.track():
        return await _predict(request, runtime, slot, metrics, headers, started)


async def _predict(request: Request, runtime: Runtime, slot: ModelSlot, metrics: Metrics,
                   headers: dict[str, str], started: float) -> Response:
    name = slot.name
    try:
        if runtime.draining:
            raise ShuttingDown("the server is shutting down")
        if not slot.ready:
            raise NotReady(f"model {name!r} is not ready: "
                           f"{runtime.not_ready_reasons().get(name, 'unknown')}")
        top_k = parse_top_k(request, len(slot.model.labels))
        timeout_s = parse_timeout(request)
        with slot.batcher.expecting():
            data = await read_image_payload(request, runtime.config.server.max_body_bytes)
            item = await anyio.to_thread.run_sync(
                slot.model.preprocessor.load, data, limiter=request.app.state.preprocess_limiter
            )
        disconnected, result = await cancel_on_disconnect(
            request, slot.batcher.submit(item, timeout_s)
        )
    except BatchdError as error:
        response = error_response(error, headers)
        metrics.request_done(name, error.reason, response.status_code,
                             time.perf_counter() - started)
        return response
    if disconnected or result is None:
        metrics.request_done(name, "cancelled", CLIENT_CLOSED, time.perf_counter() - started)
        return Response(status_code=CLIENT_CLOSED)
    predictions = [{"label": label, "prob": prob}
                   for label, prob in slot.model.top_k(result.output, top_k)]
    headers["Server-Timing"] = (f"queue;dur={result.queue_wait_s * 1000:.2f}, "
                                f"compute;dur={result.compute_s * 1000:.2f}, "
                                f'batch;desc="{result.batch_size}"')
    metrics.request_done(name, "success", 200, time.perf_counter() - started)
    return JSONResponse({"model": name, "predictions": predictions}, headers=headers)


async def not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"no route {request.url.path}", "reason": "not_found"}, 404)


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}",
                         "reason": "method_not_allowed"}, 405,
                        headers=getattr(exc, "headers", None))


def create_app(
    config: Config, on_fatal: Callable[[str], None] | None = None
) -> Starlette:
    """The batchd ASGI app for `config`. Models load in the lifespan start-up."""
    max_batch = max(model.batching.max_batch_size for model in config.models)
    metrics = Metrics(max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.preprocess_limiter = anyio.CapacityLimiter(config.server.preprocess_threads)
        runtime = await anyio.to_thread.run_sync(Runtime.load, config, metrics)
        runtime.warm_task = asyncio.create_task(runtime.warm_up(on_fatal))
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.shutdown()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/models/{name}/predict", predict, methods=["POST"]),
    ]
    middleware = [Middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)]
    token = resolve_token(config.server)
    if token is not None:
        middleware.insert(0, Middleware(BearerAuthMiddleware, token=token))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
    app.state.metrics = metrics
    app.state.config = config
    app.state.version = __version__
    return app


def begin_shutdown(app: Starlette) -> None:
    """Turn readiness off and refuse new predictions at once (called on SIGTERM)."""
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    if runtime is not None:
        runtime.start_draining()
