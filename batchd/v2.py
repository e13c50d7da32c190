"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data and
classification extensions, so Triton and KServe clients work unmodified.

Each model has two alternative inputs (a request sends one of them):
  - `input`: FP32 [N, C, H, W], already preprocessed (normalised) by the client;
  - `image`: BYTES [N], encoded images that batchd decodes and preprocesses itself.
and two outputs: `logits` and `probabilities`, FP32 [N, num_classes]. A request's N samples
go to the dynamic batcher as N items and come back in order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import numpy as np
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd import __version__
from batchd.batcher import BatchResult
from batchd.errors import BadInput, UnknownModel
from batchd.http_common import (
    cancel_on_disconnect,
    note_batch,
    runtime_of,
    serve_prediction,
)
from batchd.runtime import ModelSlot

INPUT_TENSOR = "input"
INPUT_IMAGES = "image"
OUTPUTS = ("logits", "probabilities")
VERSION = "1"
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "classification", "schedule_policy"]
HEADER_LENGTH = "inference-header-content-length"
NOT_READY = 400  # the protocol: "a 4xx status code indicates false"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


def model_slot(request: Request) -> ModelSlot:
    name = request.path_params["name"]
    version = request.path_params.get("version", VERSION)
    slot = runtime_of(request).slots.get(name)
    if slot is None or version != VERSION:
        raise UnknownModel(f"no model named {name!r} with version {version!r}")
    return slot


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "batchd", "version": __version__, "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    ready = runtime_of(request).ready
    return JSONResponse({"ready": ready}, 200 if ready else NOT_READY)


async def model_ready(request: Request) -> Response:
    slot = model_slot(request)  # an unknown model's UnknownModel becomes 404 in the app
    ready = slot.ready and not runtime_of(request).draining
    return JSONResponse({"name": slot.name, "ready": ready}, 200 if ready else NOT_READY)


async def model_metadata(request: Request) -> Response:
    slot = model_slot(request)
    channels, height, width = slot.model.input_shape
    classes = slot.model.num_classes
    return JSONResponse({
        "name": slot.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [
            {"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, channels, height, width]},
            {"name": INPUT_IMAGES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, classes]}
                    for name in OUTPUTS],
    })


async def infer(request: Request) -> Response:
    slot = model_slot(request)
    return await serve_prediction(request, slot.name, _infer)


async def _infer(request: Request, slot: ModelSlot, headers: dict[str, str]) -> Response | None:
    payload, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(f"'inputs' must hold exactly one input: {INPUT_TENSOR!r} (FP32) or "
                       f"{INPUT_IMAGES!r} (BYTES)")
    spec = inputs[0]
    outputs = requested_outputs(payload, slot.model.num_classes)
    timeout_s = requested_timeout(payload)
    if spec.get("name") == INPUT_IMAGES:
        images = bytes_elements(spec, binary)
        with slot.batcher.expecting(len(images)):
            limiter = request.app.state.preprocess_limiter
            items = list(await asyncio.gather(*(
                anyio.to_thread.run_sync(slot.model.preprocessor.load, image, limiter=limiter)
                for image in images)))
    elif spec.get("name") == INPUT_TENSOR:
        items = list(fp32_tensor(spec, binary, slot.model.input_shape).unbind(0))
    else:
        raise BadInput(f"unknown input {spec.get('name')!r}: expected {INPUT_TENSOR!r} or "
                       f"{INPUT_IMAGES!r}")
    disconnected, results = await cancel_on_disconnect(
        request, submit_all(slot, items, timeout_s))
    if disconnected or results is None:
        return None
    note_batch(request, max(results, key=lambda result: result.queue_wait_s))
    logits = torch.stack([result.output for result in results]).numpy()
    return encode_response(slot, payload, logits, outputs, headers)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor data that follows it."""
    json_end = len(body)
    if header_length is not None:
        try:
            json_end = int(header_length)
        except ValueError:
            raise BadInput(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= json_end <= len(body):
            raise BadInput(f"{HEADER_LENGTH} {json_end} does not fit a body of {len(body)} "
                           "bytes")
    try:
        payload = json.loads(body[:json_end])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadInput("the inference request must be a JSON object")
    return payload, body[json_end:]


def binary_slice(spec: dict[str, Any], binary: bytes) -> bytes | None:
    """This input's binary data (the only input, so it starts at offset 0), or None."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
        raise BadInput(f"binary_data_size {size!r} does not match the {len(binary)} bytes "
                       "after the JSON header")
    return binary[:size]


def shape_of(spec: dict[str, Any]) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
        raise BadInput("'shape' must be a list of non-negative integers")
    return shape


def fp32_tensor(spec: dict[str, Any], binary: bytes, input_shape: tuple[int, ...]) -> torch.Tensor:
    if spec.get("datatype") != "FP32":
        raise BadInput(f"input {INPUT_TENSOR!r} must have datatype FP32, not "
                       f"{spec.get('datatype')!r}")
    shape = shape_of(spec)
    if len(shape) != 4 or tuple(shape[1:]) != input_shape or shape[0] < 1:
        raise BadInput(f"input {INPUT_TENSOR!r} must have shape [N, "
                       f"{', '.join(map(str, input_shape))}] with N >= 1, not {shape}")
    count = math.prod(shape)
    raw = binary_slice(spec, binary)
    if raw is not None:
        if len(raw) != count * 4:
            raise BadInput(f"shape {shape} needs {count * 4} bytes of FP32, got {len(raw)}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise BadInput(f"input {INPUT_TENSOR!r}: 'data' must be a flat or nested list "
                           "of numbers") from None
        if array.size != count:
            raise BadInput(f"shape {shape} holds {count} values but 'data' has {array.size}")
    if not np.isfinite(array).all():
        raise BadInput(f"input {INPUT_TENSOR!r} holds NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32).reshape(shape))


def bytes_elements(spec: dict[str, Any], binary: bytes) -> list[bytes]:
    """The encoded images of a BYTES input: length-prefixed binary, or base64 in JSON."""
    if spec.get("datatype") != "BYTES":
        raise BadInput(f"input {INPUT_IMAGES!r} must have datatype BYTES, not "
                       f"{spec.get('datatype')!r}")
    shape = shape_of(spec)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise BadInput(f"input {INPUT_IMAGES!r} must have shape [N] (or [N, 1]), not {shape}")
    count = shape[0]
    raw = binary_slice(spec, binary)
    if raw is not None:
        elements = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise BadInput("BYTES data ends inside an element's length prefix")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise BadInput("a BYTES element is longer than the data that holds it")
            elements.append(raw[offset:offset + length])
            offset += length
    else:
        data = spec.get("data")
        if isinstance(data, list) and data and isinstance(data[0], list):
            data = [item for row in data for item in (row if isinstance(row, list) else [row])]
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise BadInput(f"input {INPUT_IMAGES!r}: JSON 'data' must be a list of "
                           "base64-encoded images")
        try:
            elements = [base64.b64decode(item, validate=True) for item in data]
        except binascii.Error:
            raise BadInput(f"input {INPUT_IMAGES!r}: an element is not valid base64") from None
    if len(elements) != count:
        raise BadInput(f"shape {shape} declares {count} images but the data holds "
                       f"{len(elements)}")
    return elements


def requested_outputs(payload: dict[str, Any], num_classes: int) -> list[RequestedOutput]:
    parameters = payload.get("parameters") or {}
    binary_default = bool(parameters.get("binary_data_output", False))
    asked = payload.get("outputs")
    if asked is None:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(asked, list):
        raise BadInput("'outputs' must be a list")
    outputs = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise BadInput(f"unknown output {name!r}: expected one of {list(OUTPUTS)}")
        params = item.get("parameters") or {}
        classes = params.get("classification", 0)
        if not isinstance(classes, int) or isinstance(classes, bool) or \
                not 0 <= classes <= num_classes:
            raise BadInput(f"classification must be an integer from 0 to {num_classes}")
        outputs.append(RequestedOutput(name, bool(params.get("binary_data", binary_default)),
                                       classes))
    return outputs


def requested_timeout(payload: dict[str, Any]) -> float | None:
    """Triton's schedule-policy `timeout` parameter (microseconds), as seconds."""
    timeout_us = (payload.get("parameters") or {}).get("timeout")
    if timeout_us is None or timeout_us == 0:
        return None
    if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
        raise BadInput("parameter 'timeout' must be a non-negative integer of microseconds")
    return timeout_us / 1e6


async def submit_all(slot: ModelSlot, items: list[torch.Tensor],
                     timeout_s: float | None) -> list[BatchResult[torch.Tensor]]:
    """Queue every sample; if one fails, cancel the rest and raise its error."""
    tasks = [asyncio.ensure_future(slot.batcher.submit(item, timeout_s)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def encode_response(slot: ModelSlot, payload: dict[str, Any], logits: np.ndarray,
                    outputs: list[RequestedOutput], headers: dict[str, str]) -> Response:
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    values = {"logits": logits.astype(np.float32), "probabilities": probabilities}
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        array = values[output.name]
        if output.classification:
            strings = classify(array, output.classification, slot.model.labels)
            shape, datatype = [len(strings), output.classification], "BYTES"
            flat: list[Any] = [item for row in strings for item in row]
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in flat)
        else:
            shape, datatype = list(array.shape), "FP32"
            flat = array.reshape(-1).tolist()
            raw = array.astype("<f4").tobytes()
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = flat
        described.append(entry)
    body: dict[str, Any] = {"model_name": slot.name, "model_version": VERSION,
                            "outputs": described}
    if "id" in payload:
        body["id"] = payload["id"]
    if not chunks:
        return JSONResponse(body, headers=headers)
    header = json.dumps(body, separators=(",", ":")).encode()
    headers[HEADER_LENGTH] = str(len(header))
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers=headers)


def classify(array: np.ndarray, count: int, labels: tuple[str, ...]) -> list[list[str]]:
    """Triton's classification extension: "value:index:label", highest value first."""
    rows = []
    for row in array:
        order = np.argsort(-row, kind="stable")[:count]
        rows.append([f"{row[i]:f}:{i}:{labels[i]}" for i in order])
    return rows


def routes() -> list[Route]:
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
        *(Route(base, model_metadata, methods=["GET"]) for base in (model, versioned)),
        *(Route(f"{base}/ready", model_ready, methods=["GET"]) for base in (model, versioned)),
        *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (model, versioned)),
    ]
