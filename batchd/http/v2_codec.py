"""The Open Inference Protocol's request and response bodies: parsing and checking an
inference request (JSON header, binary tensor data, base64 images) and encoding the answer.

Pure functions over bytes and arrays, with no Starlette and no event loop: the endpoints in
batchd.http.v2 run them in the decoding thread pool, so a large JSON body never stalls the
event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchd.batcher import BatchResult
from batchd.errors import BadInput, PayloadTooLarge
from batchd.views import AnySlot

INPUT_TENSOR = "input"
INPUT_IMAGES = "image"
OUTPUTS = ("logits", "probabilities")
HEADER_LENGTH = "inference-header-content-length"
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "classification"]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: exactly one of `images` and `tensors` is set."""

    images: list[bytes] | None
    tensors: list[torch.Tensor] | None
    outputs: list[RequestedOutput]
    timeout_s: float | None
    request_id: str | None
    priority: int = 0  # Triton's `priority` parameter: 1 the most urgent, 0 the default


def parse_request(body: bytes, header_length: str | None, input_shape: tuple[int, ...],
                  num_classes: int, max_items: int) -> InferRequest:
    """Parse and check a whole inference request (runs off the event loop)."""
    payload, binary = split_body(body, header_length)
    return parse_payload(payload, binary, input_shape, num_classes, max_items)


def parse_payload(payload: dict[str, Any], binary: bytes, input_shape: tuple[int, ...],
                  num_classes: int, max_items: int) -> InferRequest:
    """Check an inference request given as the JSON header's object and the binary data
    after it; the gRPC service hands its messages over in the same shape
    (batchd.grpc.codec), so both protocols accept and refuse the same requests."""
    request_id = payload.get("id")
    if "id" in payload and not isinstance(request_id, str):
        raise BadInput("'id' must be a string")
    parameters = parameters_of(payload, "the request")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(f"'inputs' must hold exactly one input: {INPUT_TENSOR!r} (FP32) or "
                       f"{INPUT_IMAGES!r} (BYTES)")
    spec = inputs[0]
    parameters_of(spec, "the input")
    outputs = requested_outputs(payload, parameters, num_classes)
    timeout_s = requested_timeout(parameters)
    priority = typed_parameter(parameters, "priority", int, 0)
    if priority < 0:
        raise BadInput("parameter 'priority' must be a non-negative integer")
    name = spec.get("name")
    shape = shape_of(spec)
    if shape and shape[0] > max_items:
        raise PayloadTooLarge(f"{shape[0]} samples in one request; the limit is {max_items} "
                              "(batching.max_request_items): send them in several requests")
    if name == INPUT_IMAGES:
        return InferRequest(bytes_elements(spec, binary), None, outputs, timeout_s, request_id,
                            priority)
    if name == INPUT_TENSOR:
        tensors = list(fp32_tensor(spec, binary, input_shape).unbind(0))
        return InferRequest(None, tensors, outputs, timeout_s, request_id, priority)
    raise BadInput(f"unknown input {name!r}: expected {INPUT_TENSOR!r} or {INPUT_IMAGES!r}")


def parameters_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """An object's `parameters`: absent is {}, anything but a JSON object is refused."""
    if "parameters" not in obj:
        return {}
    parameters = obj["parameters"]
    if not isinstance(parameters, dict):
        raise BadInput(f"'parameters' of {where} must be a JSON object, not "
                       f"{json.dumps(parameters)[:40]}")
    return parameters


def typed_parameter(parameters: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """A parameter of JSON type `kind` (bool or int; a bool is never taken as an int)."""
    value = parameters.get(key, default)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise BadInput(f"parameter {key!r} must be {'a boolean' if kind is bool else 'an integer'}"
                       f", not {json.dumps(value)[:40]}")
    return value


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
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise BadInput("the inference request is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadInput("the inference request must be a JSON object")
    return payload, body[json_end:]


def binary_slice(spec: dict[str, Any], binary: bytes) -> bytes | None:
    """This input's binary data (the only input, so it starts at offset 0), or None."""
    parameters = parameters_of(spec, "the input")
    if "binary_data_size" not in parameters:
        return None
    size = typed_parameter(parameters, "binary_data_size", int, None)
    if not 0 <= size <= len(binary):
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
        if isinstance(data, list) and all(isinstance(item, bytes) for item in data):
            elements = data  # gRPC's bytes_contents: the images as they are (never JSON)
        elif not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise BadInput(f"input {INPUT_IMAGES!r}: JSON 'data' must be a list of "
                           "base64-encoded images")
        else:
            try:
                elements = [base64.b64decode(item, validate=True) for item in data]
            except binascii.Error:
                raise BadInput(f"input {INPUT_IMAGES!r}: an element is not valid "
                               "base64") from None
    if len(elements) != count:
        raise BadInput(f"shape {shape} declares {count} images but the data holds "
                       f"{len(elements)}")
    return elements


def requested_outputs(payload: dict[str, Any], parameters: dict[str, Any],
                      num_classes: int) -> list[RequestedOutput]:
    """The outputs asked for; absent or an empty list asks for every output."""
    binary_default = typed_parameter(parameters, "binary_data_output", bool, False)
    if "outputs" not in payload:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    asked = payload["outputs"]
    if not isinstance(asked, list):
        raise BadInput("'outputs' must be a list of outputs (or absent, for all of them)")
    if not asked:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    outputs: list[RequestedOutput] = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise BadInput(f"unknown output {name!r}: expected one of {list(OUTPUTS)}")
        if any(output.name == name for output in outputs):
            raise BadInput(f"output {name!r} is asked for twice")
        params = parameters_of(item, f"output {name!r}")
        classes = typed_parameter(params, "classification", int, 0)
        if not 0 <= classes <= num_classes:
            raise BadInput(f"classification must be an integer from 0 to {num_classes}")
        binary = typed_parameter(params, "binary_data", bool, binary_default)
        outputs.append(RequestedOutput(name, binary, classes))
    return outputs


def requested_timeout(parameters: dict[str, Any]) -> float | None:
    """Triton's `timeout` parameter (microseconds), as seconds; 0 or absent is none."""
    timeout_us = typed_parameter(parameters, "timeout", int, 0)
    if timeout_us < 0:
        raise BadInput("parameter 'timeout' must be a non-negative integer of microseconds")
    return timeout_us / 1e6 if timeout_us else None


@dataclass(frozen=True)
class OutputTensor:
    """One output of an answer: FP32 values, or (classification) BYTES strings."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]

    def raw(self) -> bytes:
        """The binary form: little-endian FP32, or each string behind its 4-byte length."""
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4").tobytes()
        encoded = [text.encode() for text in self.values]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)

    def flat(self) -> list[Any]:
        """The JSON form: the values flattened in row-major order."""
        if isinstance(self.values, np.ndarray):
            flat: list[Any] = self.values.reshape(-1).tolist()
            return flat
        return list(self.values)


def output_tensors(labels: tuple[str, ...], outputs: list[RequestedOutput],
                   results: list[BatchResult[torch.Tensor]]) -> list[OutputTensor]:
    """The outputs asked for, from each sample's logits (in the request's order)."""
    logits = np.stack([result.output.numpy() for result in results]).astype(np.float32)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    values = {"logits": logits, "probabilities": shifted / shifted.sum(axis=1, keepdims=True)}
    tensors = []
    for output in outputs:
        array = values[output.name]
        if output.classification:
            strings = classify(array, output.classification, labels)
            tensors.append(OutputTensor(output.name, "BYTES",
                                        [len(strings), output.classification],
                                        [item for row in strings for item in row]))
        else:
            tensors.append(OutputTensor(output.name, "FP32", list(array.shape), array))
    return tensors


def encode_response(model: str, version: int, labels: tuple[str, ...], parsed: InferRequest,
                    results: list[BatchResult[torch.Tensor]]
                    ) -> tuple[bytes, str, dict[str, str]]:
    """The response body, its media type and extra headers (runs off the event loop)."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    tensors = output_tensors(labels, parsed.outputs, results)
    for output, tensor in zip(parsed.outputs, tensors, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": tensor.shape}
        if output.binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensor.flat()
        described.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": str(version),
                            "outputs": described}
    if parsed.request_id is not None:
        body["id"] = parsed.request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, "application/json", {}
    return (header + b"".join(chunks), "application/octet-stream",
            {HEADER_LENGTH: str(len(header))})


def classify(array: np.ndarray, count: int, labels: tuple[str, ...]) -> list[list[str]]:
    """Triton's classification extension: "value:index:label", highest value first."""
    rows = []
    for row in array:
        order = np.argsort(-row, kind="stable")[:count]
        rows.append([f"{row[i]:f}:{i}:{labels[i]}" for i in order])
    return rows


def metadata_body(slot: AnySlot, versions: list[str]) -> dict[str, Any]:
    """A model's metadata, as the protocol's REST and gRPC APIs both answer it."""
    channels, height, width = slot.model.input_shape
    classes = slot.model.num_classes
    return {
        "name": slot.name,
        "versions": versions,
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
    }


def config_body(slot: AnySlot, versions: list[str]) -> dict[str, Any]:
    """A model's configuration in Triton's shape (model_config.proto as JSON), for
    clients and tools that read it (tritonclient's get_model_config, perf_analyzer):
    dims leave out the batch dimension, as they do where max_batch_size > 0."""
    batching = slot.config.batching
    on_gpu = slot.model.device.type == "cuda"
    queue_policy = {"timeout_action": "REJECT",
                    "default_timeout_microseconds": int(batching.queue_timeout_ms * 1000),
                    "allow_timeout_override": True,
                    "max_queue_size": batching.max_queue_size}
    return {
        "name": slot.name,
        "platform": "pytorch_libtorch",
        "backend": PLATFORM,
        "version_policy": {"specific": {"versions": [
            int(version) for version in versions]}},
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
        "parameters": {"alternative_input": {"string_value": f"{INPUT_IMAGES}:BYTES[-1]"},
                       # what serves each bucket, as warm-up chose (batchd.bucket_runtimes)
                       "bucket_runtimes": {"string_value": ",".join(
                           f"{size}:{name}" for size, name
                           in sorted(slot.model.bucket_runtime.items()))}},
    }
