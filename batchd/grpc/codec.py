"""ModelInferRequest and ModelInferResponse messages to and from batchd's parsed request
(batchd.http.v2_codec.InferRequest): a gRPC call is checked by the very code that checks
a REST call, so both accept and refuse the same inputs with the same messages.

Pure functions, run where the REST codec runs (batchd.inference.run_codec).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from batchd.batcher import BatchResult
from batchd.errors import BadInput
from batchd.grpc import inference_pb2 as pb
from batchd.http.v2_codec import InferRequest, output_tensors, parse_payload


def parameter_values(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A parameters map (InferParameter or ModelRepositoryParameter) as plain values, the
    shape the REST codec reads from JSON: bool, int, float, str or bytes."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise BadInput(f"parameter {key!r} has no value")
        values[key] = getattr(parameter, choice)
    return values


def as_payload(request: pb.ModelInferRequest) -> tuple[dict[str, Any], bytes]:
    """The request as the REST codec's JSON object and binary data."""
    if len(request.inputs) != 1:
        raise BadInput("'inputs' must hold exactly one input: 'input' (FP32) or 'image' "
                       "(BYTES)")
    tensor = request.inputs[0]
    spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                            "shape": list(tensor.shape),
                            "parameters": parameter_values(tensor.parameters)}
    binary = b""
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadInput(f"raw_input_contents holds {len(request.raw_input_contents)} "
                           "entries for 1 input")
        if tensor.HasField("contents"):
            raise BadInput("an input's data goes in contents or in raw_input_contents, "
                           "not both")
        binary = request.raw_input_contents[0]
        spec["parameters"]["binary_data_size"] = len(binary)
    elif tensor.datatype == "BYTES":
        spec["data"] = list(tensor.contents.bytes_contents)
    else:
        spec["data"] = list(tensor.contents.fp32_contents)
    payload: dict[str, Any] = {"inputs": [spec],
                               "parameters": parameter_values(request.parameters)}
    if request.id:
        payload["id"] = request.id
    if request.outputs:
        payload["outputs"] = [{"name": output.name,
                               "parameters": parameter_values(output.parameters)}
                              for output in request.outputs]
    return payload, binary


def parse_infer_request(request: pb.ModelInferRequest, input_shape: tuple[int, ...],
                        num_classes: int, max_items: int) -> InferRequest:
    """Check a ModelInferRequest as REST checks its JSON (runs off the event loop)."""
    payload, binary = as_payload(request)
    return parse_payload(payload, binary, input_shape, num_classes, max_items)


def encode_infer_response(model: str, version: int, labels: tuple[str, ...],
                          parsed: InferRequest, results: list[BatchResult[torch.Tensor]]
                          ) -> pb.ModelInferResponse:
    """The answer, every output in raw_output_contents (as Triton answers)."""
    tensors = output_tensors(labels, parsed.outputs, results)
    return pb.ModelInferResponse(
        model_name=model, model_version=str(version), id=parsed.request_id or "",
        outputs=[pb.ModelInferResponse.InferOutputTensor(
            name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            for tensor in tensors],
        raw_output_contents=[tensor.raw() for tensor in tensors])
