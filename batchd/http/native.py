"""The native API: health, readiness, the model list, metrics, and /predict."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.config_checks import COMPILING_RUNTIMES
from batchd.errors import InvalidParameter
from batchd.http.disconnect import cancel_on_disconnect
from batchd.http.frame import (
    PRIORITY_HEADER,
    RETRY_AFTER_S,
    TIMEOUT_HEADER,
    arrival_of,
    header,
    note_batch,
    query_param,
    runtime_of,
    serve_prediction,
    server_timing,
)
from batchd.http.payload import read_image_payload
from batchd.runtime import ModelStatus
from batchd.views import AnySlot


async def health(request: Request) -> Response:
    """Liveness: 200 while the process runs (also while draining)."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: 200 when every model is ready, else 503 with the reasons by model."""
    reasons = runtime_of(request).not_ready_reasons()
    if reasons:
        return JSONResponse({"status": "not ready", "reasons": reasons}, 503,
                            headers={"Retry-After": RETRY_AFTER_S})
    return JSONResponse({"status": "ready"})


def describe(slot: AnySlot, status: ModelStatus) -> dict[str, Any]:
    batching = slot.config.batching
    pre = slot.config.preprocess
    return {
        "name": slot.name,
        "version": str(slot.version),
        "input_shape": list(slot.model.input_shape),
        "labels": list(slot.model.labels),
        "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": list(pre.mean),
                       "std": list(pre.std), "color_mode": pre.color_mode},
        "batching": {"max_batch_size": batching.max_batch_size,
                     "max_wait_ms": batching.max_wait_ms,
                     "buckets": list(batching.bucket_sizes),
                     "max_queue_size": batching.max_queue_size,
                     "queue_timeout_ms": batching.queue_timeout_ms,
                     "priority_levels": batching.priority_levels,
                     "default_priority": batching.default_level},
        "device": str(slot.model.device),
        "compiled": slot.config.runtime.compile,
        "compiled_buckets": [size for size, name in sorted(slot.model.bucket_runtime.items())
                             if name in COMPILING_RUNTIMES],
        "runtimes": {str(size): name for size, name in sorted(slot.model.bucket_runtime.items())},
        "dtype": slot.config.runtime.dtype,
        "ready": status.ready,
        "state": status.state.value,
        "reason": status.reason,
    }


async def list_models(request: Request) -> Response:
    """Every model: input shape, labels, preprocessing, batching, device and status."""
    runtime = runtime_of(request)
    return JSONResponse({
        "default": runtime.default_model,
        "models": [{**describe(slot, runtime.slot_status(slot)),
                    "versions": [str(version) for version in sorted(runtime.versions[name])]}
                   for name, slot in runtime.slots.items()],
    })


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics."""
    exposition = await runtime_of(request).metrics_exposition()
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)


# Plain ASCII numbers only: int() and float() would also take " 3 ", "1_0", "٣" and "1e-300".
_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


def parse_top_k(request: Request, num_labels: int) -> int:
    raw = query_param(request, "top_k")
    if raw is None:
        raw = "3"
    if not _INTEGER.fullmatch(raw):
        raise InvalidParameter(f"top_k must be a plain integer, not {raw[:20]!r}")
    top_k = int(raw)
    if not 1 <= top_k <= num_labels:
        raise InvalidParameter(f"top_k must be between 1 and {num_labels}, not {top_k}")
    return top_k


def parse_priority(request: Request) -> int:
    """The request's priority level from X-Priority (Triton's meaning: 1 is the most
    urgent; 0 or absent, the model's default level)."""
    raw = header(request, PRIORITY_HEADER)
    if raw is None:
        return 0
    if not _INTEGER.fullmatch(raw):
        raise InvalidParameter(f"{PRIORITY_HEADER} must be a plain integer, not {raw[:20]!r}")
    return int(raw)


def parse_timeout(request: Request) -> float | None:
    """The client's queue deadline in seconds, from the timeout header (may only shorten)."""
    raw = header(request, TIMEOUT_HEADER)
    if raw is None:
        return None
    if not _DECIMAL.fullmatch(raw):
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be a plain decimal number of "
                               f"milliseconds, not {raw[:20]!r}")
    timeout_ms = float(raw)
    if not timeout_ms > 0:
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be positive")
    return timeout_ms / 1000.0


def parse_version(request: Request) -> int | None:
    """The model version a request names (?version=N), or None: the newest loaded."""
    raw = query_param(request, "version")
    if raw is None:
        return None
    if not _INTEGER.fullmatch(raw) or int(raw) < 1:
        raise InvalidParameter(f"version must be a positive integer, not {raw[:20]!r}")
    return int(raw)


async def predict(request: Request) -> Response:
    name = request.path_params.get("name", runtime_of(request).default_model)
    return await serve_prediction(request, name, _predict, parse_version)


async def _predict(request: Request, slot: AnySlot, headers: dict[str, str]) -> Response | None:
    top_k = parse_top_k(request, len(slot.model.labels))
    timeout_s = parse_timeout(request)
    priority = parse_priority(request)
    async with slot.admit(1, priority, arrival_of(request)) as ticket:
        served = ticket.slot  # the version the engine admitted it to (a reload may swap)
        data = await read_image_payload(request, runtime_of(request).config.server.max_body_bytes)
        item = await served.preprocess(data, priority)
        disconnected, results = await cancel_on_disconnect(
            request, ticket.submit([item], timeout_s))
    if disconnected or results is None:
        return None
    result = results[0]
    note_batch(request, result)
    predictions = [{"label": label, "prob": prob}
                   for label, prob in served.model.top_k(result.output, top_k)]
    headers["Server-Timing"] = server_timing(result)
    return JSONResponse({"model": served.name, "version": str(served.version),
                         "predictions": predictions}, headers=headers)


def routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/models/{name}/predict", predict, methods=["POST"]),
    ]
