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
decoding thread pool.
"""

from __future__ import annotations

import asyncio
import re

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd import __version__
from batchd.errors import UnknownModel
from batchd.http.frame import (
    AnySlot,
    cancel_on_disconnect,
    note_batch,
    runtime_of,
    serve_prediction,
)
from batchd.http.v2_codec import (
    HEADER_LENGTH,
    INPUT_IMAGES,
    INPUT_TENSOR,
    OUTPUTS,
    encode_response,
    parse_request,
)

PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "classification"]
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
    slot = model_slot(request)
    ready = runtime_of(request).slot_status(slot).ready
    return JSONResponse({"name": slot.name, "ready": ready}, 200 if ready else NOT_READY)


async def model_metadata(request: Request) -> Response:
    slot = model_slot(request)
    channels, height, width = slot.model.input_shape
    classes = slot.model.num_classes
    return JSONResponse({
        "name": slot.name,
        "versions": loaded_versions(request, slot),
        "platform": PLATFORM,
        "inputs": [
            {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, classes]}
                    for name in OUTPUTS],
        # A request sends `inputs` as listed, or this one in its place (never both).
        "parameters": {"alternative_inputs": [
            {"name": INPUT_IMAGES, "datatype": "BYTES", "shape": [-1]},
        ]},
    })


async def model_config(request: Request) -> Response:
    """The model's configuration in Triton's shape (model_config.proto as JSON), for
    clients and tools that read it (tritonclient's get_model_config, perf_analyzer):
    dims leave out the batch dimension, as they do where max_batch_size > 0."""
    slot = model_slot(request)
    batching = slot.config.batching
    on_gpu = slot.model.device.type == "cuda"
    queue_policy = {"timeout_action": "REJECT",
                    "default_timeout_microseconds": int(batching.queue_timeout_ms * 1000),
                    "allow_timeout_override": True,
                    "max_queue_size": batching.max_queue_size}
    return JSONResponse({
        "name": slot.name,
        "platform": "pytorch_libtorch",
        "backend": PLATFORM,
        "version_policy": {"specific": {"versions": [
            int(version) for version in loaded_versions(request, slot)]}},
        "max_batch_size": batching.max_batch_size,
        "input": [{"name": INPUT_TENSOR, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                   "dims": list(slot.model.input_shape)}],
        "output": [{"name": name, "data_type": "TYPE_FP32",
                    "dims": [slot.model.num_classes]} for name in OUTPUTS],
        "dynamic_batching": {
            "preferred_batch_size": list(batching.bucket_sizes),
            "max_queue_delay_microseconds": int(batching.max_wait_ms * 1000),
            "priority_levels": batching.priority_levels,
            "default_priority_level": batching.default_level,
            "default_queue_policy": queue_policy,
        },
        "instance_group": [{"name": slot.name, "count": 1,
                            "kind": "KIND_GPU" if on_gpu else "KIND_CPU"}],
        # the encoded-image input a request may send in the tensor's place
        "parameters": {"alternative_input": {"string_value": f"{INPUT_IMAGES}:BYTES[-1]"}},
    })


async def infer(request: Request) -> Response:
    return await serve_prediction(request, request.path_params["name"], _infer,
                                  requested_version)


async def _infer(request: Request, slot: AnySlot, headers: dict[str, str]) -> Response | None:
    body = await request.body()
    limiter = slot.preprocess_limiter
    parsed = await anyio.to_thread.run_sync(
        parse_request, body, request.headers.get(HEADER_LENGTH), slot.model.input_shape,
        slot.model.num_classes, slot.config.batching.request_item_limit, limiter=limiter)
    count = len(parsed.images if parsed.images is not None else parsed.tensors or [])
    async with slot.admit(count, parsed.priority) as ticket:
        served = ticket.slot  # the version the engine admitted it to (a reload may swap)
        if parsed.images is not None:
            items = list(await asyncio.gather(*(served.preprocess(image, parsed.priority)
                                                for image in parsed.images)))
        else:
            assert parsed.tensors is not None
            items = parsed.tensors
        disconnected, results = await cancel_on_disconnect(
            request, ticket.submit(items, parsed.timeout_s))
    if disconnected or results is None:
        return None
    note_batch(request, max(results, key=lambda result: result.queue_wait_s))
    content, media_type, extra = await anyio.to_thread.run_sync(
        encode_response, served.name, served.version, served.model.labels, parsed, results,
        limiter=limiter)
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
