"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data and
classification extensions, so Triton and KServe clients work unmodified.

A model takes one of two inputs per request:
  - `input`: FP32 [N, C, H, W], already preprocessed (normalised) by the client; the
    input the model metadata lists;
  - `image`: BYTES [N], encoded images that batchd decodes and preprocesses itself; listed
    in the metadata's `parameters.alternative_inputs`.
and two outputs: `logits` and `probabilities`, FP32 [N, num_classes]. A request's N samples
go to the dynamic batcher as N items and come back in order.

The event loop only moves bytes and futures: parsing the JSON header, decoding base64,
building arrays from nested lists and encoding the answer (batchd.http.v2_codec) run in the
decoding thread pool, except for messages of at most 16 KiB, which cost less than the
hand-over (batchd.inference.run_codec).
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd import __version__
from batchd.errors import UnknownModel
from batchd.http.disconnect import cancel_on_disconnect
from batchd.http.frame import (
    arrival_of,
    header,
    note_batch,
    runtime_of,
    serve_prediction,
    server_timing,
)
from batchd.http.v2_codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    config_body,
    encode_response,
    metadata_body,
    parse_request,
)
from batchd.inference import answer_bytes, infer_parsed, run_codec
from batchd.views import AnySlot

NOT_READY = 400  # the protocol: "a 4xx status code indicates false"
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def model_slot(request: Request) -> AnySlot:
    """The model version a call names, or the newest loaded (UnknownModel -> 404)."""
    return runtime_of(request).find_slot(request.path_params["name"], requested_version(request))


def requested_version(request: Request) -> int | None:
    raw = request.path_params.get("version")
    if raw is None:
        return None
    if not _VERSION.fullmatch(raw):
        raise UnknownModel(f"no version {raw[:20]!r} of model {request.path_params['name']!r}")
    return int(raw)


def loaded_versions(request: Request, slot: AnySlot) -> list[str]:
    return [str(version) for version in sorted(runtime_of(request).versions.get(slot.name, {}))]


async def server_metadata(request: Request) -> Response:
    repository = ["model_repository"] if request.app.state.admin_token else []
    return JSONResponse({"name": "batchd", "version": __version__,
                         "extensions": [*EXTENSIONS, *repository]})


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    ready = runtime_of(request).ready
    return JSONResponse({"ready": ready}, 200 if ready else NOT_READY)


async def model_ready(request: Request) -> Response:
    name = request.path_params["name"]
    ready = runtime_of(request).version_status(name, requested_version(request)).ready
    return JSONResponse({"name": name, "ready": ready}, 200 if ready else NOT_READY)


async def model_metadata(request: Request) -> Response:
    slot = model_slot(request)
    return JSONResponse(metadata_body(slot, loaded_versions(request, slot)))


async def model_config(request: Request) -> Response:
    """The model's configuration in Triton's shape (batchd.http.v2_codec.config_body)."""
    slot = model_slot(request)
    return JSONResponse(config_body(slot, loaded_versions(request, slot)))


async def infer(request: Request) -> Response:
    return await serve_prediction(request, request.path_params["name"], _infer,
                                  requested_version)


async def _infer(request: Request, slot: AnySlot, headers: dict[str, str]) -> Response | None:
    body = await request.body()
    limiter = slot.preprocess_limiter
    parsed = await run_codec(
        len(body), limiter, parse_request, body, header(request, HEADER_LENGTH),
        slot.model.input_shape, slot.model.num_classes, slot.config.batching.request_item_limit)
    served, results = await infer_parsed(slot, parsed, parsed.timeout_s, arrival_of(request),
                                         lambda work: cancel_on_disconnect(request, work))
    if results is None:
        return None
    slowest = max(results, key=lambda result: result.queue_wait_s)
    note_batch(request, slowest)
    headers["Server-Timing"] = server_timing(slowest)
    content, media_type, extra = await run_codec(
        answer_bytes(results), limiter, encode_response, served.name, served.version,
        served.model.labels, parsed, results)
    return Response(content, media_type=media_type, headers={**headers, **extra})


def routes() -> list[Route]:
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        *(Route(base, model_metadata, methods=["GET"]) for base in (model, versioned)),
        *(Route(f"{base}/config", model_config, methods=["GET"]) for base in (model, versioned)),
        *(Route(f"{base}/ready", model_ready, methods=["GET"]) for base in (model, versioned)),
        *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (model, versioned)),
    ]
