"""The native HTTP API (Starlette) and the app that serves it beside the v2 protocol.

Decoding and preprocessing run in a bounded thread pool; the model runs on its batcher's
thread; the event loop only moves bytes and futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd import __version__, v2
from batchd.auth import BearerAuthMiddleware, resolve_token
from batchd.config import Config
from batchd.errors import BatchdError, InvalidParameter, NotReady
from batchd.http_common import (
    RETRY_AFTER_S,
    TIMEOUT_HEADER,
    cancel_on_disconnect,
    error_response,
    note_batch,
    runtime_of,
    serve_prediction,
)
from batchd.metrics import Metrics
from batchd.payload import BodyLimitMiddleware, read_image_payload
from batchd.runtime import ModelSlot, Runtime

logger = logging.getLogger("batchd.app")

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
        "compiled_buckets": [size for size in batching.bucket_sizes
                             if slot.config.runtime.compile
                             and size not in slot.model.eager_buckets],
        "dtype": slot.config.runtime.dtype,
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


async def predict(request: Request) -> Response:
    runtime = runtime_of(request)
    name = request.path_params.get("name", runtime.config.server.default_model)
    return await serve_prediction(request, name, _predict)


async def _predict(request: Request, slot: ModelSlot, headers: dict[str, str]) -> Response | None:
    runtime = runtime_of(request)
    top_k = parse_top_k(request, len(slot.model.labels))
    timeout_s = parse_timeout(request)
    with slot.batcher.expecting():
        data = await read_image_payload(request, runtime.config.server.max_body_bytes)
        item = await anyio.to_thread.run_sync(
            slot.model.preprocessor.load, data, limiter=request.app.state.preprocess_limiter
        )
    disconnected, result = await cancel_on_disconnect(request, slot.batcher.submit(item, timeout_s))
    if disconnected or result is None:
        return None
    note_batch(request, result)
    predictions = [{"label": label, "prob": prob}
                   for label, prob in slot.model.top_k(result.output, top_k)]
    headers["Server-Timing"] = (f"queue;dur={result.queue_wait_s * 1000:.2f}, "
                                f"compute;dur={result.compute_s * 1000:.2f}, "
                                f'batch;desc="{result.batch_size}"')
    return JSONResponse({"model": slot.name, "predictions": predictions}, headers=headers)


async def batchd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchdError)  # registered for BatchdError only
    return error_response(exc)


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
        *v2.routes(),
    ]
    middleware = [Middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)]
    token = resolve_token(config.server)
    if token is not None:
        middleware.insert(0, Middleware(BearerAuthMiddleware, token=token))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={404: not_found, 405: method_not_allowed, BatchdError: batchd_error},
    )
    if config.server.access_log:
        enable_access_log()
    app.state.metrics = metrics
    app.state.config = config
    app.state.version = __version__
    return app


def enable_access_log() -> None:
    """Write access-log lines, bare JSON, to standard output."""
    access = logging.getLogger("batchd.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def begin_shutdown(app: Starlette) -> None:
    """Turn readiness off and refuse new predictions at once (called on SIGTERM)."""
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    if runtime is not None:
        runtime.start_draining()
