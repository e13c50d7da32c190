"""The frame every prediction shares, on the native API and the Open Inference Protocol
alike: the one table that maps batchd's errors to HTTP status codes, request ids,
admission (draining, readiness), metrics and the access log."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from batchd.batcher import BatchResult
from batchd.errors import (
    BadInput,
    BatchdError,
    DeadlineExceeded,
    InvalidParameter,
    LoadFailed,
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
    lookup_by_class,
)
from batchd.request_log import AccessLine, request_id_from
from batchd.views import AnyRuntime, AnySlot

logger = logging.getLogger("batchd.http")

TIMEOUT_HEADER = "x-request-timeout-ms"
PRIORITY_HEADER = "x-priority"
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # nginx's code for "client closed request"; only ever seen in metrics

# The one place where errors become HTTP status codes, looked up along the error's class
# hierarchy (its most specific listed class wins). 503s carry Retry-After.
STATUS_FOR_ERROR: dict[type[BatchdError], int] = {
    BadInput: 400,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    # as Triton answers a failed load; the message says what failed
    LoadFailed: 400,
    Unauthorized: 401,
    UnknownModel: 404,
    QueueFull: 503,
    QueueTimeout: 503,
    ModelOverloaded: 503,
    ShuttingDown: 503,
    WorkerDead: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    ModelFailed: 500,
}


def status_for(error: BatchdError) -> int:
    return lookup_by_class(STATUS_FOR_ERROR, error, 500)


def error_response(error: BatchdError, headers: dict[str, str] | None = None) -> JSONResponse:
    status = status_for(error)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="batchd"'
    return JSONResponse({"error": str(error), "reason": error.reason}, status, headers=headers)


def runtime_of(request: Request) -> AnyRuntime:
    runtime: AnyRuntime = request.app.state.runtime
    return runtime


def header(request: Request, name: str) -> str | None:
    """Request header `name` (lower case), the first if repeated, as Starlette gives it.

    Starlette's Headers looks each name up along the whole list, through Mapping.get and
    a KeyError when it is absent; a prediction asks for four or five. One dict of the raw
    headers, made once a request, answers each in one lookup (seen in a profile: 8 % of
    the event loop's time)."""
    scope = request.scope
    headers = scope.get("batchd.headers")
    if headers is None:
        headers = scope["batchd.headers"] = dict(reversed(scope["headers"]))
    value = headers.get(name.encode("latin-1"))
    return None if value is None else value.decode("latin-1")


def query_param(request: Request, name: str) -> str | None:
    """Query parameter `name`, the first if repeated; most predictions send no query
    string, and then Starlette's parse of it is skipped."""
    if not request.scope.get("query_string"):
        return None
    return request.query_params.get(name)


def arrival_of(request: Request) -> float:
    """When the prediction frame took `request` up, on the monotonic clock: a latency
    objective counts from it."""
    arrived: float = request.scope["batchd.arrived"]
    return arrived


def request_id_of(request: Request) -> str:
    return request_id_from(header(request, "x-request-id"))


PredictionHandler = Callable[[Request, AnySlot, dict[str, str]], Awaitable[Response | None]]


async def serve_prediction(request: Request, name: str, handler: PredictionHandler,
                           version_of: Callable[[Request], int | None] | None = None
                           ) -> Response:
    """Run `handler` for model `name` (at the version `version_of` reads from the request,
    else the newest loaded) inside the frame every prediction shares.

    The frame resolves the model once (404 if unknown; 503 while draining or not ready),
    admits the request so that a drain waits for it (and, at the drain limit, answers it
    503 wherever it is: uploading, decoding, queued or computing), holds the version it
    resolved until the answer (a reload that swaps it out frees it only then), maps
    BatchdErrors to their status, and records the outcome and latency. A handler returns
    None when the client went away.
    """
    started = time.perf_counter()
    request.scope["batchd.arrived"] = time.monotonic()
    runtime = runtime_of(request)
    headers = {"X-Request-ID": request_id_of(request)}
    try:
        version = version_of(request) if version_of is not None else None
        slot = runtime.find_slot(name, version)
    except BatchdError as error:  # no such model or version: not counted, by design
        return error_response(error, headers)
    try:
        response = await runtime.serve_admitted(slot, lambda: handler(request, slot, headers))
    except BatchdError as error:
        response = error_response(error, headers)
        outcome = error.reason
    except ClientDisconnect:
        # The client left while sending its body: one line, no traceback, counted.
        logger.info("%s: client %s left while sending its request (%s)", name,
                    _peer(request), headers["X-Request-ID"])
        response, outcome = Response(status_code=CLIENT_CLOSED), "cancelled"
    else:
        outcome = "success"
        if response is None:
            outcome, response = "cancelled", Response(status_code=CLIENT_CLOSED)
    elapsed = time.perf_counter() - started
    runtime.metrics.request_done(name, outcome, response.status_code, elapsed)
    if runtime.config.server.access_log:
        log_access(request, headers["X-Request-ID"], name, response.status_code, outcome, elapsed)
    return response


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "(unknown)"


def note_batch(request: Request, result: BatchResult[Any]) -> None:
    """Remember how a request was served, for its access-log line."""
    request.state.queue_wait_s = result.queue_wait_s
    request.state.batch_size = result.batch_size


def server_timing(result: BatchResult[Any]) -> str:
    """The Server-Timing header of a prediction served as `result` (for several inputs,
    the one that waited longest)."""
    return (f"queue;dur={result.queue_wait_s * 1000:.2f}, "
            f"compute;dur={result.compute_s * 1000:.2f}, "
            f'batch;desc="{result.batch_size}"')


def log_access(request: Request, request_id: str, model: str, status: int, outcome: str,
               elapsed_s: float) -> None:
    AccessLine(request_id, model, request.method, request.url.path, status, outcome, elapsed_s,
               getattr(request.state, "queue_wait_s", None),
               getattr(request.state, "batch_size", None),
               getattr(runtime_of(request), "worker", None)).write()
